"""Heatmap benchmark: `render_heatmap` on a 50,000² px synthetic slide takes seconds, in memory bounded by the thumbnail.

    python benchmarks/heatmap.py [--size 50000] [--tile-size 224] [--thumbnails 512,1024,2048] [--out bench_out/heatmap] [--quick]

Setup (not timed as heatmap work): a synthetic slide, its tiles from the real tiling stage, a
feature file of random (N, 1024) features for those tiles, and a 1-epoch `abmil` run on a few
tiny random bags (the big slide is the run's test slide). Then, per thumbnail size, a fresh
process renders the heatmap and reports its wall time and peak RSS, next to the reference
measured in the same run: the same process's RSS after imports and after reading the bag, and
the time and memory of OpenSlide's own `get_thumbnail` plus the model's forward pass, the floor
of any heatmap of this slide. Peaks are VmHWM reset (via /proc/self/clear_refs) after the imports
and a first read of the bag, so the import-time peak of torch does not hide the call's own; the
heatmap call reads the bag a second time, which its increment includes. Linux only: without a
writable /proc/self/clear_refs the script stops with one line (exit 2). ``--quick`` (a smoke run):
a 3,000² px slide, 16 features, one 256 px thumbnail.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

CHILD = r"""
import json, sys, time
t_start = time.perf_counter()
def status(key):  # MiB; VmHWM is the peak since the last reset
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":")) / 1024
import numpy as np, torch, matplotlib.figure, openslide
import mil.evaluate.run  # what the call imports (sklearn, via mil.train): paid once per process, timed apart
from mil.evaluate.heatmap import render_heatmap
from mil.features import read_bag
from mil.checkpoint import load_head
run, manifest, slide, feats, out, size = sys.argv[1:7]
r = {"rss_imports": status("VmRSS"), "import_s": time.perf_counter() - t_start}
bag = read_bag(feats, dtype=np.float32)
r["rss_bag"] = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM: the peak is measured from here
    f.write("5")
t0 = time.perf_counter()
if sys.argv[7] == "reference":
    model, _ = load_head(run + "/checkpoints/split.pt")
    with torch.no_grad():
        model(torch.from_numpy(bag.features)[None])
    openslide.OpenSlide(slide).get_thumbnail((int(size), int(size)))
else:
    render_heatmap(run, "big", manifest, out=out, thumbnail_size=int(size))
r["seconds"] = time.perf_counter() - t0
r["rss_peak"] = status("VmHWM")
print(json.dumps(r))
"""


def setup(out: Path, size: int, tile_size: int, dim: int) -> tuple[Path, Path, Path, Path, int]:
    """Slide, manifest, feature file and run directory (reused when present); returns them and N."""
    from mil.extract.generate.slide_writer import random_masks, write_slide
    from mil.extract.wsi.grid import GridSpec
    from mil.extract.wsi.tiles import TilingConfig, run_tiles
    from mil.manifest import read_manifest
    from mil.train.loop import TrainConfig
    from mil.train.run import run_train

    out.mkdir(parents=True, exist_ok=True)
    slide, manifest = out / f"slide_{size}.tiff", out / "slides.csv"
    if not slide.exists():
        t0 = time.perf_counter()
        tissue, lesion = random_masks(size, size, rng=np.random.default_rng(0), tissue_fraction=0.6, lesion_fraction=0.02)
        write_slide(slide, tissue, lesion, width=size, height=size, mpp=0.25, seed=0)
        print(f"wrote {slide} ({size:,}² px) in {time.perf_counter() - t0:.0f} s")
    pd.DataFrame({"slide_id": ["big"], "path": [slide.name]}).to_csv(manifest, index=False)
    tiles = out / f"tiles_{size}_{tile_size}"
    run_tiles(read_manifest(manifest), tiles, TilingConfig(grid=GridSpec(tile_size=tile_size)), progress=False)
    with h5py.File(tiles / "big.h5") as f:
        coords, attrs = f["coords"][()], dict(f["coords"].attrs)  # (N, 2)
    feats = out / f"features_{size}_{tile_size}"
    feats.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    rows = [{"slide_id": "big", "path": "x", "label": 1, "split": "test"}]
    for sid, n in [("big", len(coords))] + [(f"b{i}", 20) for i in range(4)]:
        with h5py.File(feats / f"{sid}.h5", "w") as f:
            f.create_dataset("features", data=rng.standard_normal((n, dim), dtype=np.float32), chunks=(min(n, 256), dim))
            c = f.create_dataset("coords", data=coords if sid == "big" else np.zeros((n, 2), np.int64))
            c.attrs.update(attrs)
            f.attrs.update(slide_id=sid, encoder="random", encoder_weights_sha256="none", feature_dim=dim, mil_version="bench")
        if sid != "big":
            rows.append({"slide_id": sid, "path": "x", "label": int(sid[1:]) % 2, "split": "val" if sid in ("b2", "b3") else "train"})
    pd.DataFrame(rows).to_csv(out / "train.csv", index=False)
    run_train(feats, read_manifest(out / "train.csv", check_files=False), out / "run", TrainConfig(epochs=1), overwrite=True)
    return slide, manifest, feats / "big.h5", out / "run", len(coords)


def child(run: Path, manifest: Path, slide: Path, feats: Path, png: Path, size: int, mode: str) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", CHILD, str(run), str(manifest), str(slide), str(feats), str(png), str(size), mode],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=50_000)
    ap.add_argument("--tile-size", type=int, default=224, help="px at 0.5 µm/px (224 → 448 level-0 px)")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--thumbnails", default="512,1024,2048")
    ap.add_argument("--out", default="bench_out/heatmap")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3,000² px slide, 16 features, one 256 px thumbnail")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.dim, args.thumbnails = 3000, 16, "256"
    if not os.access("/proc/self/clear_refs", os.W_OK):
        print(
            "error: heatmap.py needs a writable /proc/self/clear_refs (Linux procfs) to reset the peak-RSS counter; "
            "run it on Linux with /proc mounted",
            file=sys.stderr,
        )
        raise SystemExit(2)
    out = Path(args.out)
    slide, manifest, feats, run, n = setup(out, args.size, args.tile_size, args.dim)
    print(f"{args.size:,}² px slide, {n:,} tiles × {args.dim} features, abmil checkpoint")
    rows = []
    for size in [int(s) for s in args.thumbnails.split(",")]:
        ref = child(run, manifest, slide, feats, out / "ref.png", size, "reference")
        hm = child(run, manifest, slide, feats, out / f"heatmap_{size}.png", size, "heatmap")
        t0 = time.perf_counter()
        cli = subprocess.run(
            [
                sys.executable,
                "-m",
                "mil.cli",
                "evaluate",
                "heatmap",
                str(run),
                "--slide",
                "big",
                "--slides",
                str(manifest),
                "--out",
                str(out / f"cli_{size}.png"),
                "--thumbnail-size",
                str(size),
            ],
            capture_output=True,
            text=True,
        )
        if cli.returncode != 0:
            raise SystemExit(cli.stderr[-3000:])
        rows.append(
            {
                "thumbnail px": size,
                "`mil evaluate heatmap` end to end s": time.perf_counter() - t0,
                "imports s (torch, sklearn, matplotlib)": hm["import_s"],
                "heatmap call s": hm["seconds"],
                "ref s (get_thumbnail + forward)": ref["seconds"],
                "heatmap / ref": hm["seconds"] / ref["seconds"],
                "RSS after imports MiB": hm["rss_imports"],
                "RSS with bag MiB": hm["rss_bag"],
                "peak RSS during call MiB": hm["rss_peak"],
                "peak − with bag MiB": hm["rss_peak"] - hm["rss_bag"],
                "ref peak − with bag MiB": ref["rss_peak"] - ref["rss_bag"],
            }
        )
    table = pd.DataFrame(rows)
    with pd.option_context("display.float_format", "{:,.2f}".format, "display.width", 200):
        print(table.set_index("thumbnail px").T.to_string())
    print(f"figures: {out}/heatmap_<px>.png")
    return table


if __name__ == "__main__":
    main()
