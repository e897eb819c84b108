"""Where the crops of `mil extract crops` go: lesion masks at slide scale and the positions of
positive crops (one whole lesion component, O2I in range) and negative crops (tissue, not white).

Geometry as in `mil.extract.generate.crops`: a crop is `size` px at `ds` level-0 px per crop px; a
mask of shape (h, w) covers the whole slide; a crop pixel takes the mask value at its centre.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mil.errors import ManifestError

if TYPE_CHECKING:  # annotations only: crops.py imports this module
    from mil.extract.generate.crops import CropConfig

MASK_SUFFIXES = ("_lesion.png", ".png", "_lesion.tif", ".tif", "_lesion.tiff", ".tiff")


def load_lesion_mask(masks_dir: str | Path, slide_id: str) -> np.ndarray:
    """The lesion mask of a slide, bool (h, w) covering the whole slide.

    Looks for ``<slide_id>_lesion.png`` (as `mil extract synthetic` writes), then ``<slide_id>.png``
    and the same names in .tif/.tiff; nonzero = lesion.
    """
    from PIL import Image

    d = Path(masks_dir)
    for suffix in MASK_SUFFIXES:
        p = d / f"{slide_id}{suffix}"
        if p.is_file():
            try:
                with Image.open(p) as im:
                    arr = np.asarray(im)
            except OSError as e:
                raise ManifestError(f"{p}: expected a lesion mask image, could not read it ({e}).") from None
            return (arr if arr.ndim == 2 else arr[..., 0]) > 0  # (h, w)
    raise ManifestError(f"{d}: expected a lesion mask for positive slide {slide_id!r} ({slide_id}_lesion.png or {slide_id}.png), got none.")


def mask_scale(mask_shape: tuple[int, int], width: int, height: int, where: str = "") -> tuple[float, float]:
    """Level-0 px per mask px (sy, sx) for a mask covering a width × height slide.

    An integer downsample whose ceil-divided size matches the mask wins (synthetic masks are
    ceil(height/16) × ceil(width/16)); otherwise each axis is scaled by size / mask size.
    """
    h, w = mask_shape
    ds = max(1, round(width / w))
    if -(-width // ds) == w and -(-height // ds) == h:
        return float(ds), float(ds)
    sy, sx = height / h, width / w
    if abs(sy / sx - 1) > 0.02:
        raise ManifestError(f"{where}expected a mask with the slide's aspect ratio ({width}x{height}), got {w}x{h} instead.")
    return sy, sx


def crop_index(start: int, size: int, ds: float, scale: float, n: int) -> np.ndarray:
    """(size,) mask index under the centre of each crop pixel along one axis."""
    centres = start + (np.arange(size) + 0.5) * ds  # (size,) level-0 px
    return np.clip((centres // scale).astype(np.int64), 0, n - 1)


def crop_mask(mask: np.ndarray, x0: int, y0: int, size: int, ds: float, scale: tuple[float, float]) -> np.ndarray:
    """The mask (or label image) seen by a crop: (size, size), nearest neighbour at pixel centres.

    Args:
        mask: (h, w) array covering the whole slide.
        x0, y0: crop top-left in level-0 px.
        size: crop side in crop px.
        ds: level-0 px per crop px.
        scale: level-0 px per mask px (sy, sx).
    """
    rows = crop_index(y0, size, ds, scale[0], mask.shape[0])  # (S,)
    cols = crop_index(x0, size, ds, scale[1], mask.shape[1])  # (S,)
    return mask[np.ix_(rows, cols)]  # (S, S)


def _fraction(lesion: np.ndarray, x0: int, y0: int, size: int, ds: float, scale: tuple[float, float]) -> float:
    """Mean of `crop_mask(lesion, …)` without building it: row weights @ block @ column weights."""
    rows = crop_index(y0, size, ds, scale[0], lesion.shape[0])
    cols = crop_index(x0, size, ds, scale[1], lesion.shape[1])
    wr = np.bincount(rows - rows[0]).astype(np.float32)  # (r,)
    wc = np.bincount(cols - cols[0]).astype(np.float32)  # (c,)
    block = lesion[rows[0] : rows[0] + len(wr), cols[0] : cols[0] + len(wc)]  # (r, c)
    return float(wr @ block @ wc) / (size * size)


@dataclass
class PositiveCrop:
    """One positive crop position: top-left (x0, y0) in level-0 px, O2I, box in crop px, component."""

    x0: int
    y0: int
    o2i: float
    bbox: tuple[int, int, int, int]
    component: int


def positive_positions(
    lesion: np.ndarray, width: int, height: int, ds: float, cfg: CropConfig, rng: np.random.Generator
) -> tuple[list[PositiveCrop], dict[str, int]]:
    """Positive crop positions of one slide, from its lesion mask alone (no pixels read).

    Args:
        lesion: (h, w) bool lesion mask covering the slide.
        width, height: slide size in level-0 px.
        ds: level-0 px per crop px.
        cfg: options (size, o2i range, per_lesion, tries).
        rng: random generator.

    Returns:
        (crops, counts): counts of components found / used / too large for the O2I range /
        not fitting in a crop.
    """
    from scipy import ndimage

    size, (lo, hi) = cfg.size, cfg.o2i
    scale = mask_scale(lesion.shape, width, height)
    side0 = size * ds  # crop side in level-0 px
    labels, n = ndimage.label(lesion, structure=np.ones((3, 3), bool))  # (h, w)
    lesion_f = lesion.astype(np.float32)  # (h, w)
    areas = np.bincount(labels.ravel(), minlength=n + 1)  # (n + 1,) mask px per component
    counts = {"components": int(n), "used": 0, "too_large": 0, "no_fit": 0}
    out: list[PositiveCrop] = []
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        if areas[k] * scale[0] * scale[1] / (side0 * side0) > hi * 1.05:  # the component alone is above the range
            counts["too_large"] += 1
            continue
        bx0, bx1 = sl[1].start * scale[1], min(sl[1].stop * scale[1], width)  # level-0 extent
        by0, by1 = sl[0].start * scale[0], min(sl[0].stop * scale[0], height)
        xlo, xhi = max(0, math.ceil(bx1 - side0)), min(math.floor(bx0), math.floor(width - side0))
        ylo, yhi = max(0, math.ceil(by1 - side0)), min(math.floor(by0), math.floor(height - side0))
        if xlo > xhi or ylo > yhi:
            counts["no_fit"] += 1
            continue
        seen: set[tuple[int, int]] = set()
        kept = 0
        for _ in range(cfg.tries):
            x0, y0 = int(rng.integers(xlo, xhi + 1)), int(rng.integers(ylo, yhi + 1))
            if (x0, y0) in seen:
                continue
            seen.add((x0, y0))
            frac = _fraction(lesion_f, x0, y0, size, ds, scale)
            if not lo <= frac <= hi:
                continue
            comp = crop_mask(labels, x0, y0, size, ds, scale) == k  # (S, S)
            ys, xs = np.nonzero(comp)
            if not ys.size:  # component thinner than a crop pixel
                continue
            out.append(PositiveCrop(x0, y0, frac, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1), k))
            kept += 1
            if kept >= cfg.per_lesion:
                break
        counts["used"] += kept > 0
    return out, counts


def negative_positions(
    tissue: np.ndarray,
    tissue_scale: float,
    width: int,
    height: int,
    ds: float,
    cfg: CropConfig,
    rng: np.random.Generator,
    n: int | None = None,
) -> list[tuple[int, int]]:
    """Random crop positions (x0, y0) in level-0 px whose tissue fraction is at least `cfg.min_tissue`.

    Args:
        tissue: (h, w) bool tissue mask of the slide at `tissue_scale` level-0 px per px.
        n: how many to return at most (default `cfg.per_slide`); `cfg.tries` positions are tried.
    """
    n = cfg.per_slide if n is None else n
    side0 = cfg.size * ds
    if side0 > width or side0 > height or n <= 0:
        return []
    tissue_f = tissue.astype(np.float32)  # (h, w)
    scale = (tissue_scale, tissue_scale)
    out: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    for _ in range(cfg.tries):
        x0 = int(rng.integers(0, math.floor(width - side0) + 1))
        y0 = int(rng.integers(0, math.floor(height - side0) + 1))
        if (x0, y0) in seen:
            continue
        seen.add((x0, y0))
        if _fraction(tissue_f, x0, y0, cfg.size, ds, scale) >= cfg.min_tissue:
            out.append((x0, y0))
            if len(out) >= n:
                break
    return out
