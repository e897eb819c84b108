"""`mil extract moco`: the Typer command (thin; the work is in `mil.extract.moco.train`).

Mounted by `mil.extract.cli` with ``app.command()(moco)``. Under ``torchrun`` every process runs
this command; only rank 0 prints.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from mil.extract.options import (
    Input,
    Mag,
    Manifest,
    MaskMpp,
    Mpp,
    Overlap,
    Progress_,
    SaturationThreshold,
    SlidesRoot,
    TargetMpp,
    TissueThreshold,
    load_slides,
    resolve_target_mpp,
    tiling_config,
)


def moco(
    out: Annotated[Path, typer.Option("--out", help="ENCODER_DIR: encoder.pt, checkpoint.pt, metrics.csv, config.json, tiles/.")],
    input_path: Input = None,
    manifest: Manifest = None,
    arch: Annotated[
        str,
        typer.Option(help="Backbone: an encoder name of `mil extract features` (resnet50, resnet18, resnet50_trunc, …) or any timm model."),
    ] = "resnet50",
    epochs: Annotated[int, typer.Option(help="Passes over the sampled tiles.")] = 200,
    batch_size: Annotated[int, typer.Option(help="Global batch: tiles per step over all processes.")] = 256,
    queue: Annotated[int, typer.Option(help="Queue size K: negative keys kept from earlier batches.")] = 65536,
    momentum: Annotated[float, typer.Option(help="Momentum m of the key encoder.")] = 0.999,
    temperature: Annotated[float, typer.Option(help="Softmax temperature T.")] = 0.2,
    lr: Annotated[
        float,
        typer.Option(help="Initial learning rate (SGD, momentum 0.9, weight decay 1e-4, cosine schedule); MoCo's 0.03 is for batch 256."),
    ] = 0.03,
    dim: Annotated[int, typer.Option(help="Output size of the MLP projection head.")] = 128,
    tiles_per_slide: Annotated[Optional[int], typer.Option(help="Tiles drawn per slide (seeded); default: all.")] = None,
    steps_per_epoch: Annotated[Optional[int], typer.Option(help="At most this many steps per epoch; default: a full pass.")] = None,
    bn_splits: Annotated[
        int, typer.Option(help="BatchNorm groups per process and step; 0: auto (1 with several processes, else batch/32, at most 8).")
    ] = 0,
    splits: Annotated[
        Optional[str],
        typer.Option(
            help="Manifest splits to pretrain on, comma-separated (train,val,test); default: every split but test (slides without a split included)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the initial weights, the tile sample, the order and the augmentations.")] = 0,
    workers: Annotated[
        int, typer.Option(help="DataLoader worker processes reading and augmenting tiles (per process); 2 as for `mil extract features`.")
    ] = 2,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N (with torchrun: each process takes cuda:LOCAL_RANK).")] = "auto",
    precision: Annotated[Literal["auto", "fp32", "bf16"], typer.Option(help="auto: bf16 autocast where the hardware has it.")] = "auto",
    coords_dir: Annotated[
        Optional[Path], typer.Option(help="Folder of `mil extract tiles` output to reuse (default: ENCODER_DIR/tiles).")
    ] = None,
    target_mpp: TargetMpp = None,
    mag: Mag = None,
    tile_size: Annotated[
        int, typer.Option("--tile-size", "--patch-size", help="Tile side in px at --target-mpp (also the side of the augmented views).")
    ] = 224,
    overlap: Overlap = 0,
    tissue_threshold: TissueThreshold = 0.5,
    saturation_threshold: SaturationThreshold = None,
    mask_mpp: MaskMpp = 8.0,
    mpp: Mpp = None,
    slides_root: SlidesRoot = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an unfinished run from ENCODER_DIR/checkpoint.pt.")] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Discard a run in ENCODER_DIR made with other settings (or unfinished) and start again.")
    ] = False,
    progress: Progress_ = True,
) -> None:
    """Pretrain a tile encoder with MoCo v2 on tiles read straight from the slides (self-supervised).

    Several processes: [bold]torchrun --nproc_per_node K $(which mil) extract moco …[/bold]
    (DDP; NCCL on GPUs, gloo on CPUs). ENCODER_DIR/encoder.pt is then the --weights of
    `mil extract features --encoder ARCH`.
    """
    from mil.device import resolve_device
    from mil.extract.moco.train import MocoConfig, run_moco

    tiling = tiling_config(resolve_target_mpp(target_mpp, mag), tile_size, overlap, tissue_threshold, saturation_threshold, mask_mpp, mpp)
    config = MocoConfig(
        arch=arch,
        epochs=epochs,
        batch_size=batch_size,
        queue=queue,
        momentum=momentum,
        temperature=temperature,
        lr=lr,
        dim=dim,
        tiles_per_slide=tiles_per_slide,
        steps_per_epoch=steps_per_epoch,
        bn_splits=bn_splits,
        seed=seed,
        tiling=tiling,
        splits=splits,
    )
    slides = load_slides(input_path, slides_root, manifest)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    with warnings.catch_warnings(record=True) as caught:  # shown as plain lines
        warnings.simplefilter("always")
        result = run_moco(
            slides,
            out,
            config,
            coords_dir=coords_dir,
            device=str(resolve_device(device)),
            precision=precision,
            workers=workers,
            resume=resume,
            overwrite=overwrite,
            progress=progress,
        )
    if not rank0:
        return
    for w in caught:
        typer.echo(f"warning: {w.message}", err=True)
    if result.status == "skipped":
        typer.echo(f"{out}: finished run with these settings; nothing to do ({out / 'encoder.pt'})")
        return
    last = result.metrics.iloc[-1]
    typer.echo(
        f"wrote {result.encoder_path} ({result.status}: {result.epochs_run} epochs, final loss {last['loss']:.4f}, "
        f"{last['images_per_s']:.1f} images/s); use it with `mil extract features --encoder {arch} --weights {result.encoder_path}`"
    )


def main(argv: list[str] | None = None) -> None:
    """`python -m mil.extract.moco.cli …` (and `torchrun -m mil.extract.moco.cli …`): the command on
    its own, with `mil`'s error handling (a `MilError` is one line and exit status 2)."""
    from mil.cli_runner import run_app

    app = typer.Typer(pretty_exceptions_enable=False, add_completion=False, rich_markup_mode="rich")
    app.command()(moco)
    run_app(app, argv)


if __name__ == "__main__":
    main()
