"""Lesion mimics: regions of ordinary slides that look like the lesion but are not.

A hard-negative study (HNM-WSI: hard negatives are tissue of negative slides that looks like
tumour) needs such regions on every slide, negatives and positives alike, so that their presence
says nothing about the label. `random_mimic` places them like the lesion (a few compact blobs deep
inside the tissue), never on or next to the lesion; `slide_writer` renders them with the lesion's
stain and mean colour but another nuclear pattern (`slide_writer._textures`).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from mil.extract.generate.slide_writer import _top, blob_closeness

LESION_GAP = 2  # mask px of tissue kept between the lesion and any mimic


def random_mimic(tissue: np.ndarray, lesion: np.ndarray, *, rng: np.random.Generator, fraction: float) -> np.ndarray:
    """A mimic mask covering about `fraction` of the tissue, disjoint from (and not touching) the lesion.

    One to three centres deep inside the tissue that is not lesion; the mimic is that tissue
    closest to any centre in the same wobbly metric as `random_masks` uses for the lesion, so the
    blobs are compact with irregular outlines. The smooth fields live on a grid of at most ~512 px.

    Args:
        tissue: Tissue mask, bool (h, w), as `random_masks` returns it.
        lesion: Lesion mask of the same shape (all False on negative slides).
        rng: Source of randomness (its own stream: the other masks do not depend on it).
        fraction: Mimic area as a fraction of the tissue area, in [0, 1).

    Returns:
        bool (h, w); less than `fraction` only where too little tissue is left away from the lesion.
    """
    mimic = np.zeros(tissue.shape, bool)
    n_target = int(round(fraction * tissue.sum()))
    allowed = tissue & ~ndimage.binary_dilation(lesion, iterations=LESION_GAP) if lesion.any() else tissue
    if n_target <= 0 or not allowed.any():
        return mimic
    if n_target >= allowed.sum():
        return allowed.copy()
    c = max(1, -(-max(tissue.shape) // 512))
    coarse = allowed[::c, ::c]
    if not coarse.any():
        coarse = ndimage.maximum_filter(allowed, size=c)[::c, ::c]
    closeness = blob_closeness(coarse, tissue.shape, rng)
    return allowed & (closeness >= _top(closeness[allowed], n_target))
