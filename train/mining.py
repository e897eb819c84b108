"""Hard-negative mining (Huang et al., MICCAI 2024; methods.md §1.3), on instance features.

Score every instance of every negative training bag with the current model and keep, globally
over bags, the top ``neg_ratio`` fraction by instance score: the negative instances the model
finds most tumour-like. The training loop refreshes the set every few epochs after a warm-up
and uses it twice: as instance targets of 0, and as the negative side of the ranking loss.
"""

from __future__ import annotations

import numpy as np
import torch

from mil.errors import OptionError
from mil.train.data import BagDataset


@torch.inference_mode()
def mine_hard_negatives(model: torch.nn.Module, ds: BagDataset, neg_ratio: float) -> dict[str, torch.Tensor]:
    """Instance indices of the hard negatives of each negative bag of `ds`.

    Args:
        model: a head returning ``instance_scores (B, N)``.
        ds: the training bags.
        neg_ratio: fraction of all negative-bag instances to keep, in (0, 1].

    Returns:
        ``{slide_id: LongTensor (k,)}`` for negative bags with at least one mined instance.
    """
    if not (0 < neg_ratio <= 1):
        raise OptionError(f"expected --neg-ratio in (0, 1], got {neg_ratio!r} instead.")
    model.eval()
    scores: dict[str, torch.Tensor] = {}
    for i in range(len(ds)):
        X, y, sid = ds[i]  # (N, D)
        if y == 0:
            scores[sid] = model(X[None]).instance_scores[0].float()  # (N,)
    if not scores:
        return {}
    everything = torch.cat(list(scores.values()))  # (M,) all negative instances
    # Global threshold: the (1 - neg_ratio) quantile over every negative instance of every bag.
    t = float(np.quantile(everything.numpy(), 1.0 - neg_ratio))
    mined = {sid: torch.nonzero(s >= t).flatten() for sid, s in scores.items()}  # (k,) per bag
    return {sid: idx for sid, idx in mined.items() if idx.numel()}
