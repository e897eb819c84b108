"""Opening slides with OpenSlide and finding their resolution.

Resolution is the most common source of silent errors in pathology pipelines (tiling by
pyramid level instead of microns, guessing 40× when the scanner said nothing). Here the
level-0 microns per pixel come from, in order: a per-slide override (manifest ``mpp``
column), a global override (``--mpp``), OpenSlide's ``openslide.mpp-x/y``, the TIFF
resolution tags. A slide with none of these is an error that names the slide and the two
overrides; it is never guessed.

Every reader of slide pixels (tiles, tissue, crops, heatmaps) turns OpenSlide's RGBA into RGB
with `rgba_to_rgb`: transparent pixels lie outside the scanned area and become white.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
import pandas as pd

from mil.errors import ManifestError, SlideError
from mil.manifest import check_slide_id

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".svslide", ".bif", ".dcm")
# A level may be this much finer than requested and still count as "at" the target mpp:
# scanners report 0.2527 µm/px for nominal 0.25.
MPP_TOLERANCE = 0.05


@dataclass(frozen=True)
class SlideGeometry:
    """What tiling needs to know about a slide: its size, resolution and pyramid."""

    width: int
    height: int
    level0_mpp: float
    mpp_source: str  # "override", "openslide.mpp-x", "tiff.XResolution"
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]

    def level_mpp(self, level: int) -> float:
        return self.level0_mpp * self.level_downsamples[level]


def open_slide(path: str | Path) -> openslide.OpenSlide:
    """Open a slide, turning OpenSlide's many failure types into one `SlideError` naming the file."""
    path = Path(path)
    if not path.exists():
        raise SlideError(f"{path}: slide file does not exist.")
    if path.is_file() and path.stat().st_size == 0:
        raise SlideError(f"{path}: slide file is empty (0 bytes).")
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise SlideError(f"{path}: not a slide format OpenSlide can read (expected a pyramidal TIFF, SVS, NDPI, MRXS …).") from None
    except (openslide.OpenSlideError, OSError) as e:
        raise SlideError(f"{path}: OpenSlide could not open the slide: {e}") from None


def slide_geometry(slide: openslide.OpenSlide, path: str | Path, mpp_override: float | None = None) -> SlideGeometry:
    """Read size, pyramid and level-0 mpp of an open slide.

    Raises:
        SlideError: the slide reports no mpp and no override was given.
    """
    if mpp_override is not None and math.isfinite(mpp_override):
        mpp, source = float(mpp_override), "override"
    else:
        mpp, source = _mpp_from_properties(slide.properties)
        if mpp is None:
            raise SlideError(
                f"{path}: the slide reports no microns per pixel (no openslide.mpp-x, no TIFF resolution); "
                "give it with the manifest's 'mpp' column or with --mpp (e.g. --mpp 0.25 for a 40x scan)."
            )
    w, h = slide.dimensions
    return SlideGeometry(
        width=int(w),
        height=int(h),
        level0_mpp=mpp,
        mpp_source=source,
        level_dimensions=tuple((int(a), int(b)) for a, b in slide.level_dimensions),
        level_downsamples=tuple(float(d) for d in slide.level_downsamples),
    )


def _mpp_from_properties(props) -> tuple[float | None, str]:
    x, y = props.get(openslide.PROPERTY_NAME_MPP_X), props.get(openslide.PROPERTY_NAME_MPP_Y)
    if x:
        mx = float(x)
        my = float(y) if y else mx
        if abs(mx - my) > 0.01 * mx:
            warnings.warn(f"non-square pixels (mpp-x {mx}, mpp-y {my}); using mpp-x", stacklevel=3)
        if mx > 0:
            return mx, "openslide.mpp-x"
    # TIFF resolution tags that OpenSlide did not convert (e.g. an unusual vendor).
    res, unit = props.get("tiff.XResolution"), props.get("tiff.ResolutionUnit", "").lower()
    if res and unit in {"centimeter", "inch"} and float(res) > 0:
        per_um = float(res) / (1e4 if unit == "centimeter" else 25_400)
        return 1.0 / per_um, "tiff.XResolution"
    return None, ""


def best_level(level_downsamples: tuple[float, ...], downsample: float) -> int:
    """The coarsest pyramid level not coarser than `downsample` level-0 px per output px.

    A level up to `MPP_TOLERANCE` coarser still counts (scanners report 0.2527 for 0.25 µm/px).
    """
    ds = np.asarray(level_downsamples, dtype=float)  # (L,)
    ok = np.flatnonzero(ds <= downsample * (1 + MPP_TOLERANCE))
    return int(ok[np.argmax(ds[ok])]) if ok.size else 0


def slides_from_folder(folder: str | Path) -> pd.DataFrame:
    """A manifest-like table of every slide file in `folder` (slide id = file stem, no labels)."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SLIDE_EXTENSIONS)
    if not files:
        raise ManifestError(f"{folder}: expected slide files ({', '.join(SLIDE_EXTENSIONS)}), found none.")
    ids = [p.stem for p in files]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ManifestError(f"{folder}: two slide files share the id {dupes[0]!r} (same stem); use a manifest to name them.")
    for p, sid in zip(files, ids):
        check_slide_id(sid, where=f"{p}: ")
    return pd.DataFrame(
        {
            "slide_id": ids,
            "path": [str(p.resolve()) for p in files],
            "label": pd.array([None] * len(files), dtype="Int64"),
            "split": "",
            "patient_id": "",
            "mpp": np.nan,
        }
    )


def rgba_to_rgb(region) -> np.ndarray:
    """OpenSlide's RGBA region (a PIL image or an ``(h, w, 4)`` array) → ``(h, w, 3)`` uint8, transparent as white."""
    a = np.asarray(region)  # (h, w, 4)
    return np.where(a[..., 3:] == 0, np.uint8(255), a[..., :3]).astype(np.uint8, copy=False)  # (h, w, 3)
