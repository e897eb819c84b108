"""Fitting one MIL head on one fold: epochs, validation, early stopping, threshold.

Model selection (best epoch, early stopping) and the decision threshold use the validation
set only; the fold's test slides are not seen here. The bag loss is BCE with ``pos_weight``
from the training labels; with ``ranking_weight > 0`` the multiple-instance ranking loss is
added on the positive × negative bag pairs of each batch; with hard-negative mining the mined
instances get an instance BCE towards 0; with sparse tile annotations (`mil.train.instances`)
an instance loss (``ece`` or ``bce``) is added.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import log_loss, roc_auc_score, roc_curve
from torch.utils.data import DataLoader

from mil.errors import OptionError
from mil.heads import Standardized, create_head
from mil.losses import create_loss
from mil.train.data import BagDataset, collate_bags, feature_stats
from mil.train.instances import InstanceLabels, instance_targets
from mil.train.mining import mine_hard_negatives


@dataclass(frozen=True)
class TrainConfig:
    """Every option of the fit; written to the run's config.json."""

    head: str = "abmil"
    head_kwargs: dict = field(default_factory=dict)
    epochs: int = 50
    patience: int = 10  # epochs without a better validation AUC before stopping
    lr: float = 2e-4
    weight_decay: float = 1e-4
    batch_size: int = 1  # bags per step
    seed: int = 0
    ranking_weight: float = 0.0  # > 0 adds the MI ranking loss
    rank_k: int = 10
    rank_margin: float = 1.0
    hard_negatives: bool = False  # mine hard negative instances (needs instance scores: every head has them)
    neg_ratio: float = 0.2  # fraction of all negative-bag instances kept as hard negatives
    hnm_warmup: int = 5  # epochs before the first mining
    hnm_every: int = 5  # epochs between refreshes
    hnm_weight: float = 1.0  # weight of the instance BCE on mined hard negatives (target 0)
    instance_loss: str = "ece"  # with instance labels: "ece" (exclusive cross-entropy) or "bce" (annotated tiles only)
    instance_weight: float = 1.0  # weight of the instance loss
    standardize: bool = False  # standardise features with the training bags' per-feature mean and sd

    def __post_init__(self) -> None:
        for name in ("epochs", "patience", "batch_size", "rank_k", "hnm_every"):
            if getattr(self, name) < 1:
                raise OptionError(f"expected --{name.replace('_', '-')} >= 1, got {getattr(self, name)!r} instead.")
        if not (0 < self.neg_ratio <= 1) or self.hnm_warmup < 0 or self.hnm_weight < 0:
            raise OptionError(
                f"expected --neg-ratio in (0, 1], --hnm-warmup >= 0 and --hnm-weight >= 0, got "
                f"{self.neg_ratio!r}, {self.hnm_warmup!r}, {self.hnm_weight!r} instead."
            )
        if self.instance_loss not in ("ece", "bce") or not (self.instance_weight >= 0):
            raise OptionError(
                f"expected --instance-loss ece or bce and --instance-weight >= 0, got {self.instance_loss!r} and "
                f"{self.instance_weight!r} instead."
            )
        if not (self.lr > 0) or self.weight_decay < 0 or self.ranking_weight < 0:
            raise OptionError(
                f"expected --lr > 0, --weight-decay >= 0 and --ranking-weight >= 0, got "
                f"{self.lr!r}, {self.weight_decay!r}, {self.ranking_weight!r} instead."
            )


@dataclass
class FoldResult:
    state_dict: dict
    best_epoch: int
    threshold: float  # Youden's J on validation predictions of the selected model
    history: list[dict]  # one row per epoch: epoch, train_loss, val_loss, val_auc, n_hard_negatives
    val_predictions: pd.DataFrame  # slide_id, label, probability


@torch.inference_mode()
def predict(model: torch.nn.Module, ds: BagDataset) -> pd.DataFrame:
    """Probabilities of every bag of `ds` (one bag at a time: no padding, any size)."""
    model.eval()
    rows = []
    for i in range(len(ds)):
        X, y, sid = ds[i]  # (N, D)
        p = torch.sigmoid(model(X[None]).logits)[0].item()
        rows.append((sid, int(y), p))
    return pd.DataFrame(rows, columns=["slide_id", "label", "probability"])


def _auc(pred: pd.DataFrame) -> float:
    return float(roc_auc_score(pred["label"], pred["probability"])) if pred["label"].nunique() == 2 else math.nan


def youden_threshold(pred: pd.DataFrame) -> float:
    """Probability threshold maximising sensitivity + specificity − 1 (0.5 if one class only)."""
    if pred["label"].nunique() < 2:
        return 0.5
    fpr, tpr, thr = roc_curve(pred["label"], pred["probability"])
    return float(np.clip(thr[int(np.argmax(tpr - fpr))], 0.0, 1.0))


def fit_fold(
    train_ds: BagDataset,
    val_ds: BagDataset,
    in_dim: int,
    config: TrainConfig,
    on_epoch: Callable[[dict], None] | None = None,
    annotations: InstanceLabels | None = None,
) -> FoldResult:
    """Train `config.head` on `train_ds`, select the epoch on `val_ds`.

    With `annotations` (sparse tile labels, `mil.train.instances`), ``config.instance_loss`` on the
    instance scores is added to the bag loss with weight ``config.instance_weight``.
    """
    torch.manual_seed(config.seed)
    model = create_head(config.head, in_dim=in_dim, **config.head_kwargs)
    if config.standardize:  # statistics of the training bags only
        model = Standardized(model, *feature_stats(train_ds))
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    labels = np.asarray(train_ds.labels)
    pos_weight = float((labels == 0).sum() / max((labels == 1).sum(), 1))
    bce = create_loss("bce", pos_weight=pos_weight)
    ranking = create_loss("ranking", k=config.rank_k, margin=config.rank_margin) if config.ranking_weight > 0 else None
    gen = torch.Generator().manual_seed(config.seed)
    ece_gen = torch.Generator().manual_seed(config.seed + 1)  # background subsampling of the ECE loss
    # ECE summed and divided by the number of labelled tiles (not all tiles), so that before its unannotated
    # background terms are phased in (epoch ~50) it equals the "bce" option on the labelled tiles.
    ece = create_loss("ece", reduction="sum") if annotations is not None and config.instance_loss == "ece" else None
    loader = DataLoader(train_ds, batch_size=config.batch_size, shuffle=True, generator=gen, collate_fn=collate_bags)

    best = (-math.inf, -math.inf)  # (val AUC, -val loss) compared lexicographically; the first epoch always beats it
    best_state, best_epoch, stale, history = None, 0, 0, []
    mined: dict[str, torch.Tensor] = {}  # slide_id -> hard-negative instance indices (k,)
    for epoch in range(1, config.epochs + 1):
        if config.hard_negatives and epoch > config.hnm_warmup and (epoch - config.hnm_warmup - 1) % config.hnm_every == 0:
            mined = mine_hard_negatives(model, train_ds, config.neg_ratio)
        if ece is not None:
            ece.set_epoch(epoch - 1)  # the reference anneals from epoch 0
        model.train()
        losses = []
        for X, mask, y, ids in loader:  # X (B, N, D), mask (B, N), y (B,)
            out = model(X, mask)
            loss = bce(out.logits, y)
            s = out.instance_scores  # (B, N)
            hard = _hard_mask(ids, mined, mask)  # (B, N) True = mined hard negative
            if hard.any():  # mined negatives as instance targets of 0
                loss = loss + config.hnm_weight * bce_instances(s[hard], torch.zeros_like(s[hard]))
            if annotations is not None:
                t = instance_targets(ids, y, mask, annotations)  # (B, N) 1 / 0 known, -1 unannotated
                known = t >= 0  # (B, N) labelled tiles
                if ece is not None:
                    inst = ece(s, t, mask=mask, generator=ece_gen) / known.sum().clamp_min(1)
                else:
                    inst = bce_instances(s[known], t[known].float()) if known.any() else s.new_zeros(())
                loss = loss + config.instance_weight * inst
            if ranking is not None and (y == 1).any() and (y == 0).any():
                pos, neg = y == 1, y == 0  # (B,)
                # Negative side: the bag's hard negatives when it has any (else all its instances).
                neg_mask = torch.where(hard[neg].any(1, keepdim=True), hard[neg], mask[neg])  # (Q, N)
                loss = loss + config.ranking_weight * ranking(s[pos], mask[pos], s[neg], neg_mask)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        pred = predict(model, val_ds)
        val_loss = float(log_loss(pred["label"], pred["probability"], labels=[0, 1]))
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val_loss, "val_auc": _auc(pred),
               "n_hard_negatives": int(sum(len(v) for v in mined.values()))}  # fmt: skip
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
        score = (-math.inf if math.isnan(row["val_auc"]) else row["val_auc"], -val_loss)
        if score > best:
            best, best_state, best_epoch, stale = score, copy.deepcopy(model.state_dict()), epoch, 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    model.load_state_dict(best_state)
    val_pred = predict(model, val_ds)
    return FoldResult(best_state, best_epoch, youden_threshold(val_pred), history, val_pred)


def bce_instances(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean BCE of instance logits ``(M,)`` against targets ``(M,)``."""
    return torch.nn.functional.binary_cross_entropy_with_logits(scores, targets)


def _hard_mask(ids: list[str], mined: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` bool: True at the mined hard-negative instances of each bag of the batch."""
    hard = torch.zeros_like(mask)  # (B, N)
    for b, sid in enumerate(ids):
        if sid in mined:
            hard[b, mined[sid]] = True
    return hard & mask  # (B, N)

