"""Training throughput and peak memory of `abmil`: RAM cache vs stream mode vs a plain HDF5 loop.

    python benchmarks/train_throughput.py [--bags 400 --instances 5000 --dim 1024] [--epochs 2]
                                          [--small-bags 100] [--val-bags 8] [--threads 2] [--seed 0]
                                          [--work-dir DIR] [--keep] [--quick]

A synthetic cohort of ``--bags`` training bags (plus ``--val-bags`` validation bags), each
``--instances`` × ``--dim`` float32, is written once as real feature files (one HDF5 per bag,
``features`` chunked by 1,024 rows like `mil extract features`, ``coords`` int64, the file attrs
of the feature-file contract): random normal features, and in positive bags (every other bag)
10 % "witness" instances shifted along one direction, so the head has something to learn. The
defaults make 408 × 20 MB ≈ 8.4 GB on disk. A json marker in the work dir lets a rerun with the
same parameters reuse the files.

Each mode then trains `abmil` (default kwargs, batch size 1, Adam lr 2e-4, BCE with
``pos_weight``, same seed, same number of epochs) in its own fresh Python process, so that its
peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``) is its own; torch uses ``--threads`` threads:

- ``plain``: the loop a researcher writes without our data layer: each step opens the bag's
  HDF5 file with h5py, reads ``features`` into a float32 tensor and does forward / backward /
  step with the same head, optimiser and loss. No validation.
- ``ram``: ``BagDataset(cache="ram")`` (every bag read once, kept as float16) + the real
  `fit_fold` (DataLoader + `collate_bags`, validation on the small validation set each epoch).
- ``stream``: ``BagDataset(cache="stream")`` (the HDF5 file is read at every access) + `fit_fold`.
- ``stream-small``: ``stream`` on the first ``--small-bags`` bags only: its peak RSS against
  ``stream``'s shows whether memory grows with the cohort.

"load s" is the dataset construction (the whole RAM cache for ``ram``; file metadata only for
``stream``). Epoch times are training only: validation is timed apart (timestamps of the
validation set's first read and of `fit_fold`'s ``on_epoch`` callback) and left out. "epoch s"
is the median over epochs 2..E (epoch 1 when E = 1); epoch 1 is shown on its own.

The OS page cache: all runs here read files that sit in the page cache (the cohort is written
just before and read once more as a warm-up pass before every mode, and ~8 GB fits in this
machine's RAM; without the re-read, the RAM mode's ~5 GiB evicted ~15 % of it), so
``stream`` and ``plain`` read from memory, not from disk. That is the fair comparison of the
data paths' CPU cost, not of disk speed; with a cohort larger than RAM, or a cold cache, each
stream epoch would also pay the disk read (dropping the page cache needs root, so it is not
measured here). The output states the fraction of the cohort resident in the page cache before
each run when ``fincore`` (util-linux) is available.

Default run: about 4.5 minutes on 2 shared CPU cores (writing the cohort ~40 s, one epoch of
400 bags ~25 s in every mode). ``--quick`` (12 bags × 300 × 64, 1 epoch, 6 small bags) is the
smoke-test preset: ~20 s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

ROWS_PER_CHUNK = 1024  # as mil.extract.wsi.features.ROWS_PER_CHUNK: the layout `mil extract features` writes
WITNESS_FRACTION = 0.1  # share of the instances of a positive bag carrying the signal
SHIFT = 1.0  # how far witnesses are shifted along the signal direction (features are N(0, 1))
MARKER = "cohort.json"
MODES = ("plain", "ram", "stream", "stream-small")
MIB = 1024**2


# ----------------------------------------------------------------------------------------------
# cohort


def _bag_names(n_bags: int, n_val: int) -> tuple[list[str], list[str]]:
    return [f"b{i:05d}" for i in range(n_bags)], [f"v{i:03d}" for i in range(n_val)]


def _label(name: str) -> int:
    return int(name[1:]) % 2  # every other bag positive, in both sets


def write_cohort(work: Path, n_bags: int, n_inst: int, dim: int, n_val: int, seed: int) -> tuple[float, bool]:
    """Write the bags (or find them there from an earlier run); return (seconds, reused)."""
    import h5py

    from mil import __version__
    from mil.atomic import atomic_path

    params = {
        "bags": n_bags,
        "instances": n_inst,
        "dim": dim,
        "val_bags": n_val,
        "seed": seed,
        "witness_fraction": WITNESS_FRACTION,
        "shift": SHIFT,
        "layout": 1,
    }
    marker = work / MARKER
    train, val = _bag_names(n_bags, n_val)
    if marker.is_file() and json.loads(marker.read_text()) == params and all((work / f"{s}.h5").is_file() for s in train + val):
        return 0.0, True
    marker.unlink(missing_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    direction = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)  # (D,)
    direction /= np.linalg.norm(direction)
    side = int(np.ceil(np.sqrt(n_inst)))
    idx = np.arange(n_inst)
    coords = np.stack([(idx % side) * 448, (idx // side) * 448], axis=1).astype(np.int64)  # (N, 2) level-0 px
    for k, sid in enumerate(train + val):
        rng = np.random.default_rng([seed, k])
        X = rng.standard_normal((n_inst, dim), dtype=np.float32)  # (N, D)
        if _label(sid):
            w = rng.choice(n_inst, size=max(1, int(WITNESS_FRACTION * n_inst)), replace=False)
            X[w] += SHIFT * direction
        with atomic_path(work / f"{sid}.h5") as tmp, h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=X, chunks=(min(n_inst, ROWS_PER_CHUNK), dim))
            c = f.create_dataset("coords", data=coords)
            c.attrs.update(patch_size=224, patch_size_level0=448, target_mpp=0.5, level0_mpp=0.25, overlap=0)
            f.attrs.update(
                slide_id=sid,
                encoder="synthetic",
                encoder_weights_sha256="none",
                feature_dim=dim,
                tissue_params="{}",
                mil_version=__version__,
            )
    marker.write_text(json.dumps(params))
    return time.perf_counter() - t0, False


def warm_page_cache(paths: list[Path]) -> float:
    """Read every file once (raw bytes) so that each mode starts with the cohort in the page cache; GB/s."""
    t0, n = time.perf_counter(), 0
    buf = bytearray(16 * MIB)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while k := f.readinto(buf):
                n += k
    return n / 1e9 / max(time.perf_counter() - t0, 1e-9)


def resident_fraction(paths: list[Path]) -> float | None:
    """Share of the files' bytes in the page cache (``fincore``), or None when it cannot be told."""
    if shutil.which("fincore") is None:
        return None
    try:
        out = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", *map(str, paths)],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout
        res = size = 0
        for line in out.split("\n"):
            if line.strip():
                r, s = line.split()
                res, size = res + int(r), size + int(s)
        return min(res / size, 1.0) if size else None  # RES counts whole 4 KiB pages
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------
# one mode, in its own process


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_mode(mode: str, work: Path, n_bags: int, n_val: int, epochs: int, threads: int, seed: int) -> dict:
    """Train in this process and return timings, losses and peak RSS (call it in a fresh process)."""
    import torch

    torch.set_num_threads(threads)
    from mil.heads import create_head
    from mil.losses import create_loss

    if mode != "plain":  # the data layer and the real loop (pandas, sklearn)
        from mil.data import BagDataset
        from mil.train.loop import TrainConfig, fit_fold
    # Adam's first construction imports torch._dynamo (~1.5 s, once per process): pay it here, untimed, in every mode.
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
    rss_start = _peak_rss_mib()
    train, val = _bag_names(n_bags, n_val)
    files, labels = [work / f"{s}.h5" for s in train], [_label(s) for s in train]
    res = {"mode": mode, "bags": n_bags, "rss_start_mib": rss_start, "epoch_s": [], "val_s": [], "train_loss": [], "val_auc": []}

    if mode == "plain":
        import h5py

        dim = int(json.loads((work / MARKER).read_text())["dim"])
        torch.manual_seed(seed)
        model = create_head("abmil", in_dim=dim)
        cfg_lr, cfg_wd = 2e-4, 1e-4  # TrainConfig's defaults
        opt = torch.optim.Adam(model.parameters(), lr=cfg_lr, weight_decay=cfg_wd)
        y_all = torch.tensor(labels, dtype=torch.float32)  # (n_bags,)
        bce = create_loss("bce", pos_weight=float((y_all == 0).sum() / max(int((y_all == 1).sum()), 1)))
        gen = torch.Generator().manual_seed(seed)
        res["load_s"] = None
        for _ in range(epochs):
            t0 = time.perf_counter()
            model.train()
            losses = []
            for i in torch.randperm(n_bags, generator=gen).tolist():
                with h5py.File(files[i], "r") as f:
                    X = torch.from_numpy(f["features"][()])  # (N, D) float32
                out = model(X[None])  # (1, N, D), no mask: every instance real
                loss = bce(out.logits, y_all[i : i + 1])
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
            res["epoch_s"].append(time.perf_counter() - t0)
            res["train_loss"].append(float(np.mean(losses)))
    else:
        cache = "stream" if mode.startswith("stream") else "ram"
        val_starts: list[float] = []

        class TimedVal(BagDataset):  # `predict` reads item 0 first: that instant ends the epoch's training
            def __getitem__(self, i: int):
                if i == 0:
                    val_starts.append(time.perf_counter())
                return super().__getitem__(i)

        t0 = time.perf_counter()
        train_ds = BagDataset(files, labels, cache=cache)
        res["load_s"] = time.perf_counter() - t0
        val_ds = TimedVal([work / f"{s}.h5" for s in val], [_label(s) for s in val], cache=cache)
        res["cache_gib"] = train_ds.nbytes_fp16 / 1024**3 if cache == "ram" else 0.0
        ends = [time.perf_counter()]

        def on_epoch(row: dict) -> None:
            ends.append(time.perf_counter())
            res["train_loss"].append(row["train_loss"])
            res["val_auc"].append(row["val_auc"])

        cfg = TrainConfig(head="abmil", epochs=epochs, patience=epochs + 1, batch_size=1, seed=seed, standardize=False)  # as measured
        fit_fold(train_ds, val_ds, train_ds.feature_dim, cfg, on_epoch=on_epoch)
        if len(val_starts) < len(ends) - 1:
            raise RuntimeError("fit_fold no longer reads validation item 0 first: the epoch timing here must be revised")
        for e in range(len(ends) - 1):
            res["epoch_s"].append(val_starts[e] - ends[e])
            res["val_s"].append(ends[e + 1] - val_starts[e])
    res["rss_peak_mib"] = _peak_rss_mib()
    return res


def _run_in_subprocess(mode: str, work: Path, n_bags: int, args: argparse.Namespace) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        mode,
        "--work-dir",
        str(work),
        "--bags",
        str(n_bags),
        "--val-bags",
        str(args.val_bags),
        "--epochs",
        str(args.epochs),
        "--threads",
        str(args.threads),
        "--seed",
        str(args.seed),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"mode {mode} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(next(line for line in reversed(r.stdout.splitlines()) if line.startswith("RESULT "))[len("RESULT ") :])


# ----------------------------------------------------------------------------------------------
# report


def _epoch_s(times: list[float]) -> float:
    return statistics.median(times[1:]) if len(times) > 1 else times[0]


def summarise(results: list[dict]) -> tuple[pd.DataFrame, dict]:
    import pandas as pd

    rows = []
    for r in results:
        ep = _epoch_s(r["epoch_s"])
        rows.append(
            {
                "mode": r["mode"],
                "bags": r["bags"],
                "load s": r["load_s"] if r["load_s"] is not None else float("nan"),
                "epoch 1 s": r["epoch_s"][0],
                "epoch s": ep,
                "ms/step": 1000 * ep / r["bags"],
                "val s/epoch": statistics.mean(r["val_s"]) if r["val_s"] else float("nan"),
                "peak RSS MiB": r["rss_peak_mib"],
                "RSS after imports MiB": r["rss_start_mib"],
                "peak − imports MiB": r["rss_peak_mib"] - r["rss_start_mib"],
                "train loss (last epoch)": r["train_loss"][-1],
                "page cache": r.get("resident", float("nan")),
            }
        )
    table = pd.DataFrame(rows)
    by = {r["mode"]: r for r in rows}
    ratios = {
        "epoch time ram / plain": by["ram"]["epoch s"] / by["plain"]["epoch s"],
        "epoch time stream / plain": by["stream"]["epoch s"] / by["plain"]["epoch s"],
        "epoch time ram / stream": by["ram"]["epoch s"] / by["stream"]["epoch s"],
        "peak RSS ram / plain": by["ram"]["peak RSS MiB"] / by["plain"]["peak RSS MiB"],
        "peak RSS stream / plain": by["stream"]["peak RSS MiB"] / by["plain"]["peak RSS MiB"],
        "RSS above imports, stream / plain": by["stream"]["peak − imports MiB"] / max(by["plain"]["peak − imports MiB"], 1e-9),
        f"peak RSS stream {by['stream']['bags']} bags / {by['stream-small']['bags']} bags": by["stream"]["peak RSS MiB"]
        / by["stream-small"]["peak RSS MiB"],
        f"RSS above imports, stream {by['stream']['bags']} bags / {by['stream-small']['bags']} bags": by["stream"]["peak − imports MiB"]
        / max(by["stream-small"]["peak − imports MiB"], 1e-9),
    }
    table.attrs["ratios"] = ratios
    return table, ratios


def finish_work_dir(work: Path, own_dir: bool, keep: bool) -> None:
    """Remove a work folder the script made itself, unless --keep (then say where it is)."""
    if own_dir and not keep:
        shutil.rmtree(work, ignore_errors=True)
    elif own_dir:
        print(f"work folder kept: {work}")


def main(argv: list[str] | None = None) -> pd.DataFrame | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bags", type=int, default=400, help="training bags")
    ap.add_argument("--instances", type=int, default=5000, help="instances per bag")
    ap.add_argument("--dim", type=int, default=1024, help="feature dimension")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--small-bags", type=int, default=100, help="cohort size of the stream-small run")
    ap.add_argument("--val-bags", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each training process")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="where the bags are written (kept, and reused by a rerun with the same parameters); "
        "default: a temporary folder under /tmp, removed at the end unless --keep",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    ap.add_argument("--quick", action="store_true", help="smoke preset: 12 bags × 300 × 64, 1 epoch, 6 small bags")
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker is not None:  # inside the fresh process of one mode
        res = run_mode(args.worker, args.work_dir, args.bags, args.val_bags, args.epochs, args.threads, args.seed)
        print("RESULT " + json.dumps(res), flush=True)
        return None
    if args.quick:
        args.bags, args.instances, args.dim, args.epochs, args.small_bags = 12, 300, 64, 1, 6
    if not (1 <= args.small_bags <= args.bags) or min(args.instances, args.dim, args.epochs, args.threads) < 1 or args.val_bags < 2:
        ap.error("expected 1 <= --small-bags <= --bags, --instances, --dim, --epochs, --threads >= 1 and --val-bags >= 2")

    import pandas as pd

    t_start = time.perf_counter()
    own_dir = args.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="train_throughput_", dir="/tmp")) if own_dir else args.work_dir
    try:
        gb = args.bags * args.instances * args.dim * 4 / 1e9
        print(
            f"cohort: {args.bags} training + {args.val_bags} validation bags of {args.instances:,} × {args.dim} float32 "
            f"(≈ {gb * (1 + args.val_bags / args.bags):.1f} GB) in {work}",
            flush=True,
        )
        secs, reused = write_cohort(work, args.bags, args.instances, args.dim, args.val_bags, args.seed)
        print("  reused the files of an earlier run" if reused else f"  written in {secs:.0f} s", flush=True)
        train, val = _bag_names(args.bags, args.val_bags)
        paths = [work / f"{s}.h5" for s in train + val]
        results = []
        for mode in MODES:
            n = args.small_bags if mode == "stream-small" else args.bags
            # Re-read before every mode: the RAM mode's GiBs (and other work on the machine) evict part of the cache.
            gbps = warm_page_cache(paths)
            resident = resident_fraction(paths[:n] + paths[args.bags :])
            print(f"  warm-up read pass {gbps:.1f} GB/s" + (f", {resident:.0%} resident" if resident is not None else ""), flush=True)
            t0 = time.perf_counter()
            r = _run_in_subprocess(mode, work, n, args)
            r["resident"] = resident if resident is not None else float("nan")
            results.append(r)
            print(
                f"  {mode:<12} {n} bags: {time.perf_counter() - t0:.0f} s wall (process), epochs "
                + ", ".join(f"{t:.1f}" for t in r["epoch_s"])
                + f" s, peak RSS {r['rss_peak_mib']:.0f} MiB",
                flush=True,
            )
    finally:
        finish_work_dir(work, own_dir, args.keep)

    table, ratios = summarise(results)
    print(
        f"\nabmil (default kwargs), batch size 1, {args.epochs} epoch(s), torch threads {args.threads}, seed {args.seed}; "
        f"each mode in a fresh process. Epoch times are training only (ram/stream validation on {args.val_bags} bags "
        "timed apart); 'epoch s' = median of epochs 2..E (epoch 1 if E = 1)."
    )
    fmt = {
        "load s": "{:.1f}",
        "epoch 1 s": "{:.1f}",
        "epoch s": "{:.1f}",
        "ms/step": "{:.1f}",
        "val s/epoch": "{:.2f}",
        "peak RSS MiB": "{:,.0f}",
        "RSS after imports MiB": "{:,.0f}",
        "peak − imports MiB": "{:,.0f}",
        "train loss (last epoch)": "{:.3f}",
        "page cache": "{:.0%}",
    }
    shown = table.copy()
    for col, f in fmt.items():
        shown[col] = [("–" if pd.isna(v) else f.format(v)) for v in table[col]]
    print(shown.to_string(index=False))
    print("\nratios (same run, same machine):")
    for k, v in ratios.items():
        print(f"  {k:<50} {v:6.2f}")
    res = table["page cache"].dropna()
    cached = f"{res.min():.0%}–{res.max():.0%} of the cohort was" if len(res) else "the cohort was most likely"
    print(
        f"\npage cache: {cached} in the OS page cache before each run (read once more right before it), so 'stream' and "
        "'plain' read from memory, not from disk; cold-disk reads (a cohort larger than RAM) are not measured here: "
        "dropping the cache needs root."
    )
    print(f"total wall time: {time.perf_counter() - t_start:.0f} s")
    return table


if __name__ == "__main__":
    main()
