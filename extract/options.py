"""What every slide-reading `mil extract` command shares, defined once: the input, the tiling
options and their validation (`tiling_config`), and the slide table (`load_slides`).

Used by `tiles`, `features` (which tiles the slides that have no coords yet) and `moco`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mil.errors import OptionError

Input = Annotated[Path, typer.Argument(metavar="INPUT", help="Manifest CSV, or a folder of slides.")]
TargetMpp = Annotated[float, typer.Option(help="Microns per pixel of the tiles.")]
TileSize = Annotated[int, typer.Option(help="Tile side in px at --target-mpp.")]
Overlap = Annotated[int, typer.Option(help="Overlap of neighbouring tiles in px at --target-mpp.")]
TissueThreshold = Annotated[float, typer.Option(help="Keep tiles whose tissue fraction is at least this (0–1).")]
SaturationThreshold = Annotated[Optional[float], typer.Option(help="Fixed saturation threshold for tissue (0–1); default: Otsu.")]
MaskMpp = Annotated[float, typer.Option(help="Resolution (µm/px) of tissue detection.")]
Mpp = Annotated[Optional[float], typer.Option(help="Level-0 mpp for slides whose file (and manifest) gives none.")]
SkipErrors = Annotated[bool, typer.Option("--skip-errors", help="Exit 0 even if some slides failed (they are still reported).")]
Progress_ = Annotated[bool, typer.Option(help="Show a progress bar.")]
SlidesRoot = Annotated[
    Optional[Path], typer.Option(help="Folder that the manifest's relative slide paths start from (default: the manifest's folder).")
]


def tiling_config(target_mpp, tile_size, overlap, tissue_threshold, saturation_threshold, mask_mpp, mpp):
    """Validate the tiling options and build the tiles stage's config."""
    from mil.extract.wsi.grid import GridSpec
    from mil.extract.wsi.tiles import TilingConfig
    from mil.extract.wsi.tissue import TissueParams

    if not (0.0 <= tissue_threshold <= 1.0):
        raise OptionError(f"expected --tissue-threshold in [0, 1], got {tissue_threshold!r} instead.")
    if mpp is not None and not mpp > 0:
        raise OptionError(f"expected --mpp > 0 (microns per pixel, e.g. 0.25), got {mpp!r} instead.")
    return TilingConfig(
        grid=GridSpec(target_mpp=target_mpp, tile_size=tile_size, overlap=overlap),
        tissue=TissueParams(mask_mpp=mask_mpp, threshold=saturation_threshold),
        tissue_threshold=tissue_threshold,
        mpp=mpp,
    )


def load_slides(input_path: Path, slides_root: Path | None = None):
    """A validated slide table from a manifest CSV or a folder of slides (slide id = file stem).

    `slides_root` resolves a manifest's relative paths (default: the manifest's folder)."""
    from mil.manifest import read_manifest
    from mil.slides import slides_from_folder

    if input_path.is_dir():
        return slides_from_folder(input_path)
    if not input_path.exists():
        raise OptionError(f"expected INPUT to be a manifest CSV or a folder of slides, got {str(input_path)!r} which does not exist.")
    return read_manifest(input_path, slides_root=slides_root)
