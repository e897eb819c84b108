"""What every slide-reading `mil extract` command shares, defined once: the input (INPUT or
``--manifest``, as on every other command), the tiling options and their validation
(`tiling_config`, `stored_tiling`), and the slide table (`load_slides`).

Used by `tiles`, `features` (which tiles the slides that have no coords yet) and `moco`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mil.errors import OptionError

TILING_DEFAULTS = {
    "target_mpp": 0.5,
    "tile_size": 224,
    "overlap": 0,
    "tissue_threshold": 0.5,
    "saturation_threshold": None,
    "mask_mpp": 8.0,
    "mpp": None,
}

Input = Annotated[Optional[Path], typer.Argument(metavar="INPUT", help="Manifest CSV, or a folder of slides (or give --manifest).")]
Manifest = Annotated[Optional[Path], typer.Option("--manifest", help="Manifest CSV (the same as INPUT; the flag every command takes).")]
TargetMpp = Annotated[Optional[float], typer.Option(help="Microns per pixel of the tiles (default 0.5, or from --mag).")]
Mag = Annotated[
    Optional[float],
    typer.Option(help="Magnification instead of --target-mpp, mpp = 10 / mag (TRIDENT's convention): 40 → 0.25, 20 → 0.5, 10 → 1.0 µm/px."),
]
TileSize = Annotated[int, typer.Option("--tile-size", "--patch-size", help="Tile side in px at --target-mpp (--patch-size: the same).")]
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


def optional(option):
    """The same option with ``None`` (not given) allowed, e.g. ``optional(TargetMpp)``, for `stored_tiling`."""
    return Annotated[(Optional[option.__origin__], *option.__metadata__)]


def resolve_target_mpp(target_mpp: float | None, mag: float | None, default: float | None = TILING_DEFAULTS["target_mpp"]) -> float | None:
    """--target-mpp, or 10 / --mag (both only if they agree), else `default`."""
    if mag is None:
        return default if target_mpp is None else target_mpp
    if not mag > 0:
        raise OptionError(f"expected --mag > 0 (e.g. 20 for 0.5 µm/px), got {mag!r} instead.")
    from_mag = 10.0 / mag
    if target_mpp is not None and abs(target_mpp - from_mag) > 1e-9:
        raise OptionError(
            f"expected one resolution, got --target-mpp {target_mpp} and --mag {mag:g} (= {from_mag:g} µm/px); give one of them."
        )
    return from_mag


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


def load_slides(input_path: Path | None, slides_root: Path | None = None, manifest: Path | None = None):
    """A validated slide table from a manifest CSV or a folder of slides (slide id = file stem).

    The input is INPUT or ``--manifest`` (one of them; both only if they agree). `slides_root`
    resolves a manifest's relative paths (default: the manifest's folder)."""
    from mil.manifest import read_manifest
    from mil.slides import slides_from_folder

    if input_path is None and manifest is None:
        raise OptionError("expected the slides: a manifest CSV or a folder as INPUT, or --manifest CSV; got neither.")
    if input_path is not None and manifest is not None and Path(input_path).resolve() != Path(manifest).resolve():
        raise OptionError(f"expected one input, got INPUT {str(input_path)!r} and --manifest {str(manifest)!r}; give one of them.")
    input_path = Path(input_path if input_path is not None else manifest)
    if input_path.is_dir():
        return slides_from_folder(input_path)
    if not input_path.exists():
        raise OptionError(f"expected INPUT to be a manifest CSV or a folder of slides, got {str(input_path)!r} which does not exist.")
    return read_manifest(input_path, slides_root=slides_root)


# The tiling options of `tiling_config` → where `mil extract tiles` stores each in tiles_config.json.
_STORED = {
    "target_mpp": ("grid", "target_mpp"),
    "tile_size": ("grid", "tile_size"),
    "overlap": ("grid", "overlap"),
    "tissue_threshold": ("tissue_threshold",),
    "saturation_threshold": ("tissue", "threshold"),
    "mask_mpp": ("tissue", "mask_mpp"),
    "mpp": ("mpp",),
}


def stored_tiling(folder: Path, given: dict, defaults: dict):
    """The tiling of `folder`'s ``tiles_config.json`` when there is one, else `given` over `defaults`.

    `given` holds the tiling options the user passed (None = not passed). With a stored tiling, a
    passed option that differs from it is refused (naming both values) rather than tiling again.

    Returns:
        ``(TilingConfig, path of the tiles_config.json used or None)``.
    """
    from mil.extract.wsi.grid import GridSpec
    from mil.extract.wsi.tiles import TilingConfig
    from mil.extract.wsi.tissue import TissueParams
    from mil.rundir import read_settings

    path = Path(folder) / "tiles_config.json"
    if not path.is_file():
        return tiling_config(**{k: defaults[k] if given.get(k) is None else given[k] for k in _STORED}), None
    doc = read_settings(path, "`mil extract tiles`")
    try:
        stored = TilingConfig(GridSpec(**doc["grid"]), TissueParams(**doc["tissue"]), doc["tissue_threshold"], doc["mpp"])
    except (KeyError, TypeError) as e:
        raise OptionError(f"{path}: expected the tiling options of `mil extract tiles`, got a file without {e} instead.") from None
    as_dict = stored.as_dict()
    for name, keys in _STORED.items():
        value = as_dict
        for k in keys:
            value = value[k]
        if given.get(name) is not None and given[name] != value:
            flag = "--" + name.replace("_", "-")
            raise OptionError(
                f"expected {flag} as in {path} ({value!r}), got {given[name]!r} instead; drop {flag} to use the stored tiles, "
                "or tile again into another --coords-dir."
            )
    return stored, path
