"""bf16 on a CPU: autocast (what `Encoder` does) against the whole model cast to bf16 (tried, not adopted).

    python benchmarks/bf16_cast.py [--encoder resnet50_trunc] [--batch-size 16] [--rounds 5] [--quick]

Both hold the same random weights and get the same uint8 tiles. "autocast" is the encoder as
`mil extract features --precision bf16` runs it: fp32 weights under ``torch.autocast("cpu",
torch.bfloat16)``, which runs convolutions and linear layers in bf16 and keeps batch norm, layer
norm and softmax in fp32. "cast" is the alternative: the model's weights and activations in bf16
(``model.to(torch.bfloat16)``), so oneDNN's bf16 kernels run every layer. The rounds interleave the
two (alternating which goes first), one warm-up batch each; prints the median tiles/s of each,
the per-round ratio's median and range, and the smallest per-tile cosine similarity between them.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mil.extract.wsi.encoders import create_encoder


def rate(fn, x: torch.Tensor, batches: int) -> float:
    t0 = time.perf_counter()
    for _ in range(batches):
        fn(x)
    return batches * len(x) / (time.perf_counter() - t0)


def cast_encoder(enc) -> Callable[[torch.Tensor], torch.Tensor]:
    """`enc`'s model cast to bf16, with `enc`'s preprocessing: uint8 tiles (B, H, W, 3) → (B, D) float32."""
    model = copy.deepcopy(enc.model).to(torch.bfloat16)
    mean, std = torch.tensor(enc.mean).view(1, 3, 1, 1), torch.tensor(enc.std).view(1, 3, 1, 1)

    @torch.inference_mode()
    def encode(tiles: torch.Tensor) -> torch.Tensor:
        x = (tiles.permute(0, 3, 1, 2).float() / 255 - mean) / std  # (B, 3, H, W)
        if x.shape[-1] != enc.input_size:
            x = F.interpolate(x, size=(enc.input_size,) * 2, mode="bilinear", antialias=True)  # (B, 3, S, S)
        return model(x.contiguous(memory_format=torch.channels_last).to(torch.bfloat16)).float()  # (B, D)

    return encode


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", default="resnet50_trunc")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--batches", type=int, default=6, help="batches per measurement")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="smoke run: resnet18 at 64 px, 2 rounds of 2 batches")
    args = ap.parse_args(argv)
    size = None
    if args.quick:
        args.encoder, args.batch_size, args.batches, args.rounds, size = "resnet18", 4, 2, 2, 64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        autocast = create_encoder(args.encoder, precision="bf16", device="cpu", input_size=size)
    cast = cast_encoder(autocast)
    x = torch.randint(0, 256, (args.batch_size, 224, 224, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cos = F.cosine_similarity(cast(x), autocast.encode(x)).min().item()  # also the warm-up
    rates: dict[str, list[float]] = {"autocast": [], "cast": []}
    for r in range(args.rounds):
        for name in ("autocast", "cast") if r % 2 == 0 else ("cast", "autocast"):
            rates[name].append(rate(cast if name == "cast" else autocast.encode, x, args.batches))
    ratios = [c / a for c, a in zip(rates["cast"], rates["autocast"])]
    print(f"{args.encoder}, batch {args.batch_size}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds")
    for name, v in rates.items():
        print(f"  bf16 {name:8s}: {statistics.median(v):7.1f} tiles/s (median; range {min(v):.1f}..{max(v):.1f})")
    print(f"  cast / autocast: {statistics.median(ratios):.2f}x (range {min(ratios):.2f}..{max(ratios):.2f}); cosine min {cos:.6f}")
    return {"autocast": rates["autocast"], "cast": rates["cast"], "ratios": ratios, "cosine_min": cos}


if __name__ == "__main__":
    main()
