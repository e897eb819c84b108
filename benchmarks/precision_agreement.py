"""How close bf16-autocast features are to fp32 features, on real tiles of a synthetic slide.

    python benchmarks/precision_agreement.py [--encoders resnet18,resnet50_trunc,vit_small_patch16_224] [--tiles 100] [--quick]

Same weights (random, seeded: no weights can be downloaded here), same tiles; prints per-tile
cosine similarity and relative L2 error of the bf16 features against fp32. ``--quick`` (a smoke
run): resnet18 on 8 tiles of a 2,048² px slide.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mil.extract.generate.slide_writer import random_masks, write_slide
from mil.extract.wsi.encoders import create_encoder
from mil.extract.wsi.reader import TileDataset
from mil.extract.wsi.tiles import TilingConfig, run_tiles


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoders", default="resnet18,resnet50_trunc,vit_small_patch16_224")
    ap.add_argument("--tiles", type=int, default=100)
    ap.add_argument("--size", type=int, default=8192, help="side of the synthetic slide in px (0.5 µm/px)")
    ap.add_argument("--quick", action="store_true", help="smoke run: resnet18, 8 tiles of a 2,048² px slide")
    args = ap.parse_args(argv)
    if args.quick:
        args.encoders, args.tiles, args.size = "resnet18", 8, 2048
    size = args.size
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tissue, lesion = random_masks(size, size, rng=np.random.default_rng(0), tissue_fraction=0.6, lesion_fraction=0.05)
        write_slide(tmp / "s.tiff", tissue, lesion, width=size, height=size, mpp=0.5, seed=0)
        slides = pd.DataFrame({"slide_id": ["s"], "path": [str(tmp / "s.tiff")], "mpp": [np.nan]})
        run_tiles(slides, tmp, TilingConfig(), progress=False)
        ds = TileDataset.from_coords_file(tmp / "s.h5", tmp / "s.tiff")
        idx = np.linspace(0, len(ds) - 1, min(args.tiles, len(ds))).astype(int)
        tiles = torch.from_numpy(np.stack([ds[i] for i in idx]))  # (n, 224, 224, 3)
    rows = []
    for name in args.encoders.split(","):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = create_encoder(name, weights="none", precision="fp32").encode(tiles)  # (n, D)
            b = create_encoder(name, weights="none", precision="bf16").encode(tiles)  # (n, D)
        cos = torch.nn.functional.cosine_similarity(a, b, dim=1)  # (n,)
        rel = (a - b).norm(dim=1) / a.norm(dim=1)  # (n,)
        rows.append(
            {
                "encoder": name,
                "tiles": len(tiles),
                "cosine min": cos.min().item(),
                "cosine mean": cos.mean().item(),
                "rel. L2 error mean": rel.mean().item(),
                "rel. L2 error max": rel.max().item(),
            }
        )
    table = pd.DataFrame(rows)
    with pd.option_context("display.float_format", "{:.5f}".format, "display.width", 160):
        print(table.to_string(index=False))
    return table


if __name__ == "__main__":
    main()
