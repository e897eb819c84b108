"""Slide-level metrics with bootstrap confidence intervals.

The metrics themselves are scikit-learn's; this module only writes the resampling:

* `bootstrap_indices`: stratified resamples (positives and negatives drawn separately, so every
  resample holds both classes and keeps the prevalence).
* `auc_ci`: AUC with a percentile bootstrap interval (`resampled_auc` scores all resamples at once).
* `paired_auc_test`: two models scored on the same slides: the AUC difference, its interval
  and a two-sided p-value from the paired bootstrap (both models see the same resample).
* `curve_bands`: ROC and precision-recall curves with pointwise bootstrap bands, for the plots.
* multi-class (C > 2): `multiclass_auc_ci` (one-vs-rest AUC per class and their macro mean, each with
  a class-stratified bootstrap interval) and `multiclass_metrics` (accuracy, balanced accuracy,
  confusion matrix).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import (
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_curve,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from mil.errors import OptionError

GRID = np.linspace(0.0, 1.0, 101)  # FPR / recall points of the curve bands


def check_predictions(labels, probs) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``labels (n,)`` in {0, 1} with both classes present and finite ``probs (n,)``; return them as arrays."""
    y = np.asarray(labels)
    p = np.asarray(probs, dtype=float)
    if y.ndim != 1 or y.shape != p.shape:
        raise OptionError(f"expected labels and probabilities of the same shape (n,), got {y.shape} and {p.shape} instead.")
    if not np.isin(y, (0, 1)).all():
        raise OptionError(f"expected labels 0/1, got {sorted(set(y.tolist()) - {0, 1})[:5]} instead.")
    if len(np.unique(y)) < 2:
        raise OptionError(
            f"expected both classes among the evaluated slides to compute an AUC, got only label {int(y[0]) if len(y) else '-'} ({len(y)} slides)."
        )
    if not np.isfinite(p).all():
        raise OptionError("expected finite probabilities, got NaN or Inf instead.")
    return y.astype(int), p


def bootstrap_indices(labels: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """``(n_boot, n)`` indices of stratified bootstrap resamples of ``labels (n,)``."""
    if n_boot < 1:
        raise OptionError(f"expected --n-boot >= 1, got {n_boot!r} instead.")
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)  # (n1,), (n0,)
    return np.concatenate([rng.choice(pos, (n_boot, len(pos))), rng.choice(neg, (n_boot, len(neg)))], axis=1)  # (n_boot, n)


def resampled_auc(labels: np.ndarray, probs: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``(n_boot,)`` AUCs of the resamples ``idx (n_boot, n)`` of `bootstrap_indices`, all at once.

    The Mann–Whitney form of the AUC (ties count one half, as in `roc_auc_score`): the rank sum of
    the positives. Each row of `idx` holds the positives first, so one `rankdata` call scores every
    resample (about 100× faster than `roc_auc_score` per resample at n = 100).
    """
    n1 = int((labels == 1).sum())
    n0 = idx.shape[1] - n1
    ranks = rankdata(probs[idx], axis=1)  # (n_boot, n), ties averaged
    return (ranks[:, :n1].sum(axis=1) - n1 * (n1 + 1) / 2) / (n1 * n0)  # (n_boot,)


def auc_ci(labels, probs, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """AUC of ``probs (n,)`` against ``labels (n,)`` with a stratified percentile-bootstrap interval.

    Returns:
        ``{"auc", "ci_low", "ci_high", "n_boot", "seed", "level"}``.
    """
    y, p = check_predictions(labels, probs)
    boot = resampled_auc(y, p, bootstrap_indices(y, n_boot, seed))  # (n_boot,)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return {"auc": float(roc_auc_score(y, p)), "ci_low": float(lo), "ci_high": float(hi), "n_boot": n_boot, "seed": seed, "level": level}


def threshold_metrics(labels, predicted) -> dict:
    """Balanced accuracy, sensitivity, specificity and F1 of hard predictions ``(n,)`` in {0, 1}."""
    y, yhat = np.asarray(labels, int), np.asarray(predicted, int)
    return {
        "balanced_accuracy": float(balanced_accuracy_score(y, yhat)),
        "sensitivity": float(recall_score(y, yhat, pos_label=1, zero_division=0)),
        "specificity": float(recall_score(y, yhat, pos_label=0, zero_division=0)),
        "f1": float(f1_score(y, yhat, zero_division=0)),
        "accuracy": float((y == yhat).mean()),
    }


def paired_auc_test(labels, probs_a, probs_b, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Paired stratified bootstrap of ``AUC(b) − AUC(a)`` on the same slides.

    Returns:
        ``{"auc_a", "auc_b", "diff", "ci_low", "ci_high", "p_value", "n_boot", "seed"}``; the p-value is
        two-sided, ``2 · min(P(Δ* ≤ 0), P(Δ* ≥ 0))`` over resamples (at least ``1 / n_boot``).
    """
    y, pa = check_predictions(labels, probs_a)
    _, pb = check_predictions(labels, probs_b)
    idx = bootstrap_indices(y, n_boot, seed)  # (n_boot, n)
    diff = resampled_auc(y, pb, idx) - resampled_auc(y, pa, idx)  # (n_boot,)
    lo, hi = np.quantile(diff, [(1 - level) / 2, (1 + level) / 2])
    p = min(1.0, 2 * min((diff <= 0).mean(), (diff >= 0).mean()))
    auc_a, auc_b = float(roc_auc_score(y, pa)), float(roc_auc_score(y, pb))
    return {
        "auc_a": auc_a,
        "auc_b": auc_b,
        "diff": auc_b - auc_a,
        "ci_low": float(lo),
        "ci_high": float(hi),
        "p_value": max(p, 1.0 / n_boot),
        "n_boot": n_boot,
        "seed": seed,
    }


def curve_bands(labels, probs, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, np.ndarray]:
    """ROC (TPR at `GRID` FPR) and PR (precision at `GRID` recall) curves with pointwise bootstrap bands.

    Returns:
        ``fpr, tpr`` and ``recall, precision`` of the full data (sklearn's curves), and on ``grid (G,)``:
        ``tpr_low, tpr_high, precision_low, precision_high`` ``(G,)``.
    """
    y, p = check_predictions(labels, probs)
    tprs, precs = [], []
    for i in bootstrap_indices(y, n_boot, seed):
        fpr, tpr, _ = roc_curve(y[i], p[i])
        tprs.append(np.interp(GRID, fpr, tpr))  # (G,)
        prec, rec, _ = precision_recall_curve(y[i], p[i])
        precs.append(np.interp(GRID, rec[::-1], prec[::-1]))  # (G,) recall increasing
    q = [(1 - level) / 2, (1 + level) / 2]
    tpr_band, prec_band = np.quantile(np.array(tprs), q, axis=0), np.quantile(np.array(precs), q, axis=0)  # (2, G) each
    fpr, tpr, _ = roc_curve(y, p)
    prec, rec, _ = precision_recall_curve(y, p)
    return {
        "fpr": fpr,
        "tpr": tpr,
        "recall": rec,
        "precision": prec,
        "grid": GRID,
        "tpr_low": tpr_band[0],
        "tpr_high": tpr_band[1],
        "precision_low": prec_band[0],
        "precision_high": prec_band[1],
    }


# ---------------------------------------------------------------------------------------------- multi-class
def check_multiclass(labels, probs) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``labels (n,)`` in ``0..C-1`` with every class present and finite ``probs (n, C)``; return them as arrays."""
    y = np.asarray(labels)
    P = np.asarray(probs, dtype=float)
    if y.ndim != 1 or P.ndim != 2 or len(y) != len(P) or P.shape[1] < 3:
        raise OptionError(f"expected labels (n,) and class probabilities (n, C) with C >= 3, got {y.shape} and {P.shape} instead.")
    C = P.shape[1]
    if not np.isin(y, np.arange(C)).all():
        raise OptionError(f"expected labels 0..{C - 1}, got {sorted(set(y.tolist()) - set(range(C)))[:5]} instead.")
    missing = [k for k in range(C) if not (y == k).any()]
    if missing:
        raise OptionError(
            f"expected every class among the evaluated slides to compute one-vs-rest AUCs, got no slide of class {missing[0]} "
            f"({len(y)} slides)."
        )
    if not np.isfinite(P).all():
        raise OptionError("expected finite probabilities, got NaN or Inf instead.")
    return y.astype(int), P


def stratified_indices(labels: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """``(n_boot, n)`` indices of bootstrap resamples drawn within each class of ``labels (n,)`` (class 0's first, then 1's …),
    so every resample keeps every class's count."""
    if n_boot < 1:
        raise OptionError(f"expected --n-boot >= 1, got {n_boot!r} instead.")
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.choice(m, (n_boot, len(m))) for m in (np.flatnonzero(labels == k) for k in np.unique(labels))], axis=1)


def _ovr_auc_rows(y: np.ndarray, p: np.ndarray, idx: np.ndarray, k: int) -> np.ndarray:
    """``(n_boot,)`` one-vs-rest AUCs of class `k` over resamples ``idx (n_boot, n)`` (Mann–Whitney, ties one half)."""
    pos = y[idx[0]] == k  # (n,) the same in every row: the resamples are stratified
    n1, n0 = int(pos.sum()), int((~pos).sum())
    ranks = rankdata(p[idx], axis=1)  # (n_boot, n)
    return (ranks[:, pos].sum(axis=1) - n1 * (n1 + 1) / 2) / (n1 * n0)


def multiclass_auc_ci(labels, probs, n_boot: int = 1000, seed: int = 0, level: float = 0.95, classes=None) -> dict:
    """One-vs-rest AUC of each class and their (unweighted) macro mean, each with a percentile interval from the same
    class-stratified bootstrap resamples (`stratified_indices`).

    Returns:
        ``{"per_class": [{"class", "label", "auc", "ci_low", "ci_high"}, …], "macro": {"auc", "ci_low", "ci_high"},
        "n_boot", "seed", "level"}``; the point values equal ``roc_auc_score(multi_class="ovr", average=None / "macro")``.
    """
    y, P = check_multiclass(labels, probs)
    C = P.shape[1]
    names = [str(k) for k in range(C)] if classes is None else [str(c) for c in classes]
    idx = stratified_indices(y, n_boot, seed)  # (n_boot, n)
    boot = np.stack([_ovr_auc_rows(y, P[:, k], idx, k) for k in range(C)], axis=1)  # (n_boot, C)
    q = [(1 - level) / 2, (1 + level) / 2]
    point = [float(roc_auc_score(y == k, P[:, k])) for k in range(C)]
    lo, hi = np.quantile(boot, q, axis=0)  # (C,) each
    mlo, mhi = np.quantile(boot.mean(axis=1), q)
    return {
        "per_class": [{"class": names[k], "label": k, "auc": point[k], "ci_low": float(lo[k]), "ci_high": float(hi[k])} for k in range(C)],
        "macro": {"auc": float(np.mean(point)), "ci_low": float(mlo), "ci_high": float(mhi)},
        "n_boot": n_boot,
        "seed": seed,
        "level": level,
    }


def multiclass_metrics(labels, predicted, n_classes: int) -> dict:
    """Accuracy, balanced accuracy (mean per-class recall), per-class recall and the confusion matrix (rows: true class,
    columns: predicted class, counts) of hard predictions ``(n,)`` in ``0..C-1``."""
    y, yhat = np.asarray(labels, int), np.asarray(predicted, int)
    cm = confusion_matrix(y, yhat, labels=list(range(n_classes)))  # (C, C)
    present = cm.sum(axis=1) > 0
    recall = np.divide(np.diag(cm), cm.sum(axis=1), out=np.full(n_classes, np.nan), where=present)
    return {
        "accuracy": float((y == yhat).mean()),
        "balanced_accuracy": float(np.nanmean(recall)) if present.any() else float("nan"),
        "recall": [None if np.isnan(r) else float(r) for r in recall],
        "confusion_matrix": cm.astype(int).tolist(),
    }
