"""Tile grids defined at a target resolution, stored in level-0 pixels.

A tile of ``tile_size`` px at ``target_mpp`` covers ``tile_size * target_mpp / level0_mpp``
level-0 px: 224 px at 0.5 µm/px on a 0.25 µm/px scan is 448 level-0 px. Grids are computed
with numpy, and the tissue fraction of every tile comes from one summed-area table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from mil.errors import OptionError


@dataclass(frozen=True)
class GridSpec:
    """Tile size and spacing at the target resolution.

    Attributes:
        target_mpp: microns per pixel of the tiles handed to the encoder.
        tile_size: tile width = height in px at `target_mpp`.
        overlap: px (at `target_mpp`) shared by neighbouring tiles; stride = tile_size - overlap.
    """

    target_mpp: float = 0.5
    tile_size: int = 224
    overlap: int = 0

    def __post_init__(self) -> None:
        if not (self.target_mpp > 0):
            raise OptionError(f"expected --target-mpp > 0, got {self.target_mpp!r} instead.")
        if self.tile_size < 8:
            raise OptionError(f"expected --tile-size of at least 8 px, got {self.tile_size!r} instead.")
        if not (0 <= self.overlap < self.tile_size):
            raise OptionError(f"expected 0 <= --overlap < --tile-size ({self.tile_size}), got {self.overlap!r} instead.")

    def scale(self, level0_mpp: float) -> float:
        """Level-0 px per target px."""
        return self.target_mpp / level0_mpp

    def tile_size_level0(self, level0_mpp: float) -> int:
        return max(1, int(round(self.tile_size * self.scale(level0_mpp))))


def tile_grid(width: int, height: int, spec: GridSpec, level0_mpp: float) -> np.ndarray:
    """Top-left corners of every whole tile that fits in a ``width × height`` level-0 image.

    Strides are kept in floating point and rounded per tile, so a non-integer scale does not
    drift across a 100,000 px slide.

    Returns:
        ``(N, 2)`` int64 array of (x, y) in level-0 px, in row-major order (y, then x).
    """
    size0 = spec.tile_size_level0(level0_mpp)
    stride0 = (spec.tile_size - spec.overlap) * spec.scale(level0_mpp)
    nx = int(np.floor((width - size0) / stride0)) + 1 if width >= size0 else 0
    ny = int(np.floor((height - size0) / stride0)) + 1 if height >= size0 else 0
    xs = np.round(np.arange(nx) * stride0).astype(np.int64)  # (nx,)
    ys = np.round(np.arange(ny) * stride0).astype(np.int64)  # (ny,)
    xs, ys = xs[xs + size0 <= width], ys[ys + size0 <= height]
    gy, gx = np.meshgrid(ys, xs, indexing="ij")  # (ny, nx) each
    return np.stack([gx.ravel(), gy.ravel()], axis=1)  # (N, 2)


def tissue_fraction(mask: np.ndarray, downsample: float, coords: np.ndarray, size0: int) -> np.ndarray:
    """Fraction of each tile covered by tissue.

    The mask is treated as piecewise constant over its pixels; the integral of such a
    function over any axis-aligned rectangle is the bilinear interpolation of its summed-area
    table at the rectangle's corners, so fractional overlaps with mask pixels are exact.

    Args:
        mask: ``(h, w)`` bool tissue mask, one pixel per `downsample` level-0 px.
        downsample: level-0 px per mask pixel.
        coords: ``(N, 2)`` top-left (x, y) of tiles in level-0 px.
        size0: tile side in level-0 px.

    Returns:
        ``(N,)`` float32 in [0, 1].
    """
    if len(coords) == 0:
        return np.zeros(0, dtype=np.float32)
    h, w = mask.shape
    sat = np.zeros((h + 1, w + 1), dtype=np.float64)  # (h+1, w+1): sat[i, j] = mask[:i, :j].sum()
    sat[1:, 1:] = mask.astype(np.float64).cumsum(0).cumsum(1)
    x0 = np.clip(coords[:, 0] / downsample, 0, w)  # (N,) in mask px
    y0 = np.clip(coords[:, 1] / downsample, 0, h)  # (N,)
    x1 = np.clip((coords[:, 0] + size0) / downsample, 0, w)  # (N,)
    y1 = np.clip((coords[:, 1] + size0) / downsample, 0, h)  # (N,)

    def at(y: np.ndarray, x: np.ndarray) -> np.ndarray:
        return ndimage.map_coordinates(sat, [y, x], order=1, mode="nearest")  # (N,)

    area = at(y1, x1) - at(y0, x1) - at(y1, x0) + at(y0, x0)  # (N,) tissue px inside each tile
    full = (size0 / downsample) ** 2
    return np.clip(area / full, 0.0, 1.0).astype(np.float32)  # (N,)
