"""`mil evaluate run`: score a run's held-out slides once, with the run's own checkpoints and thresholds.

    RUN_DIR/eval/<split>/metrics.json     AUC with a stratified bootstrap CI; balanced accuracy, sensitivity,
                                          specificity, F1 at each fold's validation-chosen threshold;
                                          per-fold values and their mean ± sd; the options used
    RUN_DIR/eval/<split>/predictions.csv  fold, slide_id, label, probability, threshold, predicted
    RUN_DIR/eval/<split>/roc.png, pr.png  curves with their 95 % bootstrap bands

Which slides: each fold's ``<split>`` set in ``splits.csv`` (``test`` by default), scored by that
fold's checkpoint. For a cross-validated run that is every slide once per repeat. The decision
threshold of each fold is the one stored in its checkpoint, chosen on validation data during
training; the evaluated labels are used for nothing but the metrics. With repeated CV a slide has
one probability per repeat: the AUC and curves use each slide's mean probability (one point per
slide), the threshold metrics every (fold, slide) prediction.

Multi-class runs (config.json ``n_classes`` = C > 2): predictions.csv holds ``fold, slide_id, label,
prob_0 … prob_<C-1>, predicted`` (the argmax; no threshold); metrics.json holds ``auc_per_class``
(one-vs-rest AUC of each class) and ``auc_macro`` (their mean), each with a class-stratified
bootstrap CI computed on each slide's mean class probabilities, plus accuracy, balanced accuracy,
per-class recall and the confusion matrix (counts; rows = true class, columns = predicted) over
every (fold, slide) prediction, and per fold macro AUC, accuracy and balanced accuracy. Plots:
``roc.png`` (one one-vs-rest curve per class) and ``confusion.png``.

The outputs are written into a temporary folder renamed into place when whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score, roc_curve

import mil
from mil.atomic import atomic_folder, remove_stale_temporaries
from mil.checkpoint import load_head
from mil.data import BagDataset, FeatureSpec, resolve_feature_files
from mil.device import resolve_device
from mil.errors import OptionError, RunError, SettingsMismatchError
from mil.evaluate.metrics import (
    auc_ci,
    check_predictions,
    curve_bands,
    multiclass_auc_ci,
    multiclass_metrics,
    threshold_metrics,
)
from mil.predict import predict

SPLITS = ("test", "val", "train")
RUN_FILES = ("config.json", "splits.csv", "slides.csv")


@dataclass
class Run:
    """What `mil evaluate` reads from a run directory."""

    path: Path
    config: dict  # config.json
    splits: pd.DataFrame  # fold, set, slide_id
    slides: pd.DataFrame  # slide_id, label, … (the training manifest)
    checkpoints: dict[str, Path]  # fold -> checkpoint file

    @property
    def feature_spec(self) -> FeatureSpec:
        return FeatureSpec(**self.config["feature_spec"])

    def check_features(self, spec: FeatureSpec, where: str | Path) -> None:
        """`SettingsMismatchError` (one line naming both values) unless features of `spec` (in `where`) are the run's kind."""
        diff = self.feature_spec.first_difference(spec)
        if diff is not None:
            name, trained, given = diff
            raise SettingsMismatchError(
                f"{where}: expected features with {name}={trained!r} as the run was trained on, got {name}={given!r} instead; "
                "extract them with the run's settings (see its config.json)."
            )

    @property
    def n_classes(self) -> int:
        """2 for a binary run; C for a multi-class one (config.json ``n_classes``)."""
        return int(self.config.get("n_classes", 2))

    @property
    def classes(self) -> list[str]:
        """Class names in label order ("0", "1" for a binary run)."""
        return [str(c) for c in self.config.get("classes", range(self.n_classes))]


def load_run(run_dir: str | Path) -> Run:
    """Read a run directory written by `mil train features`; one-line `RunError` for a missing piece."""
    path = Path(run_dir)
    for name in RUN_FILES:
        if not (path / name).is_file():
            raise RunError(f"{path / name}: expected a run directory from `mil train features`, got no {name}; check the path or retrain.")
    try:
        config = json.loads((path / "config.json").read_text())
        splits = pd.read_csv(path / "splits.csv", dtype={"slide_id": str, "fold": str})
        slides = pd.read_csv(path / "slides.csv", dtype={"slide_id": str})
    except (ValueError, pd.errors.ParserError) as e:
        raise RunError(
            f"{path}: expected readable config.json / splits.csv / slides.csv, got {type(e).__name__}: {e}".splitlines()[0]
        ) from None
    _check_run_tables(path, config, splits, slides)
    checkpoints = {f: path / "checkpoints" / f"{f}.pt" for f in dict.fromkeys(splits["fold"])}
    missing = [str(p) for p in checkpoints.values() if not p.is_file()]
    if missing:
        raise RunError(
            f"{missing[0]}: expected a checkpoint for every fold of splits.csv, got {len(missing)} missing; was training interrupted?"
        )
    return Run(path, config, splits, slides, checkpoints)


def _check_run_tables(path: Path, config, splits: pd.DataFrame, slides: pd.DataFrame) -> None:
    """One-line `RunError` for a run file that parses but lacks what evaluation reads."""
    spec = config.get("feature_spec") if isinstance(config, dict) else None
    if not isinstance(config, dict) or not isinstance(config.get("feature_dir"), str) or not isinstance(spec, dict):
        raise RunError(
            f"{path / 'config.json'}: expected the config of a `mil train features` run (with feature_dir and "
            "feature_spec), got something else; check the path or retrain."
        )
    try:
        FeatureSpec(**spec)
    except TypeError:
        raise RunError(
            f"{path / 'config.json'}: expected a feature_spec with {', '.join(FeatureSpec.__dataclass_fields__)}, "
            f"got keys {sorted(spec)}; check the path or retrain."
        ) from None
    for name, table, cols in (("splits.csv", splits, ("fold", "set", "slide_id")), ("slides.csv", slides, ("slide_id", "label"))):
        missing = [c for c in cols if c not in table.columns]
        if missing:
            raise RunError(f"{path / name}: expected columns {', '.join(cols)}, got {list(table.columns)}; check the path or retrain.")


def score_split(
    run: Run, features: str | Path, split: str = "test", labels: pd.DataFrame | None = None, device: str = "cpu"
) -> pd.DataFrame:
    """Probabilities of each fold's `split` slides under that fold's checkpoint.

    Args:
        run: from `load_run`.
        features: folder of feature files; checked against the run's feature spec first.
        split: ``test``, ``val`` or ``train``.
        labels: ``slide_id, label`` table (default: the run's slides.csv).

    Returns:
        ``fold, slide_id, label, probability, threshold, predicted`` (one row per fold and slide); for a
        multi-class run ``fold, slide_id, label, prob_0 … prob_<C-1>, predicted`` (the argmax).

    Raises:
        OptionError: unknown split, no slide in it, or slides without a label.
        FeatureFileError / SettingsMismatchError: missing feature files (listed) or features made
            differently from the run's (naming the attribute).
    """
    if split not in SPLITS:
        raise OptionError(f"expected --split to be one of {', '.join(SPLITS)}, got {split!r} instead.")
    rows = run.splits[run.splits["set"] == split]
    if rows.empty:
        raise OptionError(
            f"{run.path / 'splits.csv'}: expected slides in the {split!r} set, got none; a run on the manifest's split column needs test slides."
        )
    table = run.slides if labels is None else labels
    label = dict(zip(table["slide_id"].astype(str), table["label"]))
    unlabelled = [s for s in dict.fromkeys(rows["slide_id"]) if pd.isna(label.get(s, np.nan))]
    if unlabelled:
        raise OptionError(
            f"expected a label for every {split} slide, got none for {len(unlabelled)}: {', '.join(unlabelled[:10])}; label them in the manifest."
        )
    files, spec = resolve_feature_files(pd.DataFrame({"slide_id": list(dict.fromkeys(rows["slide_id"]))}), features)
    run.check_features(spec, features)
    dev = resolve_device(device)
    out = []
    for fold, part in rows.groupby("fold", sort=False):
        model, ckpt = load_head(run.checkpoints[fold])
        model.to(dev)  # `predict` moves each bag to the model's device
        ids = part["slide_id"].tolist()
        ds = BagDataset([files[s] for s in ids], [int(label[s]) for s in ids], cache="stream", slide_ids=ids)
        pred = predict(model, ds)  # slide_id, label, probability (multi-class: prob_<k>, predicted)
        if run.n_classes > 2:
            out.append(pred.assign(fold=fold))
            continue
        t = float(ckpt["threshold"])
        out.append(pred.assign(fold=fold, threshold=t, predicted=(pred["probability"] >= t).astype(int)))
    pred = pd.concat(out, ignore_index=True)
    if run.n_classes > 2:
        return pred[["fold", *(c for c in pred.columns if c != "fold")]]
    return pred[["fold", "slide_id", "label", "probability", "threshold", "predicted"]]


def prob_columns(pred: pd.DataFrame) -> list[str]:
    """``prob_0 … prob_<C-1>`` of a multi-class prediction table, in class order."""
    return sorted((c for c in pred.columns if c.startswith("prob_")), key=lambda c: int(c[len("prob_") :]))


def summarise_multiclass(pred: pd.DataFrame, classes: list[str], n_boot: int = 1000, seed: int = 0) -> dict:
    """metrics.json's content for a multi-class run from `score_split`'s table (see the module docstring)."""
    cols = prob_columns(pred)
    C = len(cols)
    per_slide = pred.groupby("slide_id", sort=False).agg(label=("label", "first"), **{c: (c, "mean") for c in cols})
    aucs = multiclass_auc_ci(per_slide["label"], per_slide[cols].to_numpy(), n_boot=n_boot, seed=seed, classes=classes)
    counts = np.bincount(per_slide["label"].to_numpy(int), minlength=C)
    doc = {
        "n_slides": len(per_slide),
        "n_classes": C,
        "classes": list(classes),
        "n_per_class": {classes[k]: int(counts[k]) for k in range(C)},
        "folds": sorted(pred["fold"].unique().tolist()),
        "auc_macro": {**aucs["macro"], "n_boot": n_boot, "seed": seed, "level": aucs["level"]},
        "auc_per_class": aucs["per_class"],
        **multiclass_metrics(pred["label"], pred["predicted"], C),
    }
    per_fold = []
    for fold, part in pred.groupby("fold", sort=True):
        y, P = part["label"].to_numpy(int), part[cols].to_numpy(float)
        scored = [k for k in range(C) if 0 < (y == k).sum() < len(y)]
        auc = float(np.mean([roc_auc_score(y == k, P[:, k]) for k in scored])) if len(scored) == C else float("nan")
        m = multiclass_metrics(y, part["predicted"], C)
        per_fold.append(
            {"fold": fold, "n": len(part), "auc_macro": auc, "accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"]}
        )
    doc["per_fold"] = per_fold
    if len(per_fold) > 1:
        keys = ("auc_macro", "accuracy", "balanced_accuracy")
        doc["fold_mean_sd"] = {
            k: [float(np.nanmean([f[k] for f in per_fold])), float(np.nanstd([f[k] for f in per_fold], ddof=1))] for k in keys
        }
    return doc


def summarise(pred: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> dict:
    """metrics.json's content from `score_split`'s table (see the module docstring)."""
    per_slide = _per_slide(pred)
    y, p = check_predictions(per_slide["label"], per_slide["probability"])
    doc = {
        "n_slides": len(per_slide),
        "n_positive": int(y.sum()),
        "folds": sorted(pred["fold"].unique().tolist()),
        "auc": auc_ci(y, p, n_boot=n_boot, seed=seed),
        **threshold_metrics(pred["label"], pred["predicted"]),
    }
    per_fold = []
    for fold, part in pred.groupby("fold", sort=True):
        auc = auc_ci(part["label"], part["probability"], n_boot=1, seed=seed)["auc"] if part["label"].nunique() == 2 else float("nan")
        per_fold.append(
            {
                "fold": fold,
                "n": len(part),
                "auc": auc,
                "threshold": float(part["threshold"].iloc[0]),
                **threshold_metrics(part["label"], part["predicted"]),
            }
        )
    doc["per_fold"] = per_fold
    if len(per_fold) > 1:
        keys = ("auc", "balanced_accuracy", "sensitivity", "specificity", "f1", "accuracy")
        doc["fold_mean_sd"] = {
            k: [float(np.nanmean([f[k] for f in per_fold])), float(np.nanstd([f[k] for f in per_fold], ddof=1))] for k in keys
        }
    return doc


def evaluate_run(
    run_dir: str | Path,
    *,
    features: str | Path | None = None,
    labels: pd.DataFrame | None = None,
    split: str = "test",
    n_boot: int = 1000,
    seed: int = 0,
    device: str = "cpu",
) -> tuple[dict, Path]:
    """Score `split` of a run and write ``RUN_DIR/eval/<split>/``; return (metrics, that folder).

    `device` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) is where the heads run; the numbers do not depend on it.
    """
    run = load_run(run_dir)
    features = Path(features) if features is not None else Path(run.config["feature_dir"])
    pred = score_split(run, features, split, labels, device)
    multi = run.n_classes > 2
    metrics = summarise_multiclass(pred, run.classes, n_boot, seed) if multi else summarise(pred, n_boot, seed)
    doc = {"split": split, "run": str(run.path), "features": str(features), "mil_version": mil.__version__, **metrics}
    final = run.path / "eval" / split
    if final.parent.is_dir():
        remove_stale_temporaries(final.parent)  # left by a killed evaluation
    with atomic_folder(final) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(doc, indent=2) + "\n")
        pred.to_csv(tmp / "predictions.csv", index=False)
        if multi:
            plot_multiclass(pred, doc, tmp, title=f"{run.path.name} · {split}")
            return doc, final
        per_slide = _per_slide(pred)
        title = f"{run.path.name} · {split}"
        plot_curves(per_slide["label"], per_slide["probability"], tmp, title=title, auc=doc["auc"], n_boot=n_boot, seed=seed)
    return doc, final


def _per_slide(pred: pd.DataFrame) -> pd.DataFrame:
    """One row per slide: its label and its mean probability over the repeats that scored it."""
    return pred.groupby("slide_id", sort=False).agg(label=("label", "first"), probability=("probability", "mean"))


def plot_multiclass(pred: pd.DataFrame, doc: dict, out_dir: Path, title: str) -> None:
    """Write ``roc.png`` (one one-vs-rest ROC curve per class, on each slide's mean probabilities) and ``confusion.png``
    (the counts of `summarise_multiclass`'s confusion matrix) into `out_dir`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = prob_columns(pred)
    per_slide = pred.groupby("slide_id", sort=False).agg(label=("label", "first"), **{c: (c, "mean") for c in cols})
    y = per_slide["label"].to_numpy(int)
    fig, ax = plt.subplots(figsize=(4.6, 4.4), dpi=120)
    for k, (col, a) in enumerate(zip(cols, doc["auc_per_class"])):
        fpr, tpr, _ = roc_curve(y == k, per_slide[col])
        label = f"{a['class']}: AUC {a['auc']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}]"
        ax.plot(fpr, tpr, lw=1.6, drawstyle="steps-post", label=label)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    m = doc["auc_macro"]
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="false positive rate", ylabel="true positive rate")
    ax.set_title(f"{title}\nmacro AUC {m['auc']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]", fontsize=9)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "roc.png")
    plt.close(fig)

    cm = np.asarray(doc["confusion_matrix"])  # (C, C) rows true, columns predicted
    names = doc["classes"]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2.0, 1.2 * len(names) + 1.6), dpi=120)
    ax.imshow(cm, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set(xticks=range(len(names)), yticks=range(len(names)), xticklabels=names, yticklabels=names)
    ax.set(xlabel="predicted class", ylabel="true class", title=f"{title}\naccuracy {doc['accuracy']:.3f}")
    fig.tight_layout()
    fig.savefig(out_dir / "confusion.png")
    plt.close(fig)


def plot_curves(labels, probs, out_dir: Path, title: str, auc: dict | None = None, n_boot: int = 1000, seed: int = 0) -> None:
    """Write ``roc.png`` and ``pr.png`` with their pointwise 95 % bootstrap bands into `out_dir`.

    `auc` is `auc_ci`'s result for the legend when the caller has it already (`evaluate_run` does), so
    the bootstrap is not drawn a second time; None computes it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = curve_bands(labels, probs, n_boot=n_boot, seed=seed)
    auc = auc_ci(labels, probs, n_boot=n_boot, seed=seed) if auc is None else auc
    prevalence = float(np.mean(labels))
    for name, x, y, lo, hi, xlabel, ylabel, chance in [
        ("roc", c["fpr"], c["tpr"], c["tpr_low"], c["tpr_high"], "false positive rate", "true positive rate", ([0, 1], [0, 1])),
        ("pr", c["recall"], c["precision"], c["precision_low"], c["precision_high"], "recall", "precision", ([0, 1], [prevalence] * 2)),
    ]:
        fig, ax = plt.subplots(figsize=(4.2, 4.2), dpi=120)
        ax.fill_between(c["grid"], lo, hi, color="tab:blue", alpha=0.2, lw=0, label="95 % bootstrap band")
        ax.plot(
            x,
            y,
            color="tab:blue",
            lw=1.8,
            drawstyle="steps-post" if name == "roc" else "default",
            label=f"AUC {auc['auc']:.3f} [{auc['ci_low']:.3f}, {auc['ci_high']:.3f}]" if name == "roc" else "PR curve",
        )
        ax.plot(*chance, ls="--", color="grey", lw=0.8)
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel=xlabel, ylabel=ylabel, title=title)
        ax.legend(loc="lower right" if name == "roc" else "lower left", fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / f"{name}.png")
        plt.close(fig)
