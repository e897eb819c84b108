"""Hard-negative mining (Huang et al., MICCAI 2024; docs/stage-two.md, "Hard negatives"), on instance features.

Score every instance of every negative training bag with the current model and keep, globally
over bags, the top ``neg_ratio`` fraction by instance score (the authors' ``neg_ratio`` quantile
over all patches of normal slides): the negative instances the model finds most tumour-like.
With ``pos_ratio``, pseudo-positives are picked as the authors' self-paced positives are: among
positive-bag instances with σ(score) > 0.3, the top ``pos_ratio`` fraction.

The training loop (`mil.train.loop`) refreshes the set on a schedule and uses it where the
seed's pipeline does: as extra negatives of the ranking loss (a bank of mined instances scored
in each step's forward pass) and, per fold, exported to ``hard_negatives/<fold>.csv`` for the
encoder fine-tuning that the paper runs on them. A two-sided instance BCE on mined negatives
and pseudo-positives is an opt-in (``--hnm-instance-weight``), not the seed's MIL loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from mil.atomic import write_csv
from mil.data import BagDataset
from mil.device import module_device
from mil.features import read_bag
from mil.selection import check_ratio, confident_positives, top_fraction


@dataclass
class MinedSet:
    """The mined instances of one refresh.

    Attributes:
        negatives: ``{slide_id: LongTensor (k,)}`` hard-negative instance indices of negative bags.
        scores: ``{slide_id: FloatTensor (k,)}`` their instance scores (logits) when mined.
        positives: ``{slide_id: LongTensor (r,)}`` pseudo-positive indices of positive bags (``pos_ratio`` only).
        bank: ``(M, D)`` float32 features of the mined negatives (the highest-scoring ``bank_max``).
        threshold: the global score quantile that negatives had to reach.
    """

    negatives: dict[str, torch.Tensor] = field(default_factory=dict)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    positives: dict[str, torch.Tensor] = field(default_factory=dict)
    bank: torch.Tensor | None = None
    threshold: float = float("nan")

    def __len__(self) -> int:
        return int(sum(len(v) for v in self.negatives.values()))


@torch.inference_mode()
def mine_hard_negatives(
    model: torch.nn.Module, ds: BagDataset, neg_ratio: float, *, pos_ratio: float | None = None, bank_max: int = 0
) -> MinedSet:
    """Hard negatives (and optionally pseudo-positives) of the bags of `ds` under `model`.

    Args:
        model: a head returning ``instance_scores (B, N)``.
        ds: the training bags.
        neg_ratio: fraction of all negative-bag instances to keep, in (0, 1].
        pos_ratio: fraction of the confident (σ > 0.3) positive-bag instances kept as pseudo-positives; None = none.
        bank_max: keep the features of at most this many mined negatives (highest scores first) in ``bank``.
    """
    check_ratio(neg_ratio, "--neg-ratio")
    model.eval()
    dev = module_device(model)
    neg: dict[str, torch.Tensor] = {}  # slide_id -> scores (N,)
    cand: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # slide_id -> (indices, features) of its top bank_max tiles
    pos: dict[str, torch.Tensor] = {}  # slide_id -> scores (N,)
    for i in range(len(ds)):
        X, y, sid = ds[i]  # (N, D)
        s = model(X[None].to(dev)).instance_scores[0].float().cpu()  # (N,) mined on the CPU
        if y == 0:
            neg[sid] = s
            if bank_max > 0:  # the bank's global top bank_max lies within each bag's own top bank_max
                idx = s.topk(min(bank_max, len(s))).indices  # (≤ bank_max,)
                cand[sid] = (idx, X[idx].float())  # (k,), (k, D)
        elif pos_ratio is not None:
            pos[sid] = s
    out = MinedSet()
    if neg:
        # Global threshold: the (1 - neg_ratio) quantile over every negative instance of every bag.
        kept, out.threshold = top_fraction({sid: s.numpy() for sid, s in neg.items()}, neg_ratio)
        for sid, idx in kept.items():
            out.negatives[sid] = torch.from_numpy(idx)  # (k,)
            out.scores[sid] = neg[sid][out.negatives[sid]]  # (k,)
        if cand:
            keep = [(neg[sid][idx], X) for sid, (idx, X) in cand.items()]  # candidates' scores (k,), features (k, D)
            scores, feats = torch.cat([k for k, _ in keep]), torch.cat([X for _, X in keep])  # (K,), (K, D)
            mined = scores >= out.threshold  # (K,) only mined tiles enter the bank
            order = scores[mined].argsort(descending=True)[:bank_max]  # (≤ bank_max,)
            out.bank = feats[mined][order] if order.numel() else None  # (≤ bank_max, D)
    if pos:
        picked = confident_positives({sid: torch.sigmoid(s).numpy() for sid, s in pos.items()}, pos_ratio)
        out.positives = {sid: torch.from_numpy(idx) for sid, idx in picked.items()}  # {slide: (r,)}
    return out


def export_hard_negatives(mined: MinedSet, files: dict[str, Path], path: Path) -> None:
    """Write ``slide_id, tile_index, x, y, score`` of every mined negative (CSV, highest score first).

    The coordinates are the feature file's level-0 ``coords`` of the tile, so the tiles can be read
    again from the slide (the encoder fine-tuning of the HNM-WSI loop works on these tiles).
    """
    rows = []
    for sid, idx in mined.negatives.items():
        xy = read_bag(files[sid]).coords[idx.numpy()]  # (k, 2) level-0 px (zeros for files without coords)
        rows.append(
            pd.DataFrame({"slide_id": sid, "tile_index": idx.numpy(), "x": xy[:, 0], "y": xy[:, 1], "score": mined.scores[sid].numpy()})
        )
    cols = ["slide_id", "tile_index", "x", "y", "score"]
    table = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=cols)
    write_csv(path, table.sort_values("score", ascending=False, kind="stable")[cols])
