"""Tissue detection on a low-resolution image of the slide.

Method (CLAM's, vectorised with scikit-image/scipy): HSV saturation → median filter → Otsu
threshold (floored at `min_saturation` so a blank slide yields no tissue) → morphological
closing → removal of small objects → filling of small holes. Every size is in microns so the
same parameters work at any scan resolution; they are recorded in each output file.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import numpy as np
import openslide
from PIL import Image
from scipy import ndimage
from skimage import filters, morphology

from mil.errors import OptionError
from mil.slides import SlideGeometry, rgba_to_rgb

# Rows read from the slide at a time when building the low-resolution image: bounds memory
# even for a slide without a pyramid.
_STRIP_ROWS = 2048


@dataclass(frozen=True)
class TissueParams:
    """Parameters of `detect_tissue`; sizes in microns so they do not depend on the scanner.

    Attributes:
        mask_mpp: resolution of the tissue mask (µm per mask pixel; 8 ≈ 1.25× objective).
        threshold: saturation threshold in [0, 1], or ``None`` for Otsu's threshold.
        min_saturation: lower bound on the threshold, so near-white slides give no tissue.
        median_um: width of the median filter applied to the saturation.
        closing_um: radius of the morphological closing that joins nearby tissue.
        min_object_um2: connected components smaller than this are dropped (dust, debris).
        max_hole_um2: holes smaller than this are filled (fat, tears); larger lumina stay.
    """

    mask_mpp: float = 8.0
    threshold: float | None = None
    min_saturation: float = 0.05
    median_um: float = 40.0
    closing_um: float = 32.0
    min_object_um2: float = 50_000.0
    max_hole_um2: float = 20_000.0

    def __post_init__(self) -> None:
        if not (self.mask_mpp > 0):
            raise OptionError(f"expected tissue mask_mpp > 0, got {self.mask_mpp!r} instead.")
        if self.threshold is not None and not (0.0 <= self.threshold <= 1.0):
            raise OptionError(f"expected a saturation threshold in [0, 1] or None (Otsu), got {self.threshold!r} instead.")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def read_low_res(slide: openslide.OpenSlide, geom: SlideGeometry, mask_mpp: float) -> tuple[np.ndarray, float]:
    """An RGB image of the whole slide at about `mask_mpp` µm/px, built strip by strip.

    Returns:
        ``(rgb, downsample)``: rgb ``(h, w, 3)`` uint8 with transparent areas made white, and the
        level-0 pixels per output pixel (``mask_mpp / level0_mpp``, exactly as used for the size).
    """
    downsample = max(mask_mpp / geom.level0_mpp, 1.0)
    out_w = max(1, round(geom.width / downsample))
    out_h = max(1, round(geom.height / downsample))
    level = slide.get_best_level_for_downsample(downsample)
    lw, lh = geom.level_dimensions[level]
    lds = geom.level_downsamples[level]
    strips = []
    rows_done = 0
    for y in range(0, lh, _STRIP_ROWS):  # read the level in strips, shrink each, then stack
        rows = min(_STRIP_ROWS, lh - y)
        region = slide.read_region((0, round(y * lds)), level, (lw, rows))
        # Each strip's share of output rows, computed from cumulative bounds so they sum to out_h.
        end = round((y + rows) / lh * out_h)
        n_out = max(end - rows_done, 0)
        rows_done = end
        if n_out:
            strips.append(rgba_to_rgb(region.resize((out_w, n_out), Image.BILINEAR)))
    return np.concatenate(strips, axis=0), geom.width / out_w  # (h, w, 3)


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] of an ``(h, w, 3)`` uint8 image, without a float64 HSV copy."""
    mx = rgb.max(axis=-1).astype(np.float32)  # (h, w)
    mn = rgb.min(axis=-1).astype(np.float32)  # (h, w)
    return np.divide(mx - mn, mx, out=np.zeros_like(mx), where=mx > 0)  # (h, w)


def detect_tissue(rgb: np.ndarray, mpp: float, params: TissueParams) -> tuple[np.ndarray, float]:
    """Tissue mask of a low-resolution slide image.

    Args:
        rgb: ``(h, w, 3)`` uint8 image at `mpp` µm/px.
        mpp: microns per pixel of `rgb`.
        params: detection parameters.

    Returns:
        ``(mask, threshold)``: mask ``(h, w)`` bool and the saturation threshold used.
    """
    sat = saturation(rgb)  # (h, w)
    k = max(1, int(round(params.median_um / mpp)) | 1)  # odd filter width in px
    if k > 1:
        sat = ndimage.median_filter(sat, size=k)
    if params.threshold is not None:
        thr = float(params.threshold)
    elif sat.max() - sat.min() < 1e-6:
        thr = 1.0  # constant image: Otsu is undefined, there is nothing to separate
    else:
        thr = float(filters.threshold_otsu(sat))
    thr = max(thr, params.min_saturation)
    mask = sat > thr  # (h, w)
    r = int(round(params.closing_um / mpp))
    if r > 0:
        mask = ndimage.binary_closing(mask, structure=morphology.disk(r), border_value=0)
    px_area = mpp * mpp
    min_px = int(math.ceil(params.min_object_um2 / px_area))
    if min_px > 1:
        mask = morphology.remove_small_objects(mask, max_size=min_px - 1)
    hole_px = int(params.max_hole_um2 / px_area)
    if hole_px > 0:
        mask = morphology.remove_small_holes(mask, max_size=hole_px)
    return mask, thr
