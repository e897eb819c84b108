"""Feature-extraction throughput: the whole pipeline against the encoder alone, in one run.

    python benchmarks/extract_throughput.py [--encoders resnet18,resnet50_trunc] [--precision auto]
        [--size 16384] [--batch-size 32] [--workers 2] [--device cpu]

For each encoder: (a) the encoder's forward pass alone on random, already normalised tensors of
the tile shape, batch size and precision the pipeline uses; (b) `run_features` on one synthetic
slide — tissue detection, tile reading and decoding in worker processes, normalisation, the
encoder, HDF5 writing — timed end to end. Prints tiles/s of both and the ratio (b)/(a); the
design goal is ≥ 0.90. Also prints peak RSS of the main process and of the worker processes.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mil.extract.encoders import create_encoder
from mil.extract.features import FeatureConfig, run_features
from mil.extract.synthetic import random_masks, write_slide
from mil.extract.tiles import TilingConfig


def encoder_alone(encoder, n_tiles: int, batch_size: int) -> float:
    """Tiles/s of the encoder's forward pass on random normalised input (the reference)."""
    s = encoder.input_size
    x = torch.randn(batch_size, 3, s, s, device=encoder.device).contiguous(memory_format=torch.channels_last)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(encoder.precision)
    device_type = torch.device(encoder.device).type

    def step() -> None:
        with torch.inference_mode(), torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
            encoder(x)
        if device_type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (allocations, oneDNN kernels)
    n_batches = max(1, round(n_tiles / batch_size))
    t0 = time.perf_counter()
    for _ in range(n_batches):
        step()
    return n_batches * batch_size / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoders", default="resnet18,resnet50_trunc")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--size-um", type=float, default=4096.0, help="slide side in microns")
    ap.add_argument("--slide-mpp", default="0.5,0.25",
                    help="level-0 µm/px of the test slides: 0.5 reads 224 px tiles as they are, "
                         "0.25 reads 448 px and halves them (no 2x pyramid level)")  # fmt: skip
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of each; medians are reported")
    ap.add_argument("--out", default="bench_out/extract")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = FeatureConfig(tiling=TilingConfig(), batch_size=args.batch_size, workers=args.workers)
    rows = []
    for slide_mpp in [float(m) for m in args.slide_mpp.split(",")]:
        size = round(args.size_um / slide_mpp)
        slide = out / f"slide_{slide_mpp}.tiff"
        if not slide.exists():
            tissue, lesion = random_masks(size, size, rng=np.random.default_rng(0), tissue_fraction=0.6, lesion_fraction=0.05)
            write_slide(slide, tissue, lesion, width=size, height=size, mpp=slide_mpp, seed=0)
        slides = pd.DataFrame({"slide_id": ["bench"], "path": [str(slide)], "mpp": [np.nan]})
        for name in args.encoders.split(","):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # random weights: speed does not depend on them
                enc = create_encoder(name, weights="none", precision=args.precision, device=args.device)
            feat_dir = out / f"features_{name}_{slide_mpp}"
            # Alternate reference and pipeline runs and take medians: this machine is shared and noisy.
            refs, pipes = [], []
            for _ in range(args.repeats):
                shutil.rmtree(feat_dir, ignore_errors=True)
                t0 = time.perf_counter()
                report = run_features(slides, feat_dir, enc, config, progress=False)
                n = int(report["n_tiles"][0])
                pipes.append(n / (time.perf_counter() - t0))
                refs.append(encoder_alone(enc, n, args.batch_size))
            ref, pipe = float(np.median(refs)), float(np.median(pipes))
            rows.append({"slide µm/px": slide_mpp, "encoder": name, "precision": enc.precision, "tiles": n,
                         "encoder alone tiles/s": ref, "pipeline tiles/s": pipe, "ratio": pipe / ref})  # fmt: skip
    table = pd.DataFrame(rows)
    with pd.option_context("display.float_format", "{:,.2f}".format, "display.width", 160):
        print(table.to_string(index=False))
    print(f"threads: torch {torch.get_num_threads()}, workers {args.workers}, batch {args.batch_size}, device {args.device}")
    print(f"peak RSS: main process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB, "
          f"largest worker {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:,.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
