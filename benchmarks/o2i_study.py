"""O2I study: BagNet accuracy against the object-to-image ratio down to the paper's 0.3 %, per pooling
and normalisation, failed optimisations counted (Pawlowski et al., *Needles in Haystacks*, Fig. 4, 8, 9).

    python benchmarks/o2i_study.py [--config cpu|gpu|quick] [--seeds 0,1,2] [--jobs 2] [--work-dir DIR]
        [--max-train N] [--canvases 32,64] [--poolings max,mean] [--norms in_aff] [--idx-dir /usr/share/datasets/fashion-mnist | --source sklearn-digits]
        [--estimate [--estimate-batch B]]

Everything goes through the project's own code, as a user would run it:
1. `mil extract needles` (`run_needles`): one image set per canvas from MNIST-format IDX files
   (Fashion-MNIST from the Debian package `dataset-fashion-mnist` by default — without it the script
   stops with one line unless `--source sklearn-digits` is given; target class 1, "trouser", among
   the other nine classes), the paper's clutter count for each canvas-to-object ratio;
2. `mil train bagnet` (`run_bagnet`) for every canvas × (norm, pooling) × seed: the paper's RMSprop at
   lr 5e-5, ×0.1 at 40/60/80 % of the run (its milestones scaled), effective batch 32, the epoch
   selected on validation accuracy; affine InstanceNorm (the paper's) with mean / max / attention /
   logsumexp pooling, and BatchNorm as a labelled variant. `--jobs` commands run side by side, one
   torch thread each on CPU (largest canvas first);
3. `mil evaluate o2i` (`evaluate_o2i`) on the test split, scored once: accuracy, AUC and localisation AP
   against O2I, mean ± sd over seeds, each run's best training accuracy; a run that never reached
   training accuracy 0.99 is a failed optimisation (the paper's definition) and is counted.

Configurations (`CONFIGS`): ``gpu`` is the paper's nMNIST setting — 28-px objects on 128², 256², 512²
(O2I 4.8 %, 1.2 %, 0.3 %), rf 33, 11,276 training images, 200 epochs; ``cpu`` is the same geometry at
a quarter of the scale — 7-px objects on 32², 64², 128² (the same O2I and clutter count), rf 33 —
with 256 training images and 20 epochs, so that it finishes within an hour on 2 cores (37 min
measured: docs/benchmarks.md); ``quick`` is the smoke test's. `--max-train`, `--canvases`,
`--poolings` and `--norms` narrow a configuration. `--estimate` counts the FLOPs of one training
image and times a few training steps per canvas on the device, and prints the expected time of the
configuration instead of running it.

Writes ``WORK/o2i.png`` + ``WORK/o2i.csv`` (the points), ``WORK/runs.csv`` (one row per run) and
``WORK/curves.png`` (training and validation accuracy per epoch of every run). Finished image sets
and runs are skipped on a rerun (the stages' own rule), so an interrupted study continues.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

from mil.errors import OptionError
from mil.extract.generate.idx import FASHION_MNIST as FASHION
from mil.extract.generate.idx import require_fashion_mnist

POOLINGS = ("mean", "max", "attention", "logsumexp")
# glibc keeps freed memory in the heap instead of mmap/munmap per large tensor (benchmarks/bagnet_step.py)
KEEP_HEAP = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}
CONFIGS = {
    # A quarter of the paper's geometry, a fraction of its data and steps: <= 60 min on 2 cores. The
    # poolings and BatchNorm at 4.8 % and 1.2 %; at 0.3 % (a 128² canvas costs 16 times a 32² one)
    # the paper's Fig. 4 setting only: max pooling, InstanceNorm.
    "cpu": dict(
        object_size=7,
        canvases=(32, 64, 128),
        rf=33,
        width=0.25,
        settings=[("in_aff", p, (32, 64)) for p in POOLINGS] + [("in_aff", "max", (128,)), ("bn", "max", (32, 64))],
        max_train=256,
        n_val=256,
        n_test=500,
        epochs=20,
        batch_size=32,
        lr=5e-5,
        device="cpu",
        jobs=2,
    ),
    # The paper's nMNIST setting (its Fig. 4 / 8): for a GPU machine.
    "gpu": dict(
        object_size=None,
        canvases=(128, 256, 512),
        rf=33,
        width=0.25,
        settings=[(norm, p, None) for norm in ("in_aff", "bn") for p in POOLINGS],
        max_train=11276,
        n_val=2000,
        n_test=2000,
        epochs=200,
        batch_size=32,
        lr=5e-5,
        device="cuda",
        jobs=1,
    ),
    # The smoke test's: seconds.
    "quick": dict(
        object_size=8,
        canvases=(16, 32),
        rf=9,
        width=0.0625,
        settings=[("in_aff", "mean", None), ("in_aff", "max", None), ("bn", "max", (16,))],
        max_train=32,
        n_val=16,
        n_test=16,
        epochs=2,
        batch_size=16,
        lr=5e-5,
        device="cpu",
        jobs=1,
    ),
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument(
        "--jobs", type=int, default=None, help="runs trained side by side (default: the configuration's; one torch thread each on CPU)"
    )
    p.add_argument("--work-dir", type=Path, default=None, help="default: bench_out/o2i_<config>")
    p.add_argument("--target", type=int, default=1)
    p.add_argument("--idx-dir", type=Path, default=None, help=f"MNIST-format IDX folder (default: {FASHION})")
    p.add_argument("--source", default=None, help="'sklearn-digits' for a fully offline run")
    p.add_argument("--device", default=None, help="default: the configuration's")
    p.add_argument("--max-train", type=int, default=None, help="training images per canvas (default: the configuration's)")
    p.add_argument("--canvases", default=None, help="a subset of the configuration's canvases, e.g. 32")
    p.add_argument("--poolings", default=None, help="a subset of the configuration's poolings, e.g. max,mean")
    p.add_argument("--norms", default=None, help="a subset of the configuration's norms: in_aff, bn")
    p.add_argument("--estimate", action="store_true", help="time a few steps per canvas and print the expected time; train nothing")
    p.add_argument("--estimate-batch", type=int, default=None, help="batch of the timed steps (default: the configuration's)")
    a = p.parse_args(argv)
    a.cfg = dict(CONFIGS[a.config])
    if a.max_train is not None:
        a.cfg["max_train"] = a.max_train
    if a.canvases is not None:
        a.cfg["canvases"] = tuple(int(c) for c in a.canvases.split(","))
        unknown = set(a.cfg["canvases"]) - set(CONFIGS[a.config]["canvases"])
        if unknown:
            p.error(f"expected --canvases among {CONFIGS[a.config]['canvases']}, got {sorted(unknown)} instead")
    for option, k in (("poolings", 1), ("norms", 0)):  # keep the settings with these poolings / norms
        if getattr(a, option) is not None:
            keep = set(getattr(a, option).split(","))
            a.cfg["settings"] = [st for st in a.cfg["settings"] if st[k] in keep]
    a.device = a.device or a.cfg["device"]
    a.jobs = a.jobs or a.cfg["jobs"]
    a.work_dir = a.work_dir or Path(f"bench_out/o2i_{a.config}")
    return a


def main(argv: list[str] | None = None) -> pd.DataFrame | None:
    a = parse(argv)
    if a.source is None and a.idx_dir is None:
        try:
            a.idx_dir, a.source = require_fashion_mnist(FASHION), "idx"
        except OptionError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    return estimate(a) if a.estimate else study(a)


def plan(a: argparse.Namespace) -> list[tuple[int, Path, object]]:
    """Every run as (canvas, run dir, `BagNetTrainConfig`), largest canvas first."""
    from mil.train.bagnet import BagNetTrainConfig

    c, seeds = a.cfg, [int(s) for s in str(a.seeds).split(",")]
    runs = []
    for canvas in sorted(c["canvases"], reverse=True):
        for norm, pooling, canvases in c["settings"]:  # canvases None: every canvas
            if canvases is None or canvas in canvases:
                for seed in seeds:
                    config = BagNetTrainConfig(
                        rf=c["rf"],
                        pooling=pooling,
                        width=c["width"],
                        norm=norm,
                        epochs=c["epochs"],
                        batch_size=c["batch_size"],
                        lr=c["lr"],
                        max_train=c["max_train"],
                        seed=seed,
                    )
                    runs.append((canvas, a.work_dir / "runs" / f"canvas{canvas}_{norm}_{pooling}_seed{seed}", config))
    return runs


def make_sets(a: argparse.Namespace) -> None:
    from mil.extract.generate.needles import run_needles, summary

    c = a.cfg
    for r in run_needles(
        a.work_dir / "data",
        target=a.target,
        canvases=c["canvases"],
        idx_dir=a.idx_dir,
        source=a.source or "idx",
        seed=1234,
        max_per_split=(c["max_train"], c["n_val"], c["n_test"]),
        object_size=c["object_size"],
        progress=False,
    ):
        print(" ", summary(r), f"(target occlusion {r['meta']['target_occlusion']['train']:.2f})", flush=True)


def train_one(data: Path, run: Path, config, device: str, threads: int) -> dict:
    """One `mil train bagnet` command in its own process; returns its summary row, seconds and whether it was skipped."""
    args = ["train", "bagnet", data, "--out", run, "--device", device, "--no-progress"]
    for key, value in asdict(config).items():
        if value is not None:
            args += [f"--{key.replace('_', '-')}", value]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **KEEP_HEAP}
    t = time.time()
    done = subprocess.run([sys.executable, "-m", "mil.cli", *map(str, args)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{run.name}: mil train bagnet failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    row = pd.read_csv(run / "summary.csv").iloc[0].to_dict()
    return {**row, "seconds": time.time() - t, "skipped": "already trained" in done.stdout}


def study(a: argparse.Namespace) -> pd.DataFrame:
    """Make the image sets, train every run, evaluate, tabulate and plot (see the module docstring)."""
    from mil.evaluate.o2i import evaluate_o2i

    t0 = time.time()
    make_sets(a)
    runs = plan(a)
    threads = 1 if a.device == "cpu" else torch.get_num_threads()
    print(f"{len(runs)} runs, {a.jobs} at a time", flush=True)
    with ThreadPoolExecutor(a.jobs) as pool:  # each run is a subprocess
        futures = [
            pool.submit(train_one, a.work_dir / "data" / f"canvas_{canvas}", run, config, a.device, threads) for canvas, run, config in runs
        ]
        for (_, run, _), future in zip(runs, futures):
            r = future.result()
            done = "finished before" if r["skipped"] else f"{r['seconds']:.0f} s"
            print(
                f"  {run.name}: best epoch {int(r['best_epoch'])}, val acc {r['val_acc']:.3f}, {r['train_images_per_s']:.1f} images/s, {done}",
                flush=True,
            )
    points, docs = evaluate_o2i([r for _, r, _ in runs], a.work_dir / "o2i.png", split="test", group_by="pooling,norm", device=a.device)
    report(a, docs)
    plot_curves([r for _, r, _ in runs], a.work_dir / "curves.png")
    print(f"\nwrote {a.work_dir / 'o2i.png'}, o2i.csv, runs.csv and curves.png; total {time.time() - t0:.0f} s")
    return points


def report(a: argparse.Namespace, docs: list[dict]) -> pd.DataFrame:
    """runs.csv and the printed table: per (norm, pooling) and O2I, test metrics mean ± sd, failures, best training accuracy."""
    from mil.evaluate.o2i import run_table

    runs = run_table(docs, "pooling,norm")
    runs["auc"] = runs.pop("auc_value")
    cols = [
        "group",
        "o2i",
        "seed",
        "accuracy",
        "auc",
        "loc_ap",
        "train_acc",
        "train_acc_last",
        "fitted",
        "epochs_to_fit",
        "best_epoch",
        "epochs",
        "run",
    ]
    runs[cols].to_csv(a.work_dir / "runs.csv", index=False)
    c = a.cfg
    print(
        f"\ntest split ({c['n_test']} images per canvas), BagNet rf {c['rf']}, width {c['width']}, {c['epochs']} epochs at lr {c['lr']:g}, "
        f"{c['max_train']} training images; mean ± sd over seeds {a.seeds}; failed = best training accuracy < 0.99:"
    )
    fmt = lambda v: f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0:.3f}"
    rows = []
    for (group, o2i), part in runs.groupby(["group", "o2i"], sort=True):
        rows.append(
            {
                "group": group,
                "O2I %": f"{100 * o2i:.2g}",
                "accuracy": fmt(part["accuracy"]),
                "AUC": fmt(part["auc"]),
                "loc AP": fmt(part["loc_ap"]),
                "train acc (best)": fmt(part["train_acc"]),
                "failed": f"{int((~part['fitted']).sum())}/{len(part)}",
                "epochs to fit": " ".join("-" if pd.isna(v) else f"{v:.0f}" for v in part["epochs_to_fit"]),
            }
        )
    print(pd.DataFrame(rows).to_string(index=False))
    return runs


def plot_curves(runs: list[Path], out: Path) -> None:
    """Training (solid) and validation (dashed) accuracy per epoch, one panel per canvas, one colour per (norm, pooling)."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for run in runs:
        cfg = json.loads((run / "config.json").read_text())
        log = pd.read_csv(run / "metrics.csv")
        rows.append((cfg["imageset"]["canvas"], f"{cfg['train']['norm']}, {cfg['train']['pooling']}", log))
    canvases = sorted({r[0] for r in rows})
    groups = sorted({r[1] for r in rows})
    fig, axes = plt.subplots(1, len(canvases), figsize=(4.6 * len(canvases), 3.8), dpi=110, sharey=True, squeeze=False)
    for ax, canvas in zip(axes[0], canvases):
        for canvas_, group, log in rows:
            if canvas_ == canvas:
                colour = f"C{groups.index(group) % 10}"
                ax.plot(log["epoch"], log["train_acc"], color=colour, lw=1, alpha=0.8)
                ax.plot(log["epoch"], log["val_acc"], color=colour, lw=1, alpha=0.8, ls="--")
        ax.axhline(0.99, color="grey", lw=0.6, ls=":")
        ax.set(title=f"{canvas}² canvas", xlabel="epoch", ylim=(0.4, 1.01))
        ax.grid(alpha=0.3, lw=0.5)
    axes[0][0].set_ylabel("accuracy (solid: training, dashed: validation)")
    for k, group in enumerate(groups):
        axes[0][-1].plot([], [], color=f"C{k % 10}", label=group)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def estimate(a: argparse.Namespace) -> None:
    """Per canvas: the FLOPs of one training image (`torch.utils.flop_counter`, forward + backward) and the
    measured speed of forward + backward + RMSprop steps on the device; print the configuration's
    expected training time (validation passes not included: about a sixth more at the paper's sizes)."""
    from torch.utils.flop_counter import FlopCounterMode

    from mil.bagnet import create_bagnet
    from mil.train.bagnet import build_optimizer

    device = torch.device(a.device)
    runs = plan(a)
    total = flops = 0.0
    batch = a.estimate_batch or a.cfg["batch_size"]
    for canvas in a.cfg["canvases"]:
        config = next(cfg for c, _, cfg in runs if c == canvas)
        net = create_bagnet(rf=config.rf, pooling="max", width=config.width, norm=config.norm, in_chans=1).to(device)
        with FlopCounterMode(display=False) as counter:
            net(torch.rand(1, 1, canvas, canvas, device=device)).sum().backward()
        per_image_flops = counter.get_total_flops()
        opt, _ = build_optimizer(net, config)
        x = torch.rand(batch, 1, canvas, canvas, device=device)  # (B, 1, S, S)
        y = torch.randint(0, 2, (batch,), device=device).float()  # (B,)
        for step in range(4):  # one warm-up step
            if step == 1:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.time()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x).squeeze(-1), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        per_image = (time.time() - t) / (3 * batch)
        n = sum(c == canvas for c, _, _ in runs)
        passes = n * config.epochs * a.cfg["max_train"]  # training images through the network, all runs
        total += passes * per_image
        flops += passes * per_image_flops
        print(
            f"  canvas {canvas}: {per_image_flops / 1e9:.2f} GFLOP per training image, {1 / per_image:.1f} training images/s "
            f"(batch {batch}); {n} runs x {config.epochs} epochs x {a.cfg['max_train']} images: {passes * per_image / 3600:.1f} h"
        )
    print(
        f"expected training time of --config {a.config} on {a.device}: {total / 3600:.1f} h in one process, "
        f"{total / 3600 / a.jobs:.1f} h with --jobs {a.jobs}; {flops / 1e15:,.0f} PFLOP in all"
    )


if __name__ == "__main__":
    main()
