"""The HNM-WSI / ItS2CLR tile selection rules, shared by stage two's mining and the encoder fine-tuning.

Both seeds pick tiles from instance scores by *global* quantiles over the training slides
(winston52/HNM-WSI ``train/dataset/dataloader_simCLR.py:InssepSPLDataset.init_bag``; methods.md
§1.2–§1.3):

* **hard negatives**: among every tile of every negative slide, the top ``neg_ratio`` fraction by
  score (``s >= quantile(s, 1 - neg_ratio)``);
* **self-paced positives**: among the tiles of positive slides whose pseudo-probability exceeds
  θ = 0.3, the top ``ratio`` fraction;
* **pseudo-label**: ``y = 1`` for a tile of a positive slide with probability > θ, else 0.

Scores are passed as ``{slide_id: array (N,)}``; indices come back per slide.
"""

from __future__ import annotations

import numpy as np

from mil.errors import OptionError

PSEUDO_LABEL_THRESHOLD = 0.3  # θ of the authors' pseudo-label binarisation (`--threshold` 0.3)


def check_ratio(value: float, option: str) -> float:
    """`value` if it is a fraction in (0, 1], else an `OptionError` naming `option`."""
    if not (0 < value <= 1):
        raise OptionError(f"expected {option} in (0, 1], got {value!r} instead.")
    return float(value)


def top_fraction(scores: dict[str, np.ndarray], ratio: float) -> tuple[dict[str, np.ndarray], float]:
    """The tiles whose score reaches the global ``1 - ratio`` quantile over every slide's scores.

    Args:
        scores: ``{slide_id: (N,) scores}``.
        ratio: the fraction to keep, in (0, 1].

    Returns:
        ``({slide_id: (k,) indices}, threshold)``; slides with no tile kept are left out; the
        threshold is NaN when there is no score at all.
    """
    pooled = np.concatenate([np.asarray(s, dtype=np.float64) for s in scores.values()]) if scores else np.zeros(0)  # (M,)
    if pooled.size == 0:
        return {}, float("nan")
    t = float(np.quantile(pooled, 1.0 - ratio))
    kept = {sid: np.flatnonzero(np.asarray(s) >= t) for sid, s in scores.items()}
    return {sid: idx for sid, idx in kept.items() if idx.size}, t


def random_fraction(scores: dict[str, np.ndarray], ratio: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """As many tiles as `top_fraction` keeps, drawn uniformly over every slide's tiles (the ablation)."""
    sizes = {sid: len(s) for sid, s in scores.items()}
    total = sum(sizes.values())
    if total == 0:
        return {}
    k = int(np.ceil(ratio * total))
    flat = np.sort(rng.choice(total, size=min(k, total), replace=False))  # (k,) positions in the concatenation
    out, start = {}, 0
    for sid, n in sizes.items():
        idx = flat[(flat >= start) & (flat < start + n)] - start
        if idx.size:
            out[sid] = idx
        start += n
    return out


def confident_positives(probs: dict[str, np.ndarray], ratio: float) -> dict[str, np.ndarray]:
    """Self-paced positives: of the positive-slide tiles with probability > θ, the top `ratio` fraction.

    Args:
        probs: ``{slide_id: (N,) probabilities}`` of the positive slides.
        ratio: the fraction of the confident tiles to keep, in (0, 1].
    """
    confident = {sid: np.flatnonzero(np.asarray(p) > PSEUDO_LABEL_THRESHOLD) for sid, p in probs.items()}
    picked, _ = top_fraction({sid: np.asarray(probs[sid])[idx] for sid, idx in confident.items() if idx.size}, ratio)
    return {sid: confident[sid][i] for sid, i in picked.items()}
