"""`mil extract tiles`: tissue detection and tile grids for a batch of slides.

Output folder layout (shared with `mil extract features`)::

    OUT/<slide_id>.h5              coords (N, 2) int64 level-0 px + attrs, tissue_fraction (N,), tissue_mask
    OUT/thumbnails/<slide_id>.png  thumbnail with the tissue outline and the kept tiles
    OUT/extract_report.csv         slide_id, status, n_tiles, seconds, error   (this run)
    OUT/tiles_config.json          every resolved option of the last run

Every file is written under a temporary name and renamed when whole. A rerun skips slides whose
file exists with the same settings and refuses, before any work, when the settings differ.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
from skimage.segmentation import find_boundaries

import mil
from mil.atomic import atomic_path, remove_stale_temporaries
from mil.errors import SettingsMismatchError, SlideError
from mil.extract.wsi.grid import GridSpec, tile_grid, tissue_fraction
from mil.extract.wsi.tissue import TissueParams, detect_tissue, read_low_res
from mil.rundir import refuse_other_settings
from mil.slides import MPP_TOLERANCE, open_slide, slide_geometry

REPORT_COLUMNS = ["slide_id", "status", "n_tiles", "seconds", "error"]
THUMBNAIL_MAX_PX = 1024


@dataclass(frozen=True)
class TilingConfig:
    """Everything that determines a slide's tiles; stored in each output file and compared on reruns."""

    grid: GridSpec = field(default_factory=GridSpec)
    tissue: TissueParams = field(default_factory=TissueParams)
    tissue_threshold: float = 0.5  # keep tiles whose tissue fraction is at least this
    mpp: float | None = None  # global level-0 mpp override (--mpp)

    def settings(self, mpp_override: float | None) -> dict:
        """The settings recorded in a slide's file; `mpp_override` is that slide's resolved override."""
        return {
            "target_mpp": self.grid.target_mpp,
            "tile_size": self.grid.tile_size,
            "overlap": self.grid.overlap,
            "tissue_threshold": self.tissue_threshold,
            "mpp_override": mpp_override,
            "tissue": asdict(self.tissue),
        }

    def as_dict(self) -> dict:
        """Every option, for the config file written beside the outputs."""
        return {"grid": asdict(self.grid), "tissue": asdict(self.tissue), "tissue_threshold": self.tissue_threshold, "mpp": self.mpp}

    def slide_mpp_override(self, manifest_mpp: float) -> float | None:
        """Manifest column first, then --mpp, else None (read from the slide)."""
        if manifest_mpp is not None and not math.isnan(manifest_mpp):
            return float(manifest_mpp)
        return self.mpp


@dataclass
class SlideResult:
    slide_id: str
    status: str  # ok | empty | skipped | error
    n_tiles: int = 0
    seconds: float = 0.0
    error: str = ""


def tile_slide(slide_id: str, path: str | Path, out_dir: Path, config: TilingConfig, mpp_override: float | None) -> SlideResult:
    """Detect tissue, build the grid and write ``out_dir/<slide_id>.h5`` plus its thumbnail."""
    t0 = time.perf_counter()
    slide = open_slide(path)
    try:
        geom = slide_geometry(slide, path, mpp_override)
        spec = config.grid
        if spec.target_mpp < geom.level0_mpp * (1 - MPP_TOLERANCE):
            raise SlideError(
                f"{path}: target mpp {spec.target_mpp} is finer than the slide's level-0 mpp {geom.level0_mpp:.4g}; "
                "tiles would be upsampled. Choose a --target-mpp of at least the scan resolution."
            )
        rgb, ds = read_low_res(slide, geom, config.tissue.mask_mpp)  # (h, w, 3)
    finally:
        slide.close()
    mask, thr = detect_tissue(rgb, ds * geom.level0_mpp, config.tissue)  # (h, w)
    size0 = spec.tile_size_level0(geom.level0_mpp)
    coords = tile_grid(geom.width, geom.height, spec, geom.level0_mpp)  # (M, 2)
    frac = tissue_fraction(mask, ds, coords, size0)  # (M,)
    keep = frac >= config.tissue_threshold if config.tissue_threshold > 0 else frac > 0
    coords, frac = coords[keep], frac[keep]  # (N, 2), (N,)

    # The thumbnail goes first: the .h5 file is what marks a slide as done.
    write_thumbnail(out_dir / "thumbnails" / f"{slide_id}.png", rgb, mask, coords, size0, ds)
    settings = config.settings(mpp_override)
    with atomic_path(out_dir / f"{slide_id}.h5") as tmp:
        with h5py.File(tmp, "w") as f:
            write_coords(f, coords, spec, geom, size0)
            f.create_dataset("tissue_fraction", data=frac)
            m = f.create_dataset("tissue_mask", data=mask.astype(np.uint8), compression="gzip")
            m.attrs["downsample"] = ds
            m.attrs["saturation_threshold"] = thr
            f.attrs.update(
                slide_id=slide_id,
                slide_path=str(path),
                mpp_source=geom.mpp_source,
                tissue_params=config.tissue.to_json(),
                tiling_settings=json.dumps(settings, sort_keys=True),
                mil_version=mil.__version__,
            )
    status = "ok" if len(coords) else "empty"
    if status == "empty":
        warnings.warn(f"{slide_id}: no tissue found; wrote a valid file with 0 tiles.", stacklevel=2)
    return SlideResult(slide_id, status, len(coords), time.perf_counter() - t0)


def write_coords(f: h5py.File, coords: np.ndarray, spec: GridSpec, geom, size0: int) -> h5py.Dataset:
    """The CLAM/TRIDENT `coords` dataset and its attrs (docs/architecture.md, "Feature file")."""
    d = f.create_dataset("coords", data=coords.astype(np.int64).reshape(-1, 2))
    d.attrs.update(
        patch_size=spec.tile_size,
        patch_size_level0=size0,
        target_mpp=spec.target_mpp,
        level0_mpp=geom.level0_mpp,
        level0_width=geom.width,
        level0_height=geom.height,
        overlap=spec.overlap,
    )
    return d


def write_thumbnail(path: Path, rgb: np.ndarray, mask: np.ndarray, coords: np.ndarray, size0: int, downsample: float) -> None:
    """Save the low-resolution image with the tissue outline (green) and the kept tiles (blue).

    Args:
        rgb: ``(h, w, 3)`` low-resolution slide image; mask: its ``(h, w)`` tissue mask.
        coords: ``(N, 2)`` kept tiles, top-left in level-0 px; size0: tile side in level-0 px.
        downsample: level-0 px per pixel of `rgb`.
    """
    h, w = mask.shape
    f = min(4.0, THUMBNAIL_MAX_PX / max(h, w))  # thumbnail px per `rgb` px (small slides are enlarged)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    img = np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR if f < 1 else Image.NEAREST)).copy()  # (th, tw, 3)
    outline = np.asarray(Image.fromarray(find_boundaries(mask, mode="inner")).resize(size, Image.NEAREST))
    img[outline] = (0, 170, 0)
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    to_thumb = f / downsample  # thumbnail px per level-0 px
    side = max(size0 * to_thumb - 1, 1)
    for x, y in coords * to_thumb:  # (N, 2) in thumbnail px
        draw.rectangle([x, y, x + side, y + side], outline=(30, 60, 220))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        pil.save(tmp, format="PNG")


def check_existing(out_dir: Path, slide_id: str, settings: dict) -> bool:
    """True if ``out_dir/<slide_id>.h5`` exists with `settings`; raise if it exists with others.

    Raises:
        SettingsMismatchError: naming the first differing setting and both values.
    """
    path = out_dir / f"{slide_id}.h5"
    if not path.exists():
        return False
    try:
        with h5py.File(path, "r") as f:
            old = json.loads(f.attrs["tiling_settings"])
    except (OSError, KeyError, ValueError):
        raise SettingsMismatchError(
            f"{path}: exists but was not written by `mil extract tiles`; move it away or rerun with --overwrite."
        ) from None
    refuse_other_settings(path, {k: old.get(k) for k in settings}, settings, what="tile grid", ignore=(), redo="re-tile")
    return True


def run_tiles(
    slides: pd.DataFrame,
    out_dir: str | Path,
    config: TilingConfig,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """Tile every slide of a validated manifest table (see `mil.manifest.read_manifest`).

    Settings of existing outputs are checked for every slide before any work starts. A slide
    that fails is reported (status ``error``) and the batch goes on.

    Returns:
        The report table, also written to ``out_dir/extract_report.csv``.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "thumbnails").mkdir(exist_ok=True)
    for folder in (out_dir, out_dir / "thumbnails"):  # leftovers of killed runs
        remove_stale_temporaries(folder)
    overrides = [config.slide_mpp_override(m) for m in slides["mpp"]]
    done = {
        sid: (False if overwrite else check_existing(out_dir, sid, config.settings(o))) for sid, o in zip(slides["slide_id"], overrides)
    }
    write_config(out_dir / "tiles_config.json", config, slides)

    console = Console(stderr=True)
    results: list[SlideResult] = []
    total_tiles = 0
    columns = (
        TextColumn("[bold]tiling"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("slides · {task.fields[tiles]:,} tiles"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, disable=not progress, transient=False) as bar:
        task = bar.add_task("tiles", total=len(slides), tiles=0)
        for sid, path, override in zip(slides["slide_id"], slides["path"], overrides):
            if done[sid]:
                results.append(SlideResult(sid, "skipped", _n_tiles(out_dir / f"{sid}.h5")))
            else:
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        res = tile_slide(sid, path, out_dir, config, override)
                except Exception as e:  # noqa: BLE001 — one bad slide must not stop the batch
                    res = failed(sid, path, e)
                    console.print(f"[red]error[/red] {sid}: {res.error}", highlight=False, soft_wrap=True)
                if res.status == "empty":
                    console.print(f"[yellow]warning[/yellow] {sid}: no tissue found; wrote a valid file with 0 tiles.", soft_wrap=True)
                results.append(res)
            total_tiles += results[-1].n_tiles
            bar.update(task, advance=1, tiles=total_tiles)

    return write_report(results, out_dir)


def _n_tiles(path: Path) -> int:
    with h5py.File(path, "r") as f:
        return int(f["coords"].shape[0])


def write_config(path: Path, config: TilingConfig, slides: pd.DataFrame) -> None:
    """Write the run's resolved options beside its outputs."""
    doc = {"stage": "tiles", "mil_version": mil.__version__, **config.as_dict(), "n_slides": int(len(slides))}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")


def failed(slide_id: str, path: str | Path, error: Exception) -> SlideResult:
    """The report row of a slide that raised: our own errors carry their message, others their type.

    An error raised in a DataLoader worker arrives wrapped ("Caught X in DataLoader worker process 0.
    Original Traceback …"): only the original exception's last line is kept, never the traceback.
    """
    text = str(error)
    if "Original Traceback" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1].strip()
        qualified, sep, rest = last.partition(": ")
        text = rest if sep and qualified.replace(".", "").replace("_", "").isalnum() else last
    msg = text if isinstance(error, mil.MilError) else f"{path}: {type(error).__name__}: {text}"
    return SlideResult(slide_id, "error", error=" ".join(msg.split()))


def write_report(results: list[SlideResult], out_dir: Path) -> pd.DataFrame:
    """Write ``out_dir/extract_report.csv`` (one row per slide of this run) and return it."""
    report = pd.DataFrame([asdict(r) for r in results], columns=REPORT_COLUMNS)
    report["seconds"] = report["seconds"].round(3)
    with atomic_path(out_dir / "extract_report.csv") as tmp:
        report.to_csv(tmp, index=False)
    return report
