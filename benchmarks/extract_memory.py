"""Peak memory of `mil extract features` does not grow with the number of tiles.

    python benchmarks/extract_memory.py [--tile-size 32] [--sizes 8000,50000] [--workers 2] [--precision auto] [--quick]

Runs the real CLI once per slide size in fresh processes, on a small and on a 50,000² px synthetic
slide, with tiny tiles (32 px at 0.5 µm/px) so that the large slide has a few hundred thousand
tiles, and prints tiles, wall time and peak RSS of the largest process (the CLI or one of its
workers) of each. Peak RSS comes from `getrusage(RUSAGE_CHILDREN)` in a small Python wrapper
process per run (what GNU time's %M reports, without needing /usr/bin/time). ``--quick`` (a smoke
run, seconds): 2,000² and 2,800² px slides, no workers, fp32, one thread.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mil.extract.generate.slide_writer import random_masks, write_slide

# Runs argv[1:] and prints the largest max-RSS (KiB) of it and its waited-for descendants.
WRAPPER = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print('maxrss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r.returncode)"
)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tile-size", type=int, default=32)
    ap.add_argument("--sizes", default="8000,50000")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--out", default="bench_out/memory")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2,000² and 2,800² px slides, no workers, fp32")
    args = ap.parse_args(argv)
    env = None
    if args.quick:
        args.sizes, args.workers, args.precision = "2000,2800", 0, "fp32"
        env = dict(os.environ, OMP_NUM_THREADS="1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        slide = out / f"slide_{size}.tiff"
        if not slide.exists():
            tissue, lesion = random_masks(size, size, rng=np.random.default_rng(1), tissue_fraction=0.6)
            write_slide(slide, tissue, lesion, width=size, height=size, mpp=0.25, seed=1)
        feats = out / f"features_{size}"
        manifest = out / f"m_{size}.csv"  # one row: this slide only
        pd.DataFrame({"slide_id": [f"s{size}"], "path": [str(slide.resolve())]}).to_csv(manifest, index=False)
        cmd = [
            sys.executable,
            "-c",
            WRAPPER,
            sys.executable,
            "-m",
            "mil.cli",
            "extract",
            "features",
            str(manifest),
            "--out",
            str(feats),
            "--encoder",
            "resnet18",
            "--weights",
            "none",
            "--tile-size",
            str(args.tile_size),
            "--input-size",
            str(args.tile_size),
            "--precision",
            args.precision,
            "--batch-size",
            "256",
            "--workers",
            str(args.workers),
            "--overwrite",
            "--no-progress",
        ]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            raise SystemExit(r.stderr[-2000:])
        rss_kib = next(int(line.split()[1]) for line in reversed(r.stderr.splitlines()) if line.startswith("maxrss_kib "))
        n = int(pd.read_csv(feats / "extract_report.csv")["n_tiles"][0])
        rows.append({"slide": f"{size:,}²", "tiles": n, "wall s": wall, "peak RSS MiB (largest process)": rss_kib / 1024})
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format="{:,.1f}".format))
    return table


if __name__ == "__main__":
    main()
