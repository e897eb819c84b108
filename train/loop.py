"""Fitting one MIL head on one fold: epochs, validation, early stopping, threshold.

Model selection (best epoch, early stopping) and the decision threshold use the validation
set only; the fold's test slides are not seen here. The loss of a step is `mil.train.objective`'s:
a named recipe (``bce`` or ``hnm-wsi``) of bag BCE, max-instance BCE and the MI ranking loss,
with hard negatives mined on a schedule (`mil.train.mining`) and, with sparse tile annotations
(`mil.train.instances`), an instance loss (``ece`` or ``bce``). When the ranking loss is on,
every batch holds both classes (`mil.train.sampling`; batch size 1 = the seed's bag pairs).

Multi-class (``head_kwargs["n_classes"] = C > 2``): class-weighted softmax cross-entropy, model
selection on the validation macro one-vs-rest AUC (`macro_ovr_auc`), no threshold (the predicted
class is the argmax); ``val_loss`` is the multi-class log loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import log_loss, roc_auc_score, roc_curve
from torch.utils.data import DataLoader

from mil.data import BagDataset, collate_bags, feature_stats
from mil.errors import OptionError
from mil.heads import HEADS, MULTICLASS_HEADS, Standardized, create_head
from mil.losses import BagCrossEntropyLoss
from mil.predict import predict
from mil.train.instances import InstanceLabels
from mil.train.mining import MinedSet, mine_hard_negatives
from mil.train.objective import Objective, recipe_defaults
from mil.train.sampling import BalancedBatchSampler

LOSS_PARTS = ("bag", "max_instance", "ranking", "hnm_instance", "instance")


@dataclass(frozen=True)
class TrainConfig:
    """Every option of the fit; written, resolved, to the run's config.json.

    Loss options left None are filled from ``recipe`` (`mil.train.objective.RECIPES`).
    """

    head: str = "abmil"
    head_kwargs: dict = field(default_factory=dict)
    epochs: int = 50
    patience: int = 10  # epochs without a better validation AUC before stopping
    lr: float = 1e-3  # defaults of lr and standardize: benchmarks/defaults.py (docs/defaults.md)
    weight_decay: float = 1e-4
    batch_size: int = 1  # bags per step (with the ranking loss, 1 = one positive + one negative bag)
    seed: int = 0
    recipe: str = "bce"  # "bce" or "hnm-wsi": fills the loss options below that are None
    bag_weight: float | None = None  # BCE on the bag logit (DSMIL: its bag branch)
    max_instance_weight: float | None = None  # BCE on the bag's largest instance score
    ranking_weight: float | None = None  # > 0 adds the MI ranking loss
    rank_k: int | None = None
    rank_margin: float | None = None
    hard_negatives: bool | None = None  # mine hard negative instances of the training bags
    neg_ratio: float | None = None  # fraction of all negative-bag instances kept as hard negatives
    hnm_warmup: int = 5  # epochs before the first mining
    hnm_every: int = 5  # epochs between refreshes
    hnm_bank: int | None = None  # mined negatives (any training bag) added to each ranking step's negative top-k pool
    hnm_instance_weight: float = 0.0  # opt-in: instance BCE, mined negatives -> 0 and pseudo-positives -> 1
    pos_ratio: float = 0.2  # pseudo-positives: top fraction of the confident positive-bag instances
    instance_loss: str = "ece"  # with instance labels: "ece" (exclusive cross-entropy) or "bce" (annotated tiles only)
    instance_weight: float = 1.0  # weight of the instance loss
    ece_schedule_epochs: int | None = None  # ECE's 200-epoch annealing stretched to this many epochs (None: --epochs)
    standardize: bool = True  # standardise features with the training bags' per-feature mean and sd

    @property
    def n_classes(self) -> int:
        """Number of classes: ``head_kwargs["n_classes"]`` (2, binary, when absent)."""
        return int(self.head_kwargs.get("n_classes", 2))

    def __post_init__(self) -> None:
        if self.n_classes != 2:
            self._check_multiclass()
        for name, value in recipe_defaults(self.recipe, self.head).items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        for name in ("epochs", "patience", "batch_size", "rank_k", "hnm_every"):
            if getattr(self, name) < 1:
                raise OptionError(f"expected --{name.replace('_', '-')} >= 1, got {getattr(self, name)!r} instead.")
        if not (0 < self.neg_ratio <= 1) or not (0 < self.pos_ratio <= 1) or self.hnm_warmup < 0 or self.hnm_bank < 0:
            raise OptionError(
                f"expected --neg-ratio and --pos-ratio in (0, 1], --hnm-warmup >= 0 and --hnm-bank >= 0, got "
                f"{self.neg_ratio!r}, {self.pos_ratio!r}, {self.hnm_warmup!r}, {self.hnm_bank!r} instead."
            )
        if self.instance_loss not in ("ece", "bce") or not (self.instance_weight >= 0):
            raise OptionError(
                f"expected --instance-loss ece or bce and --instance-weight >= 0, got {self.instance_loss!r} and "
                f"{self.instance_weight!r} instead."
            )
        if self.ece_schedule_epochs is not None and self.ece_schedule_epochs < 1:
            raise OptionError(f"expected --ece-schedule-epochs >= 1, got {self.ece_schedule_epochs!r} instead.")
        if not (self.lr > 0) or self.weight_decay < 0:
            raise OptionError(f"expected --lr > 0 and --weight-decay >= 0, got {self.lr!r} and {self.weight_decay!r} instead.")
        weights = {n: getattr(self, n) for n in ("bag_weight", "max_instance_weight", "ranking_weight", "hnm_instance_weight")}
        bad = [n for n, w in weights.items() if not (w >= 0)]
        if bad or not any(w > 0 for w in weights.values()):
            name = bad[0] if bad else "bag_weight"
            raise OptionError(
                f"expected loss weights >= 0 with one of them > 0, got --{name.replace('_', '-')} "
                f"{weights[name]!r} ({', '.join(f'{k}={v}' for k, v in weights.items())}) instead."
            )
        if self.hnm_instance_weight > 0 and not self.hard_negatives:
            raise OptionError(
                "expected --hard-negatives with --hnm-instance-weight > 0 (it trains the mined tiles), got no mining instead."
            )

    def _check_multiclass(self) -> None:
        """One line for what a multi-class run cannot do: a binary-only head, recipe or loss part."""
        c = self.head_kwargs.get("n_classes")
        if not isinstance(c, int) or isinstance(c, bool) or c < 2:
            raise OptionError(f"expected --n-classes to be an integer >= 2, got {c!r} instead.")
        if HEADS.has(self.head) and self.head not in MULTICLASS_HEADS:
            raise OptionError(
                f"expected a multi-class head ({', '.join(MULTICLASS_HEADS)}) for {c} classes, got head {self.head!r}, "
                "which is binary-only; pick one of those heads."
            )
        binary_only = {
            "recipe": self.recipe != "bce",
            "max_instance_weight": bool(self.max_instance_weight),
            "ranking_weight": bool(self.ranking_weight),
            "hard_negatives": bool(self.hard_negatives),
            "hnm_instance_weight": bool(self.hnm_instance_weight),
        }
        bad = [k for k, on in binary_only.items() if on]
        if bad:
            what = f"--recipe {self.recipe}" if bad[0] == "recipe" else f"--{bad[0].replace('_', '-')}"
            raise OptionError(
                f"expected the bce recipe's bag loss only for {c} classes, got {what}; hard-negative mining, ranking and "
                "max-instance losses (the hnm-wsi recipe) are binary-only."
            )


@dataclass
class FoldResult:
    state_dict: dict
    best_epoch: int
    threshold: float  # Youden's J on validation predictions of the selected model (NaN for multi-class: argmax)
    history: list[dict]  # one row per epoch: epoch, losses (total and by part), val_loss, val_auc, n_hard_negatives
    val_predictions: pd.DataFrame  # slide_id, label, probability (multi-class: prob_0 … prob_<C-1>, predicted)
    mined: MinedSet | None = None  # hard negatives of the training bags under the selected model (mining on)


def _cpu_state(model: torch.nn.Module) -> dict:
    """A copy of the model's state dict on the CPU (what checkpoints hold, whatever the training device)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _auc(pred: pd.DataFrame) -> float:
    if "probability" not in pred.columns:
        return macro_ovr_auc(pred)
    return float(roc_auc_score(pred["label"], pred["probability"])) if pred["label"].nunique() == 2 else math.nan


def prob_columns(pred: pd.DataFrame) -> list[str]:
    """The class-probability columns ``prob_0 … prob_<C-1>`` of a multi-class prediction table, in class order."""
    return sorted((c for c in pred.columns if c.startswith("prob_")), key=lambda c: int(c[len("prob_") :]))


def macro_ovr_auc(pred: pd.DataFrame) -> float:
    """Mean one-vs-rest AUC over the classes of a multi-class prediction table that can be scored (present and
    not alone); NaN when none can. With every class present it equals ``roc_auc_score(multi_class="ovr")``."""
    y, P = pred["label"].to_numpy(int), pred[prob_columns(pred)].to_numpy(float)  # (n,), (n, C)
    aucs = [float(roc_auc_score(y == k, P[:, k])) for k in range(P.shape[1]) if 0 < (y == k).sum() < len(y)]
    return float(np.mean(aucs)) if aucs else math.nan


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
    device: torch.device | None = None,
    autocast: torch.dtype | None = None,
) -> FoldResult:
    """Train `config.head` on `train_ds`, select the epoch on `val_ds`.

    The head runs on `device` (default CPU) with `autocast` mixed precision (`mil.device.autocast_dtype`;
    None = fp32); bags stay in RAM on the CPU and move to the device one batch at a time, and the
    returned state dict is on the CPU.

    With `annotations` (sparse tile labels, `mil.train.instances`), ``config.instance_loss`` on the
    instance scores is added to the bag loss with weight ``config.instance_weight``. With mining on,
    the hard negatives of the selected model are mined once more and returned (``FoldResult.mined``).
    """
    torch.manual_seed(config.seed)
    model = create_head(config.head, in_dim=in_dim, **config.head_kwargs)
    if config.standardize:  # statistics of the training bags only
        model = Standardized(model, *feature_stats(train_ds))
    device = torch.device("cpu") if device is None else device
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    labels = np.asarray(train_ds.labels)
    C = config.n_classes
    weights = BagCrossEntropyLoss.class_weights_from_labels(labels, C) if C > 2 else None  # n / (C · n_c)
    objective = Objective(config, float((labels == 0).sum() / max((labels == 1).sum(), 1)), annotations, config.seed, weights)
    gen = torch.Generator().manual_seed(config.seed)
    if config.ranking_weight > 0:  # every batch needs a positive and a negative bag
        loader = DataLoader(train_ds, batch_sampler=BalancedBatchSampler(labels, config.batch_size, gen), collate_fn=collate_bags)
    else:
        loader = DataLoader(train_ds, batch_size=config.batch_size, shuffle=True, generator=gen, collate_fn=collate_bags)

    def mine(m: torch.nn.Module) -> MinedSet:
        pos_ratio = config.pos_ratio if config.hnm_instance_weight > 0 else None
        bank = 20_000 if config.ranking_weight > 0 and config.hnm_bank > 0 else 0  # cap of the bank's features in RAM
        return mine_hard_negatives(m, train_ds, config.neg_ratio, pos_ratio=pos_ratio, bank_max=bank)

    best = (-math.inf, -math.inf)  # (val AUC, -val loss) compared lexicographically; the first epoch always beats it
    best_state, best_epoch, stale, history = None, 0, 0, []
    mined = MinedSet()
    for epoch in range(1, config.epochs + 1):
        if config.hard_negatives and epoch > config.hnm_warmup and (epoch - config.hnm_warmup - 1) % config.hnm_every == 0:
            mined = mine(model)
        objective.set_epoch(epoch)
        model.train()
        losses, parts, ranked = [], {k: [] for k in LOSS_PARTS}, []
        for X, mask, y, ids in loader:  # X (B, N, D), mask (B, N), y (B,)
            X, mask, y = X.to(device, non_blocking=True), mask.to(device), y.to(device)
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                loss, step_parts = objective(model, model(X, mask), mask, y, ids, mined)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            for k in LOSS_PARTS:  # a part missing from a step counts as 0 (e.g. ranking without a pair)
                parts[k].append(step_parts.get(k, 0.0))
            ranked.append("ranking" in step_parts)  # the step held a (positive, negative) pair
        pred = predict(model, val_ds, autocast)
        if C > 2:
            val_loss = float(log_loss(pred["label"], pred[prob_columns(pred)].to_numpy(), labels=list(range(C))))
        else:
            val_loss = float(log_loss(pred["label"], pred["probability"], labels=[0, 1]))
        row = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            "val_loss": val_loss,
            "val_auc": _auc(pred),
            "n_hard_negatives": len(mined),
            **{f"loss_{k}": float(np.mean(v)) for k, v in parts.items()},
            "ranking_steps": float(np.mean(ranked)),
        }
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
        score = (-math.inf if math.isnan(row["val_auc"]) else row["val_auc"], -val_loss)
        if score > best:
            best, best_state, best_epoch, stale = score, _cpu_state(model), epoch, 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    model.load_state_dict(best_state)
    val_pred = predict(model, val_ds, autocast)
    # The selected model's hard negatives, for export (no bank: nothing trains on them any more).
    final = mine_hard_negatives(model, train_ds, config.neg_ratio) if config.hard_negatives else None
    threshold = youden_threshold(val_pred) if C == 2 else math.nan  # multi-class: the argmax, no threshold
    return FoldResult(best_state, best_epoch, threshold, history, val_pred, final)
