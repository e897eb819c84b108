"""Peak memory of `mil extract features` does not grow with the number of tiles.

    python benchmarks/extract_memory.py [--tile-size 32]

Runs the real CLI twice in fresh processes, on a small and on a 50,000² px synthetic slide,
with tiny tiles (32 px at 0.5 µm/px) so that the large slide has a few hundred thousand
tiles, and prints tiles, wall time and peak RSS (main process, largest worker) of each.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from mil.extract.synthetic import random_masks, write_slide


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tile-size", type=int, default=32)
    ap.add_argument("--sizes", default="8000,50000")
    ap.add_argument("--out", default="bench_out/memory")
    args = ap.parse_args()
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
        cmd = ["/usr/bin/time", "-f", "%M %e", sys.executable, "-m", "mil.cli", "extract", "features", str(manifest),
               "--out", str(feats), "--encoder", "resnet18", "--weights", "none", "--tile-size", str(args.tile_size), "--input-size", str(args.tile_size),
               "--batch-size", "256", "--workers", "2", "--overwrite", "--no-progress"]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(r.stderr[-2000:])
        rss_kb, wall = r.stderr.strip().splitlines()[-1].split()
        n = int(pd.read_csv(feats / "extract_report.csv")["n_tiles"][0])
        rows.append({"slide": f"{size:,}²", "tiles": n, "wall s": float(wall), "peak RSS MiB (largest process)": int(rss_kb) / 1024})
    print(pd.DataFrame(rows).to_string(index=False, float_format="{:,.1f}".format))


if __name__ == "__main__":
    main()
