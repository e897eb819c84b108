"""Stage one side by side with CLAM: tiling and feature extraction of the same slide, in one run.

    python benchmarks/vs_clam.py [--clam DIR] [--size 20000] [--encoder resnet50_trunc] [--batch-size 16]
        [--workers 2] [--clam-batch-size 256] [--no-compile] [--out bench_out/vs_clam] [--quick]

One synthetic slide (``--size``² px at 0.25 µm/px, 40 % tissue, written once and reused) is tiled
and embedded by each tool as its users run it: fresh processes, wall time including start-up,
peak RSS of the largest process (`getrusage(RUSAGE_CHILDREN)` in a wrapper process, what GNU
time's %M reports). The tile geometry is CLAM's default: 256 level-0 px tiles without overlap,
resized to 224 px, i.e. ``mil extract … --target-mpp 0.285714 --tile-size 224``. The encoder has
random weights (nothing can be downloaded here) and the same architecture on both sides.

- **CLAM** (``--clam DIR``, a checkout of mahmoodlab/CLAM and its dependencies, opencv and tqdm,
  in this Python): its own ``create_patches_fp.py --seg --patch`` and ``extract_features_fp.py``
  (CPU: no workers, batch ``--clam-batch-size``, fp32), unchanged but for one thing: `timm.create_model`
  is called with ``pretrained=False`` so that its `TimmCNNEncoder` builds without downloading.
- **Needle**: ``mil extract tiles``, then ``mil extract features`` on those coords with
  ``--precision bf16`` (the `auto` choice on a CPU with native bf16), ``--precision fp32``, and
  bf16 ``--compile`` with an empty inductor cache (its compile time is the first batch, printed).
- **Encoder alone**: the Needle encoder's forward pass on random tensors of the tile shape, in this
  process, at the pipeline's batch size: the ceiling the pipeline can approach.

"slide s" is the slide's own time as each tool times it (CLAM's "computing features for … took"
line; Needle's ``extract_report.csv`` seconds less compiling): start-up and compiling are paid once
per run, so "slide tiles/s" is the rate of a run of many slides.

Agreement: per-tile cosine similarity of each Needle run's features to the fp32 run's (same coords,
same order). Tile counts differ between the tools (their tissue detection differs), so speed is
compared as tiles per second. ``--quick`` (a smoke run): a 2,048² slide, resnet18 at 64 px, no
workers, Needle only, no compile.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from mil.extract.generate.slide_writer import random_masks, write_slide

TARGET_MPP = 0.285714  # 224 px tiles from 256 level-0 px at 0.25 µm/px: CLAM's default geometry
_spec = importlib.util.spec_from_file_location("extract_memory_benchmark", Path(__file__).resolve().parent / "extract_memory.py")
_memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_memory)
WRAPPER = _memory.WRAPPER  # runs argv[1:], prints the largest max-RSS (KiB) of it and its waited-for descendants
# Runs a CLAM script from its checkout with timm's pretrained downloads turned off.
CLAM_RUNNER = (
    "import os, runpy, sys, timm; create = timm.create_model; "
    "timm.create_model = lambda name, **kw: create(name, **{**kw, 'pretrained': False}); "
    "script = sys.argv[1]; sys.argv = sys.argv[1:]; sys.path.insert(0, os.getcwd()); runpy.run_path(script, run_name='__main__')"
)


def timed(cmd: list[str], cwd: Path | None = None, env: dict | None = None) -> tuple[float, float, str]:
    """Run `cmd` in a fresh process; return (wall s, peak RSS MiB of its largest process, stdout + stderr)."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} … failed:\n{(r.stdout + r.stderr)[-3000:]}")
    rss = next(int(line.split()[1]) for line in reversed(r.stderr.splitlines()) if line.startswith("maxrss_kib "))
    return wall, rss / 1024, r.stdout + r.stderr


def make_slide(folder: Path, size: int) -> Path:
    slide = folder / "slides" / "slide.tiff"
    if not slide.exists():
        slide.parent.mkdir(parents=True, exist_ok=True)
        tissue, lesion = random_masks(size, size, rng=np.random.default_rng(0), tissue_fraction=0.4)
        write_slide(slide, tissue, lesion, width=size, height=size, mpp=0.25, seed=0)
    return slide


def run_needle(out: Path, manifest: Path, args, label: str, extra: list[str]) -> dict:
    mil = [sys.executable, "-m", "mil.cli", "extract"]
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="inductor_", dir=out))  # a cold compile
    cmd = mil + ["features", "--manifest", str(manifest), "--coords-dir", str(out / "needle_tiles"), "--out", str(out / label)]
    cmd += ["--encoder", args.encoder, "--weights", "none", "--batch-size", str(args.batch_size), "--workers", str(args.workers)]
    cmd += ["--overwrite", "--no-progress", *extra] + (["--input-size", str(args.input_size)] if args.input_size else [])
    wall, rss, err = timed(cmd, env=env)
    with h5py.File(out / label / "slide.h5", "r") as f:
        n = len(f["coords"])
    m = re.search(r"compiled the encoder in ([0-9.]+) s", err)
    compile_s = float(m.group(1)) if m else 0.0
    slide_s = float(pd.read_csv(out / label / "extract_report.csv")["seconds"].iloc[0]) - compile_s  # the slide's own time
    return {"run": label, "tiles": n, "wall s": wall, "peak RSS MiB": rss, "compile s": compile_s, "slide s": slide_s}


def run_clam(clam: Path, out: Path, slide: Path, args) -> tuple[dict, float, float]:
    """CLAM's two scripts; returns its features row, tiling wall s and tiling peak RSS MiB."""
    save, feats = out / "clam_patches", out / "clam_features"
    for d in (save, feats):  # CLAM skips slides it has done
        shutil.rmtree(d, ignore_errors=True)
    py = [sys.executable, "-c", CLAM_RUNNER]
    t_wall, t_rss, _ = timed(
        py
        + ["create_patches_fp.py", "--source", str(slide.parent), "--save_dir", str(save)]
        + ["--patch_size", "256", "--step_size", "256", "--seg", "--patch"],
        cwd=clam,
    )
    csv = save / "process_list_autogen.csv"
    f_wall, f_rss, log = timed(
        py
        + ["extract_features_fp.py", "--data_h5_dir", str(save), "--data_slide_dir", str(slide.parent), "--csv_path", str(csv)]
        + ["--feat_dir", str(feats), "--slide_ext", ".tiff", "--batch_size", str(args.clam_batch_size), "--no_auto_skip"],
        cwd=clam,
    )
    with h5py.File(feats / "h5_files" / "slide.h5", "r") as f:
        n = len(f["features"])
    slide_s = float(re.search(r"computing features for \S+ took ([0-9.]+) s", log).group(1))  # its own timer: the slide's loop
    return {"run": "CLAM", "tiles": n, "wall s": f_wall, "peak RSS MiB": f_rss, "compile s": 0.0, "slide s": slide_s}, t_wall, t_rss


def agreement(out: Path, label: str) -> float:
    """Smallest per-tile cosine similarity of `label`'s features to the fp32 run's."""
    with h5py.File(out / label / "slide.h5", "r") as a, h5py.File(out / "needle_fp32" / "slide.h5", "r") as b:
        assert np.array_equal(a["coords"][:], b["coords"][:])
        x, y = a["features"][:].astype(np.float64), b["features"][:].astype(np.float64)
    cos = (x * y).sum(1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-12)
    return float(cos.min()) if len(cos) else np.nan


def encoder_alone(args, precision: str, seconds: float = 20.0) -> float:
    """Tiles/s of the encoder's forward pass on random uint8 tiles (one warm-up batch)."""
    import warnings

    import torch

    from mil.extract.wsi.encoders import create_encoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc = create_encoder(args.encoder, precision=precision, input_size=args.input_size)
    x = torch.randint(0, 256, (args.batch_size, 224, 224, 3), dtype=torch.uint8)  # (B, T, T, 3)
    enc.encode(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        enc.encode(x)
        n += len(x)
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clam", type=Path, help="a CLAM checkout (mahmoodlab/CLAM); without it, Needle against its encoder alone")
    ap.add_argument("--size", type=int, default=20000, help="slide side in level-0 px (0.25 µm/px)")
    ap.add_argument("--encoder", default="resnet50_trunc")
    ap.add_argument("--input-size", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=16, help="mil extract features' default on a CPU")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--clam-batch-size", type=int, default=256, help="CLAM's default")
    ap.add_argument("--no-compile", action="store_true", help="leave out the --compile run")
    ap.add_argument("--out", type=Path, default=Path("bench_out/vs_clam"))
    ap.add_argument("--quick", action="store_true", help="smoke run: 2,048² slide, resnet18 at 64 px, no workers")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.encoder, args.input_size, args.workers, args.batch_size = 2048, "resnet18", 64, 0, 16
        args.clam, args.no_compile = None, True
    out = args.out.resolve()
    slide = make_slide(out, args.size)
    manifest = out / "manifest.csv"
    pd.DataFrame({"slide_id": ["slide"], "path": [str(slide)]}).to_csv(manifest, index=False)

    tiles_cmd = [sys.executable, "-m", "mil.cli", "extract", "tiles", "--manifest", str(manifest), "--out", str(out / "needle_tiles")]
    tiles_cmd += ["--target-mpp", str(TARGET_MPP), "--tile-size", "224", "--overwrite", "--no-progress"]
    n_wall, n_rss, _ = timed(tiles_cmd)
    rows, tiling = [], {"Needle": (n_wall, n_rss)}
    if args.clam is not None:
        row, c_wall, c_rss = run_clam(args.clam.resolve(), out, slide, args)
        rows.append(row)
        tiling["CLAM"] = (c_wall, c_rss)
    runs = [("needle_bf16", ["--precision", "bf16"]), ("needle_fp32", ["--precision", "fp32"])]
    runs += [] if args.no_compile else [("needle_bf16_compile", ["--precision", "bf16", "--compile"])]
    rows += [run_needle(out, manifest, args, label, extra) for label, extra in runs]
    table = pd.DataFrame(rows).set_index("run")
    table["tiles/s"] = table["tiles"] / table["wall s"]
    table["slide tiles/s"] = table["tiles"] / table["slide s"]  # without start-up and compiling: a run of many slides
    ref = "CLAM" if "CLAM" in table.index else "needle_fp32"
    table[f"× {ref}"] = table["tiles/s"] / table.loc[ref, "tiles/s"]
    table[f"slide × {ref}"] = table["slide tiles/s"] / table.loc[ref, "slide tiles/s"]
    table["cos to fp32 (min)"] = [agreement(out, r) if r.startswith("needle") else np.nan for r in table.index]
    alone = {p: encoder_alone(args, p, seconds=2.0 if args.quick else 20.0) for p in ("bf16", "fp32")}
    print(f"slide {args.size:,}² px at 0.25 µm/px; {args.encoder}, random weights; Needle batch {args.batch_size}, {args.workers} workers")
    print(table.to_string(float_format="{:,.3f}".format))
    for label in table.index:
        if label.startswith("needle"):
            p = "fp32" if "fp32" in label else "bf16"
            print(
                f"{label}: pipeline {table.loc[label, 'tiles/s']:.1f} tiles/s end to end = {table.loc[label, 'tiles/s'] / alone[p]:.2f} × its encoder alone (eager, {p}: {alone[p]:.1f} tiles/s)"
            )
    for tool, (wall, rss) in tiling.items():
        print(f"tiling alone, {tool}: {wall:.1f} s wall, peak RSS {rss:,.0f} MiB")
    if "CLAM" in tiling:
        print(f"tiling: Needle / CLAM wall = {tiling['Needle'][0] / tiling['CLAM'][0]:.2f}")
    return table


if __name__ == "__main__":
    main()
