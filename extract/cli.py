"""`mil extract …` commands. Thin: parse options, build the stage's config, call the stage."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mil.errors import OptionError

app = typer.Typer(help="Stage 1: slides → tiles → features.", no_args_is_help=True, rich_markup_mode="rich")


def load_slides(input_path: Path):
    """A validated slide table from a manifest CSV or a folder of slides (slide id = file stem)."""
    from mil.extract.slides import slides_from_folder
    from mil.manifest import read_manifest

    if input_path.is_dir():
        return slides_from_folder(input_path)
    if not input_path.exists():
        raise OptionError(f"expected INPUT to be a manifest CSV or a folder of slides, got {str(input_path)!r} which does not exist.")
    return read_manifest(input_path)


@app.command()
def synthetic(
    out_dir: Annotated[Path, typer.Argument(help="Folder for the slides, masks/ and manifest.csv.")],
    n_slides: Annotated[int, typer.Option(help="Number of slides.")] = 6,
    size: Annotated[int, typer.Option(help="Width = height of each slide in level-0 px.")] = 8192,
    fmt: Annotated[str, typer.Option("--format", help="'tiff' (generic TIFF) or 'svs' (Aperio-like).")] = "tiff",
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same cohort.")] = 0,
    mpp: Annotated[float, typer.Option(help="Level-0 microns per pixel written into the slides.")] = 0.25,
    positive_fraction: Annotated[float, typer.Option(help="Fraction of slides with a planted lesion (label 1).")] = 0.5,
    lesion_fraction: Annotated[float, typer.Option(help="Lesion area as a fraction of the tissue area.")] = 0.02,
) -> None:
    """Write a synthetic cohort: pyramidal JPEG-tiled slides with tissue, lesions, masks and a manifest."""
    from rich.progress import Progress

    from mil.extract.synthetic import make_cohort

    with Progress(transient=True) as bar:
        task = bar.add_task("writing slides", total=n_slides)
        manifest = make_cohort(
            out_dir, n_slides=n_slides, size=size, fmt=fmt, seed=seed, mpp=mpp,
            positive_fraction=positive_fraction, lesion_fraction=lesion_fraction,
            progress=lambda _sid: bar.advance(task),
        )  # fmt: skip
    typer.echo(f"wrote {n_slides} slides and {manifest}")


@app.command()
def tiles(
    input_path: Annotated[Path, typer.Argument(metavar="INPUT", help="Manifest CSV, or a folder of slides.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder for <slide_id>.h5, thumbnails/ and the report.")],
    target_mpp: Annotated[float, typer.Option(help="Microns per pixel of the tiles.")] = 0.5,
    tile_size: Annotated[int, typer.Option(help="Tile side in px at --target-mpp.")] = 224,
    overlap: Annotated[int, typer.Option(help="Overlap of neighbouring tiles in px at --target-mpp.")] = 0,
    tissue_threshold: Annotated[float, typer.Option(help="Keep tiles whose tissue fraction is at least this (0–1).")] = 0.5,
    saturation_threshold: Annotated[Optional[float], typer.Option(help="Fixed saturation threshold for tissue (0–1); default: Otsu.")] = None,
    mask_mpp: Annotated[float, typer.Option(help="Resolution (µm/px) of tissue detection.")] = 8.0,
    mpp: Annotated[Optional[float], typer.Option(help="Level-0 mpp for slides whose file (and manifest) gives none.")] = None,
    skip_errors: Annotated[bool, typer.Option("--skip-errors", help="Exit 0 even if some slides failed (they are still reported).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Re-tile slides whose output exists, even with other settings.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Detect tissue and write each slide's tile grid (coords in level-0 px) at a target mpp."""
    from mil.extract.grid import GridSpec
    from mil.extract.tiles import TilingConfig, run_tiles
    from mil.extract.tissue import TissueParams

    if not (0.0 <= tissue_threshold <= 1.0):
        raise OptionError(f"expected --tissue-threshold in [0, 1], got {tissue_threshold!r} instead.")
    if mpp is not None and not mpp > 0:
        raise OptionError(f"expected --mpp > 0 (microns per pixel, e.g. 0.25), got {mpp!r} instead.")
    config = TilingConfig(
        grid=GridSpec(target_mpp=target_mpp, tile_size=tile_size, overlap=overlap),
        tissue=TissueParams(mask_mpp=mask_mpp, threshold=saturation_threshold),
        tissue_threshold=tissue_threshold,
        mpp=mpp,
    )
    slides = load_slides(input_path)
    report = run_tiles(slides, out, config, overwrite=overwrite, progress=progress)
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
