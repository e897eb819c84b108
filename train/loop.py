"""Fitting one MIL head on one fold: epochs, validation, early stopping, threshold.

Model selection (best epoch, early stopping) and the decision threshold use the validation
set only; the fold's test slides are not seen here. The bag loss is BCE with ``pos_weight``
from the training labels; with ``ranking_weight > 0`` the multiple-instance ranking loss is
added on the positive × negative bag pairs of each batch.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from torch.utils.data import DataLoader

from mil.errors import OptionError
from mil.heads import create_head
from mil.losses import create_loss
from mil.train.data import BagDataset, collate_bags


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

    def __post_init__(self) -> None:
        for name in ("epochs", "patience", "batch_size", "rank_k"):
            if getattr(self, name) < 1:
                raise OptionError(f"expected --{name.replace('_', '-')} >= 1, got {getattr(self, name)!r} instead.")
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
    history: list[dict]  # one row per epoch: epoch, train_loss, val_loss, val_auc
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
    train_ds: BagDataset, val_ds: BagDataset, in_dim: int, config: TrainConfig, on_epoch: Callable[[dict], None] | None = None
) -> FoldResult:
    """Train `config.head` on `train_ds`, select the epoch on `val_ds`."""
    torch.manual_seed(config.seed)
    model = create_head(config.head, in_dim=in_dim, **config.head_kwargs)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    labels = np.asarray(train_ds.labels)
    pos_weight = float((labels == 0).sum() / max((labels == 1).sum(), 1))
    bce = create_loss("bce", pos_weight=pos_weight)
    ranking = create_loss("ranking", k=config.rank_k, margin=config.rank_margin) if config.ranking_weight > 0 else None
    gen = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(train_ds, batch_size=config.batch_size, shuffle=True, generator=gen, collate_fn=collate_bags)

    best = (-math.inf, math.inf)  # (val AUC, -val loss) compared lexicographically
    best_state, best_epoch, stale, history = None, 0, 0, []
    for epoch in range(1, config.epochs + 1):
        model.train()
        losses = []
        for X, mask, y, _ in loader:  # X (B, N, D), mask (B, N), y (B,)
            out = model(X, mask)
            loss = bce(out.logits, y)
            if ranking is not None and (y == 1).any() and (y == 0).any():
                pos, neg = y == 1, y == 0  # (B,)
                s = out.instance_scores  # (B, N)
                loss = loss + config.ranking_weight * ranking(s[pos], mask[pos], s[neg], mask[neg])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        pred = predict(model, val_ds)
        p = pred["probability"].clip(1e-7, 1 - 1e-7)
        val_loss = float(-(pred["label"] * np.log(p) + (1 - pred["label"]) * np.log(1 - p)).mean())
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val_loss, "val_auc": _auc(pred)}
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


def config_dict(config: TrainConfig) -> dict:
    return asdict(config)
