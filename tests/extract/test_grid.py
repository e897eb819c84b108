"""Tile-grid geometry and tissue fractions, without slides."""

from __future__ import annotations

import numpy as np
import pytest

from mil.errors import OptionError
from mil.extract.wsi.grid import GridSpec, tile_grid, tissue_fraction


@pytest.mark.parametrize(
    "level0_mpp, target_mpp, size0",
    [(0.25, 0.5, 448), (0.5, 0.5, 224), (0.25, 0.25, 224), (0.2527, 0.5, 443), (0.25, 1.0, 896), (0.1725, 0.5, 649)],
)
def test_tile_size_in_level0_pixels(level0_mpp, target_mpp, size0):
    assert GridSpec(target_mpp=target_mpp, tile_size=224).tile_size_level0(level0_mpp) == size0


def test_grid_counts_and_bounds():
    spec = GridSpec(target_mpp=0.5, tile_size=224)
    coords = tile_grid(10_000, 5_000, spec, 0.25)  # 448-px tiles
    assert coords.dtype == np.int64 and coords.shape == ((10_000 // 448) * (5_000 // 448), 2)
    assert coords[:, 0].max() + 448 <= 10_000 and coords[:, 1].max() + 448 <= 5_000
    assert (coords[1] - coords[0]).tolist() == [448, 0]  # row-major: x varies fastest
    assert tile_grid(400, 400, spec, 0.25).shape == (0, 2)  # smaller than one tile


def test_overlap_shrinks_stride():
    spec = GridSpec(target_mpp=0.5, tile_size=224, overlap=112)
    coords = tile_grid(2_000, 448, spec, 0.25)
    assert np.diff(coords[:, 0]).tolist() == [224] * (len(coords) - 1)
    assert len(coords) == (2_000 - 448) // 224 + 1


def test_non_integer_stride_does_not_drift():
    spec = GridSpec(target_mpp=0.5, tile_size=224)
    coords = tile_grid(200_000, 500, spec, 0.2527)
    stride = 224 * 0.5 / 0.2527
    assert np.abs(coords[:, 0] - np.arange(len(coords)) * stride).max() <= 0.5


@pytest.mark.parametrize("kw", [dict(target_mpp=0), dict(tile_size=4), dict(overlap=224), dict(overlap=-1)])
def test_bad_grid_options(kw):
    with pytest.raises(OptionError, match="expected"):
        GridSpec(**kw)


def test_tissue_fraction_is_exact_for_partial_overlap():
    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True  # left half is tissue; 16 level-0 px per mask px
    coords = np.array([[0, 0], [64, 0], [40, 0], [160, 0]])  # tile side 32 level-0 px = 2 mask px
    frac = tissue_fraction(mask, 16.0, coords, 32)
    assert frac.tolist() == pytest.approx([1.0, 0.5, 1.0, 0.0])
    # half a mask pixel inside: 72..104 covers mask x 4.5..6.5 -> 0.5 px of tissue out of 2
    assert tissue_fraction(mask, 16.0, np.array([[72, 0]]), 32)[0] == pytest.approx(0.25)


def test_tissue_fraction_matches_brute_force():
    rng = np.random.default_rng(0)
    mask = rng.random((40, 50)) > 0.5
    coords = rng.integers(0, 600, size=(200, 2))
    fine = np.kron(mask, np.ones((8, 8), bool))  # 8 level-0 px per mask px, rendered at level 0
    fine = np.pad(fine, ((0, 400), (0, 300)))  # tiles past the mask count as background
    expected = [fine[y : y + 40, x : x + 40].mean() for x, y in coords]
    assert tissue_fraction(mask, 8.0, coords, 40) == pytest.approx(expected, abs=1e-5)
