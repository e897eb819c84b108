"""The Python steps of benchmarks/gpu.sh: environment, extraction, BagNet and MIL training throughput, summary.

    python benchmarks/gpu_steps.py {env,extract,bagnet,mil,summary} --out DIR [--device cuda|cpu] [--quick]

Each measuring step writes ``DIR/<step>.json``, rows ``{"what", "rate", "unit", "util", "detail"}`` (`util`: GPU
utilisation sampled by `gpu_util.GpuSampler` during the timed part; None on CPU); ``summary`` prints one line
per row. Sizes of the full run on a GPU machine (``--quick`` in brackets):

- extract: ``extract_throughput.py`` as it is: resnet50_trunc bf16, batch 256, 16 workers, one synthetic 16,384 µm
  slide at 0.5 µm/px (12,852 tissue tiles of 224 px), 7 interleaved rounds [its ``--quick``]; GPU utilisation
  over the encoder-alone rounds and over the pipeline rounds, warm-ups left out.
- bagnet: ``mil.train.bagnet.train_epoch`` (the training code: fp32, RMSprop, BCE) on device-resident random images,
  rf 33, width 0.25, InstanceNorm, max pooling, batch 32, 1 channel, canvases 256² and 512² (the O2I study's GPU
  setting), 30 timed steps after 3 warm-up steps [canvas 32², width 0.0625, batch 8, 3 steps].
- mil: ``mil.train.loop.fit_fold`` (abmil, batch 1, RAM cache, standardised, bf16 autocast on a GPU that has it, as
  ``mil train``) on 64 + 4 HDF5 bags of 10,000 × 1024 random features, 4 epochs; bags/s from the median of epochs
  2..E, each including its validation pass over the 4 bags [8 + 4 bags of 200 × 64, 3 epochs].
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

from gpu_util import GpuSampler, fmt

HERE = Path(__file__).resolve().parent
STEPS = ("extract", "bagnet", "mil")
# 12,852 tiles: slide written once (~30 s, one core; kept in --out for reruns), then 8 rounds of ~5-10 s, CPU-bound
EXTRACT = "--encoders resnet50_trunc --precision bf16 --size-um 16384 --slide-mpp 0.5 --batch-size 256 --workers 16 --rounds 7"


def _timed(fn, spans: list):
    def wrapper(*args, **kwargs):
        t = time.time()
        try:
            return fn(*args, **kwargs)
        finally:
            spans.append((t, time.time()))

    return wrapper


def step_env(a) -> None:
    import torch

    print(f"torch {torch.__version__} (CUDA build {torch.version.cuda}), python {sys.version.split()[0]}")
    print(f"CPUs: {os.cpu_count()} ({len(os.sched_getaffinity(0))} usable by this process)")
    free = shutil.disk_usage("/dev/shm").free / 2**30 if os.path.isdir("/dev/shm") else 0.0
    low = free < 4 and not a.quick  # 16 workers x 4 prefetched batches of 256 tiles of 224² px = 2.4 GiB in flight
    print(f"/dev/shm: {free:.1f} GiB free" + (" (LOW: DataLoader workers pass ~2.4 GiB of batches through it)" if low else ""))
    if a.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit(f"error: --device {a.device} but torch {torch.__version__} sees no CUDA GPU; use --device cpu")
        p, bf16 = torch.cuda.get_device_properties(a.device), torch.cuda.is_bf16_supported()
        print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}, bf16 {bf16}")
    else:
        print("device: cpu (GPU utilisation n/a)")
    import mil.extract  # noqa: F401  (fails here, before any work, when the package is not installed)
    import mil.train  # noqa: F401


def step_extract(a) -> list[dict]:
    spec = importlib.util.spec_from_file_location("extract_throughput_benchmark", HERE / "extract_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # the script as it is, run through its main(argv)
    argv = ["--device", a.device, "--out", str(a.out / "extract"), *(["--quick"] if a.quick else EXTRACT.split())]
    spans: dict[str, list] = {"encoder_alone": [], "pipeline": []}
    for name, s in spans.items():  # per-phase windows; without these functions: the whole run's utilisation
        if callable(getattr(bench, name, None)):
            setattr(bench, name, _timed(getattr(bench, name), s))
    with GpuSampler(a.out / "extract_gpu.csv", enabled=a.cuda) as smp:
        table = bench.main(argv)
    util = {k: smp.stats(s[1:] if len(s) > 1 else None) for k, s in spans.items()}  # s[0]: the warm-up
    r = table.iloc[0]
    what = f"extract {r['encoder']} {r['precision']}"
    detail = f"pipeline/encoder ratio median {r['ratio median']:.2f} (q1 {r['ratio q1']:.2f}, q3 {r['ratio q3']:.2f}), {r['tiles']} tiles"
    return [
        {"what": f"{what}: encoder alone", "rate": float(r["encoder alone tiles/s"]), "unit": "tiles/s", "util": util["encoder_alone"]},
        {"what": f"{what}: pipeline", "rate": float(r["pipeline tiles/s"]), "unit": "tiles/s", "util": util["pipeline"], "detail": detail},
    ]


def step_bagnet(a) -> list[dict]:
    import torch
    from torch.utils.data import DataLoader, Subset, TensorDataset

    from mil.bagnet import create_bagnet
    from mil.train.bagnet import BagNetTrainConfig, build_optimizer, train_epoch

    dev = torch.device(a.device)
    canvases, width, batch, steps = ((32,), 0.0625, 8, 3) if a.quick else ((256, 512), 0.25, 32, 30)
    rows = []
    for canvas in canvases:  # GPU: ~2-15 s each (12.6 / 50.7 GFLOP per training image at 256² / 512²)
        torch.manual_seed(0)
        config = BagNetTrainConfig(rf=33, pooling="max", width=width, norm="in_aff", batch_size=batch)
        net = create_bagnet(rf=33, pooling="max", width=width, norm="in_aff", in_chans=1).to(dev)
        opt, _ = build_optimizer(net, config)
        n = batch * steps
        x = torch.rand(n, 1, canvas, canvas, device=dev)  # (n, 1, S, S)
        y = (torch.arange(n, device=dev) % 2).float()  # (n,)
        ds = TensorDataset(x, y, torch.arange(n, device=dev))
        train_epoch(net, DataLoader(Subset(ds, range(min(n, 3 * batch))), batch_size=batch), opt, 1, dev)  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        with GpuSampler(a.out / f"bagnet_{canvas}_gpu.csv", enabled=a.cuda) as smp:
            res = train_epoch(net, DataLoader(ds, batch_size=batch), opt, 1, dev)  # .item() per step: synchronised
        rate = res["n"] / res["seconds"]
        print(f"  canvas {canvas}²: {res['n']} images in {res['seconds']:.2f} s, {rate:,.1f} images/s, GPU {fmt(smp.stats())}")
        what = f"bagnet train step {canvas}² (rf 33, width {width}, batch {batch}, fp32)"
        rows.append({"what": what, "rate": rate, "unit": "images/s", "util": smp.stats()})
    return rows


def _write_bags(work: Path, n: int, n_inst: int, dim: int) -> list[Path]:
    """`n` feature files of random N(0, 1) features (CLAM layout: features + coords), written once."""
    import h5py
    import numpy as np

    from mil.atomic import atomic_path

    work.mkdir(parents=True, exist_ok=True)
    files = [work / f"bag{k:03d}.h5" for k in range(n)]
    coords = np.stack(np.divmod(np.arange(n_inst), 1000)[::-1], axis=1).astype(np.int64) * 448  # (N, 2)
    for k, p in enumerate(files):
        if not p.exists():
            X = np.random.default_rng(k).standard_normal((n_inst, dim), dtype=np.float32)  # (N, D)
            with atomic_path(p) as tmp, h5py.File(tmp, "w") as f:
                f.create_dataset("features", data=X, chunks=(min(n_inst, 1024), dim))
                f.create_dataset("coords", data=coords)
    return files


def step_mil(a) -> list[dict]:
    import numpy as np
    import torch

    from mil.data import BagDataset
    from mil.device import autocast_dtype
    from mil.train.loop import TrainConfig, fit_fold

    n_train, n_val, n_inst, dim, epochs = (8, 4, 200, 64, 3) if a.quick else (64, 4, 10_000, 1024, 4)
    t0 = time.perf_counter()  # GPU: writing ~10 s (2.8 GB, kept for reruns), RAM cache ~5 s, 4 epochs ~5-15 s
    files = _write_bags(a.out / f"mil_bags_{n_inst}x{dim}", n_train + n_val, n_inst, dim)
    labels = [k % 2 for k in range(n_train + n_val)]
    train_ds = BagDataset(files[:n_train], labels[:n_train], cache="ram")
    val_ds = BagDataset(files[n_train:], labels[n_train:], cache="ram")
    print(f"  {n_train} + {n_val} bags of {n_inst:,} × {dim} ready in {time.perf_counter() - t0:.1f} s")
    dev = torch.device(a.device)
    autocast = autocast_dtype("auto", dev)  # bf16 on a GPU that has it, as `mil train --precision auto`
    config = TrainConfig(head="abmil", epochs=epochs, patience=epochs + 1, batch_size=1, seed=0)
    with GpuSampler(a.out / "mil_gpu.csv", enabled=a.cuda) as smp:
        ends = [time.time()]
        fit_fold(train_ds, val_ds, dim, config, on_epoch=lambda row: ends.append(time.time()), device=dev, autocast=autocast)
    epoch_s = np.diff(ends)  # (E,) each with its validation pass
    rate = n_train / float(np.median(epoch_s[1:]))
    print(f"  epochs: {', '.join(f'{s:.2f}' for s in epoch_s)} s; {rate:,.1f} bags/s")
    precision = "fp32" if autocast is None else "bf16"
    what = f"mil train step abmil ({n_inst:,} × {dim} bags, batch 1, {precision})"
    return [{"what": what, "rate": rate, "unit": "bags/s", "util": smp.stats([(ends[1], ends[-1])])}]


def step_summary(a) -> None:
    rows = []
    for step in STEPS:
        p = a.out / f"{step}.json"
        if not p.is_file():
            raise SystemExit(f"error: {p} is missing: the {step} step did not finish")
        rows += json.loads(p.read_text())
    w = max(len(r["what"]) for r in rows)
    print(f"{'measurement':<{w}}  {'rate':>19}  GPU utilisation")
    for r in rows:
        print(f"{r['what']:<{w}}  {r['rate']:>10,.1f} {r['unit']:<8}  {fmt(r['util'])}")
    print("\n".join(f"  {r['what']}: {r['detail']}" for r in rows if r.get("detail")))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=("env", *STEPS, "summary"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    a.cuda = a.device.startswith("cuda")
    a.out.mkdir(parents=True, exist_ok=True)
    if a.step in ("env", "summary"):
        return step_env(a) if a.step == "env" else step_summary(a)
    rows = {"extract": step_extract, "bagnet": step_bagnet, "mil": step_mil}[a.step](a)
    (a.out / f"{a.step}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
