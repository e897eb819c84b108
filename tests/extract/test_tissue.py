"""Tissue detection on low-resolution images."""

from __future__ import annotations

import numpy as np
import pytest

from mil.errors import OptionError
from mil.extract.wsi.tissue import TissueParams, detect_tissue, saturation
from tests.conftest import ellipse_mask


def image(mask: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rgb = np.full(mask.shape + (3,), 240, np.int16) + rng.integers(-4, 5, size=mask.shape + (3,))
    rgb[mask] = np.array([205, 120, 170]) + rng.integers(-20, 21, size=(mask.sum(), 3))
    return np.clip(rgb, 0, 255).astype(np.uint8)


def test_finds_the_tissue():
    truth = ellipse_mask(200, 300, 100, 150, 60, 100)
    mask, thr = detect_tissue(image(truth), 8.0, TissueParams())
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.95 and 0.05 <= thr < 0.4


def test_blank_image_has_no_tissue():
    mask, _ = detect_tissue(image(np.zeros((200, 200), bool)), 8.0, TissueParams())
    assert not mask.any()
    flat = np.full((50, 50, 3), 255, np.uint8)
    assert not detect_tissue(flat, 8.0, TissueParams())[0].any()


def test_small_debris_removed_and_small_holes_filled():
    truth = ellipse_mask(200, 200, 100, 100, 70, 70)
    noisy = truth.copy()
    noisy[95:99, 95:99] = False  # 4x4 px hole = 1,024 µm² at 8 µm/px: filled
    noisy[5:8, 5:8] = True  # 576 µm² speck: removed
    mask, _ = detect_tissue(image(noisy), 8.0, TissueParams(median_um=0))
    assert mask[96, 96] and not mask[6, 6]


def test_fixed_threshold_is_used():
    truth = ellipse_mask(100, 100, 50, 50, 30, 30)
    _, thr = detect_tissue(image(truth), 8.0, TissueParams(threshold=0.3))
    assert thr == 0.3


def test_saturation_range():
    rgb = np.array([[[255, 255, 255], [255, 0, 0], [0, 0, 0], [200, 100, 100]]], np.uint8)
    assert saturation(rgb)[0].tolist() == pytest.approx([0.0, 1.0, 0.0, 0.5])


def test_bad_params():
    with pytest.raises(OptionError):
        TissueParams(threshold=2.0)
    with pytest.raises(OptionError):
        TissueParams(mask_mpp=0)
