"""Tiling benchmark: tissue detection + grid on 20,000² and 50,000² slides, and tile-reader throughput.

    python benchmarks/tiling.py [--sizes 20000,50000] [--tiles 2000] [--out bench_out/tiling] [--quick]

Writes synthetic slides (timed separately: slide writing is not tiling), then for each slide
times the tiling stage's steps, and reads tiles with `TileDataset` next to the reference, a bare
`OpenSlide.read_region` loop over the same coordinates in the same process, so the ratio shows
the reader's overhead on this machine whatever its speed. ``--quick`` (a smoke run, seconds): one
2,000² px slide, 100 tiles per throughput measurement.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from mil.extract.generate.slide_writer import random_masks, write_slide
from mil.extract.wsi.grid import tile_grid, tissue_fraction
from mil.extract.wsi.reader import TileDataset
from mil.extract.wsi.tiles import TilingConfig, run_tiles
from mil.extract.wsi.tissue import detect_tissue, read_low_res
from mil.slides import open_slide, slide_geometry


def timed(fn, *a, **kw):
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t0


def tile_steps(path: Path, config: TilingConfig) -> dict:
    """Seconds per tiling step for one slide (the same calls `tile_slide` makes)."""
    slide = open_slide(path)
    geom = slide_geometry(slide, path)
    (rgb, ds), t_read = timed(read_low_res, slide, geom, config.tissue.mask_mpp)
    slide.close()
    (mask, _), t_detect = timed(detect_tissue, rgb, ds * geom.level0_mpp, config.tissue)
    size0 = config.grid.tile_size_level0(geom.level0_mpp)
    t0 = time.perf_counter()
    coords = tile_grid(geom.width, geom.height, config.grid, geom.level0_mpp)
    frac = tissue_fraction(mask, ds, coords, size0)
    t_grid = time.perf_counter() - t0
    return {
        "low-res read s": t_read,
        "tissue s": t_detect,
        "grid s": t_grid,
        "grid tiles": len(coords),
        "kept tiles": int((frac >= config.tissue_threshold).sum()),
    }


def reader_throughput(ds: TileDataset, order: np.ndarray, workers: int) -> float:
    """Tiles per second through `TileDataset` (optionally in DataLoader worker processes)."""
    sub = torch.utils.data.Subset(ds, order.tolist())
    loader = DataLoader(sub, batch_size=64, num_workers=workers, collate_fn=lambda b: len(b))
    t0 = time.perf_counter()
    n = sum(loader)
    return n / (time.perf_counter() - t0)


def raw_throughput(path: Path, coords: np.ndarray, level: int, read: int) -> float:
    """Reference: a bare read_region loop, no resizing, no conversion."""
    slide = open_slide(path)
    t0 = time.perf_counter()
    for x, y in coords:
        slide.read_region((int(x), int(y)), level, (read, read))
    dt = time.perf_counter() - t0
    slide.close()
    return len(coords) / dt


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="20000,50000")
    ap.add_argument("--tiles", type=int, default=2000, help="tiles read per throughput measurement")
    ap.add_argument("--out", default="bench_out/tiling")
    ap.add_argument("--quick", action="store_true", help="smoke run: one 2,000² px slide, 100 tiles")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.tiles = "2000", 100
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = TilingConfig()
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        path = out / f"bench_{size}.tiff"
        if not path.exists():
            tissue, lesion = random_masks(size, size, rng=np.random.default_rng(size), lesion_fraction=0.02)
            _, t_write = timed(write_slide, path, tissue, lesion, width=size, height=size, mpp=0.25, seed=size)
            print(f"wrote {path} ({size:,}² px) in {t_write:.1f} s")
        steps = tile_steps(path, config)
        slides = pd.DataFrame({"slide_id": [f"s{size}"], "path": [str(path)], "mpp": [np.nan]})
        rep, t_stage = timed(run_tiles, slides, out / "tiles", config, overwrite=True, progress=False)
        ds = TileDataset.from_coords_file(out / "tiles" / f"s{size}.h5", path)
        rng = np.random.default_rng(0)
        n = min(args.tiles, len(ds))
        grid_order, rand_order = np.arange(n), rng.choice(len(ds), size=n, replace=False)
        ds[0]  # open the slide and pick the level
        raw = raw_throughput(path, ds.coords[rand_order], ds._level, ds._read)
        reader_random = reader_throughput(ds, rand_order, 0)  # the same measurement in the row and in the ratio
        rows.append(
            {
                "slide": f"{size:,}²",
                **steps,
                "whole stage s": t_stage,
                "reader grid tiles/s": reader_throughput(ds, grid_order, 0),
                "reader random tiles/s": reader_random,
                "read_region random tiles/s (ref)": raw,
                "reader random / ref": reader_random / raw,
                "reader 2 workers tiles/s": reader_throughput(ds, rand_order, 2),
            }
        )
    table = pd.DataFrame(rows).set_index("slide").T
    with pd.option_context("display.float_format", "{:,.2f}".format, "display.width", 160):
        print(table.to_string())
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")
    return table


if __name__ == "__main__":
    main()
