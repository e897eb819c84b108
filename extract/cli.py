"""`mil extract …` commands. Thin: parse options, build the stage's config, call the stage."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from mil.extract.finetune.cli import finetune
from mil.extract.moco.cli import moco
from mil.extract.options import (
    TILING_DEFAULTS,
    Input,
    Mag,
    Manifest,
    MaskMpp,
    Mpp,
    Overlap,
    Progress_,
    SaturationThreshold,
    SkipErrors,
    SlidesRoot,
    TargetMpp,
    TileSize,
    TissueThreshold,
    load_slides,
    optional,
    resolve_target_mpp,
    stored_tiling,
    tiling_config,
)

app = typer.Typer(help="Stage 1: slides → tiles → features.", no_args_is_help=True, rich_markup_mode="rich")


@app.command()
def synthetic(
    out_dir: Annotated[Path, typer.Argument(help="Folder for the slides, masks/ and manifest.csv.")],
    n_slides: Annotated[int, typer.Option(help="Number of slides.")] = 6,
    size: Annotated[int, typer.Option(help="Width = height of each slide in level-0 px.")] = 8192,
    fmt: Annotated[Literal["tiff", "svs"], typer.Option("--format", help="'tiff' (generic TIFF) or 'svs' (Aperio-like).")] = "tiff",
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same cohort.")] = 0,
    mpp: Annotated[float, typer.Option(help="Level-0 microns per pixel written into the slides.")] = 0.25,
    positive_fraction: Annotated[float, typer.Option(help="Fraction of slides with a planted lesion (label 1).")] = 0.5,
    lesion_fraction: Annotated[float, typer.Option(help="Lesion area as a fraction of the tissue area.")] = 0.02,
    mimic_fraction: Annotated[
        float,
        typer.Option(
            help="Area of lesion-mimicking regions (lesion colours, another texture; hard negatives) as a fraction of the tissue area, on every slide; 0 for none."
        ),
    ] = 0.0,
) -> None:
    """Write a synthetic cohort: pyramidal JPEG-tiled slides with tissue, lesions, masks and a manifest."""
    from rich.progress import Progress

    from mil.extract.generate.synthetic import make_cohort

    written: list[str] = []
    with Progress(transient=True) as bar:
        task = bar.add_task("writing slides", total=n_slides)
        manifest = make_cohort(
            out_dir,
            n_slides=n_slides,
            size=size,
            fmt=fmt,
            seed=seed,
            mpp=mpp,
            positive_fraction=positive_fraction,
            lesion_fraction=lesion_fraction,
            mimic_fraction=mimic_fraction,
            progress=lambda sid: (written.append(sid), bar.advance(task)),
        )
    if written:
        typer.echo(f"wrote {len(written)} slides and {manifest}")
    else:
        typer.echo(f"{manifest}: cohort already complete with these parameters; nothing written")


@app.command()
def tiles(
    out: Annotated[Path, typer.Option("--out", help="Output folder for <slide_id>.h5, thumbnails/ and the report.")],
    input_path: Input = None,
    manifest: Manifest = None,
    target_mpp: TargetMpp = None,
    mag: Mag = None,
    tile_size: TileSize = TILING_DEFAULTS["tile_size"],
    overlap: Overlap = TILING_DEFAULTS["overlap"],
    tissue_threshold: TissueThreshold = TILING_DEFAULTS["tissue_threshold"],
    saturation_threshold: SaturationThreshold = None,
    mask_mpp: MaskMpp = TILING_DEFAULTS["mask_mpp"],
    mpp: Mpp = None,
    slides_root: SlidesRoot = None,
    skip_errors: SkipErrors = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Re-tile slides whose output exists, even with other settings.")] = False,
    progress: Progress_ = True,
) -> None:
    """Detect tissue and write each slide's tile grid (coords in level-0 px) at a target mpp."""
    from mil.extract.wsi.tiles import run_tiles

    config = tiling_config(resolve_target_mpp(target_mpp, mag), tile_size, overlap, tissue_threshold, saturation_threshold, mask_mpp, mpp)
    slides = load_slides(input_path, slides_root, manifest)
    report = run_tiles(slides, out, config, overwrite=overwrite, progress=progress)
    finish(report, out, skip_errors)


@app.command()
def features(
    out: Annotated[Path, typer.Option("--out", help="Output folder for <slide_id>.h5 feature files and the report.")],
    input_path: Input = None,
    manifest: Manifest = None,
    encoder: Annotated[
        str,
        typer.Option(
            help="Encoder: resnet50_trunc, resnet50, resnet18, vit_small_patch16_224, a pathology model (uni, uni2-h, virchow2, h-optimus-0, prov-gigapath, …: `mil extract encoders`), hf-hub:ORG/REPO, or any timm model."
        ),
    ] = "resnet50_trunc",
    weights: Annotated[
        str,
        typer.Option(
            help="'imagenet' (the encoder's own weights: timm's ImageNet weights, or a pathology model's from the Hugging Face cache), a local file (state dict .pt/.bin/.safetensors, timm or MoCo v2 checkpoint), or 'none' (random, for testing)."
        ),
    ] = "imagenet",
    precision: Annotated[
        Literal["auto", "fp32", "bf16", "fp16"],
        typer.Option(help="auto: a pathology model's own precision, else bf16 where the hardware supports it."),
    ] = "auto",
    batch_size: Annotated[
        Optional[int],
        typer.Option(
            help="Tiles per encoder batch [default: 16 on a CPU (faster than 32 or 64 there, peak RSS about 1 GB), 256 on a GPU]."
        ),
    ] = None,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes reading tiles.")] = 2,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
    dtype: Annotated[Literal["float32", "float16"], typer.Option(help="Stored feature dtype.")] = "float32",
    compile: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="torch.compile the encoder: its first batch takes seconds to minutes (once per run, or less from the on-disk cache), later batches of every slide run faster. Pays off on long runs: docs/benchmarks.md.",
        ),
    ] = False,
    input_size: Annotated[Optional[int], typer.Option(help="Override the encoder's input size (px); tiles are resized to it.")] = None,
    coords_dir: Annotated[Optional[Path], typer.Option(help="Folder of existing `mil extract tiles` output (default: --out).")] = None,
    target_mpp: TargetMpp = None,
    mag: Mag = None,
    tile_size: optional(TileSize) = None,
    overlap: optional(Overlap) = None,
    tissue_threshold: optional(TissueThreshold) = None,
    saturation_threshold: SaturationThreshold = None,
    mask_mpp: optional(MaskMpp) = None,
    mpp: Mpp = None,
    slides_root: SlidesRoot = None,
    skip_errors: SkipErrors = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Re-extract slides whose features exist, even with other settings.")
    ] = False,
    progress: Progress_ = True,
) -> None:
    """Embed every tile of every slide (tiling first where needed) into one HDF5 file per slide.

    The tiling options come from the tiles_config.json of --coords-dir (or --out) when `mil extract tiles` wrote one there; an option given here that differs from it is refused. Without one, they default as in `mil extract tiles`.
    """
    from mil.device import resolve_device
    from mil.extract.wsi.encoders import create_encoder
    from mil.extract.wsi.features import FeatureConfig, release_freed_memory, run_features

    given = dict(
        target_mpp=resolve_target_mpp(target_mpp, mag, default=None),
        tile_size=tile_size,
        overlap=overlap,
        tissue_threshold=tissue_threshold,
    )
    given |= dict(saturation_threshold=saturation_threshold, mask_mpp=mask_mpp, mpp=mpp)
    tiling, stored = stored_tiling(coords_dir or out, given, TILING_DEFAULTS)
    if stored is not None:
        typer.echo(f"tiling from {stored}", err=True)
    dev = resolve_device(device)
    batch_size = batch_size if batch_size is not None else (16 if dev.type == "cpu" else 256)
    config = FeatureConfig(tiling=tiling, batch_size=batch_size, workers=workers, dtype=dtype)
    release_freed_memory()
    slides = load_slides(input_path, slides_root, manifest)
    with warnings.catch_warnings(record=True) as caught:  # e.g. random weights: shown as one plain line
        warnings.simplefilter("always")
        enc = create_encoder(encoder, weights=weights, precision=precision, device=str(dev), input_size=input_size, compile=compile)
    for w in caught:
        typer.echo(f"warning: {w.message}", err=True)
    report = run_features(slides, out, enc, config, coords_dir=coords_dir, overwrite=overwrite, progress=progress)
    finish(report, out, skip_errors)


@app.command()
def encoders() -> None:
    """List the pathology foundation models `--encoder` knows: feature dim, input size, precision, output rule, weights source.

    Their weights come from the Hugging Face cache (HF_HOME), else the hub (gated models: request access and `huggingface-cli login` first; never with HF_HUB_OFFLINE=1), or from --weights PATH.
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from mil.extract.wsi.hub import BUILTIN, ENTRIES

    table = Table(title="mil extract features --encoder NAME", title_justify="left", box=box.SIMPLE, pad_edge=False, collapse_padding=True)
    for col in ("name", "dim", "input", "precision", "output", "hf-hub repo"):
        table.add_column(col, justify="right" if col in ("dim", "input") else "left", overflow="fold", min_width=len(col))
    for e in ENTRIES.values():
        table.add_row(e.name, str(e.dim), str(e.input_size), e.precision, e.output, e.repo)
    console = Console()
    console.print(table)
    console.print(
        f"Also: {', '.join(BUILTIN)} (timm, --weights imagenet), any timm model name, and hf-hub:ORG/REPO for a timm model on the hub."
    )


@app.command("import-csv")
def import_csv(
    csv: Annotated[Path, typer.Argument(help="Headerless CSV, one row per instance: label, bag id, features …")],
    out: Annotated[Path, typer.Option("--out", help="Folder for one <bag_id>.h5 per bag and manifest.csv.")],
    label_col: Annotated[int, typer.Option(help="0-based column of the bag label (0/1 or -1/1).")] = 0,
    bag_col: Annotated[int, typer.Option(help="0-based column of the bag id.")] = 1,
    prefix: Annotated[str, typer.Option(help="Prepended to every bag id, e.g. 'musk1_'.")] = "",
) -> None:
    """Convert a classical MIL table (label, bag id, features; no header) into feature files + manifest."""
    from mil.extract.generate.import_csv import import_csv_table

    r = import_csv_table(csv, out, label_col=label_col, bag_col=bag_col, prefix=prefix or None)
    typer.echo(f"wrote {r.n_bags} bags ({r.n_instances} instances, {r.n_features} features) and {r.manifest}")


def finish(report, out: Path, skip_errors: bool) -> None:
    """Print a batch stage's report; exit 1 if a slide failed (0 with --skip-errors)."""
    print_report(report, out / "extract_report.csv")
    if (report["status"] == "error").any() and not skip_errors:
        raise typer.Exit(1)


def print_report(report, path: Path) -> None:
    """A summary table of a stage report on the terminal."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{path}", title_justify="left")
    for col in ("slide_id", "status", "n_tiles", "seconds", "error"):
        table.add_column(col, justify="right" if col in {"n_tiles", "seconds"} else "left", overflow="fold")
    for r in report.itertuples(index=False):
        style = {"error": "red", "empty": "yellow", "skipped": "dim"}.get(r.status, "")
        table.add_row(r.slide_id, r.status, f"{r.n_tiles:,}", f"{r.seconds:.2f}", r.error, style=style)
    counts = report["status"].value_counts().to_dict()
    Console().print(table)
    Console().print(", ".join(f"{v} {k}" for k, v in counts.items()) + f"; {int(report['n_tiles'].sum()):,} tiles")


@app.command()
def needles(
    out: Annotated[Path, typer.Option("--out", help="Parent folder: one image set per canvas, OUT/canvas_<size>/.")],
    target: Annotated[int, typer.Option(help="Class whose presence makes a canvas positive (e.g. 3).")],
    canvas: Annotated[str, typer.Option(help="Canvas sides in px, comma-separated, e.g. 64,128,256.")],
    idx_dir: Annotated[Optional[Path], typer.Option(help="Folder with the four MNIST-format IDX files (plain or .gz).")] = None,
    source: Annotated[
        Optional[str], typer.Option(help="'sklearn-digits': scikit-learn's bundled 8×8 digits, upscaled to 28×28 (offline).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed; same seed, identical image sets.")] = 0,
    duplicates: Annotated[int, typer.Option(help="Times each target object is used, each with fresh clutter.")] = 2,
    val_size: Annotated[Optional[int], typer.Option(help="Objects at the end of the IDX train file that form val (default 5000).")] = None,
    max_per_split: Annotated[
        Optional[str], typer.Option(help="Caps on canvases for train,val,test, e.g. 2000,500,500 (balance kept).")
    ] = None,
    clutter_density: Annotated[Optional[float], typer.Option(help="Distractors per 64×64 px instead of the paper's table (≈1.56).")] = None,
    object_size: Annotated[
        Optional[int], typer.Option(help="Resize the objects to this side in px (e.g. 7: 128² canvases have 512²'s O2I).")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace image sets made with other options.")] = False,
    progress: Progress_ = True,
) -> None:
    """nMNIST-style image sets: one target object among clutter in large canvases (O2I study)."""
    from mil.extract.generate.folders import parse_ints
    from mil.extract.generate.needles import run_needles, summary

    results = run_needles(
        out,
        target=target,
        canvases=parse_ints(canvas, "--canvas"),
        idx_dir=idx_dir,
        source=source or "idx",
        seed=seed,
        duplicates=duplicates,
        val_size=val_size,
        max_per_split=parse_ints(max_per_split, "--max-per-split", 3),
        clutter_density=clutter_density,
        object_size=object_size,
        overwrite=overwrite,
        progress=progress,
    )
    for r in results:
        typer.echo(summary(r))


@app.command()
def crops(
    manifest: Annotated[Path, typer.Option(help="Manifest CSV with slide_id, path, label and split columns.")],
    masks: Annotated[
        Path, typer.Option(help="Folder of lesion masks <slide_id>_lesion.png (or <slide_id>.png) covering each positive slide.")
    ],
    out: Annotated[Path, typer.Option("--out", help="The image-set folder to write.")],
    size: Annotated[int, typer.Option(help="Crop side in px.")] = 256,
    o2i: Annotated[str, typer.Option(help="Range LOW-HIGH of the lesion fraction of positive crops, e.g. 0.01-0.1.")] = "0.01-0.1",
    level: Annotated[Optional[int], typer.Option(help="Pyramid level to crop at (default 0).")] = None,
    level_mpp: Annotated[Optional[float], typer.Option(help="Crop at this many µm per px instead of a level.")] = None,
    per_lesion: Annotated[int, typer.Option(help="Positive crops per lesion component at most.")] = 50,
    per_slide: Annotated[int, typer.Option(help="Negative crops per negative slide at most.")] = 100,
    seed: Annotated[int, typer.Option(help="Random seed; same seed, identical image set.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an image set made with other options.")] = False,
    progress: Progress_ = True,
) -> None:
    """nCAMELYON-style image set: crops holding one whole lesion (positives) or none (negative slides)."""
    from mil.extract.generate.crops import CropConfig, parse_range, run_crops, summary

    config = CropConfig(
        size=size, o2i=parse_range(o2i), level=level, level_mpp=level_mpp, per_lesion=per_lesion, per_slide=per_slide, seed=seed
    )
    typer.echo(summary(run_crops(manifest, masks, out, config, overwrite=overwrite, progress=progress)))


app.command()(finetune)  # `mil extract finetune`: the HNM-WSI loop (extract/finetune/cli.py)
app.command()(moco)  # `mil extract moco`: defined in moco_cli.py, which torchrun can also run as a module
