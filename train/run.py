"""`mil train features`: every fold of a run, and the run directory (see docs/architecture.md).

    RUN_DIR/config.json          every resolved option, the feature spec, seed, code version, instance-label counts
    RUN_DIR/slides.csv           slide_id, label, patient_id, split of every manifest slide (labels for `mil evaluate`)
    RUN_DIR/splits.csv           fold, set (train/val/test), slide_id
    RUN_DIR/metrics.csv          fold, epoch, train_loss, val_loss, val_auc, n_hard_negatives, loss_<part>, ranking_steps
    RUN_DIR/checkpoints/<fold>.pt  self-describing: head name + kwargs + in_dim + feature spec + threshold
    RUN_DIR/predictions.csv      validation predictions of each fold's selected model
    RUN_DIR/hard_negatives/<fold>.csv  with mining: slide_id, tile_index, x, y, score of the training bags' hard
                                 negatives under the fold's selected model (for the encoder fine-tuning)
    RUN_DIR/summary.csv          fold, best_epoch, val_auc, threshold; written last (the run is finished)

Multi-class runs (``config.head_kwargs["n_classes"] = C > 2``; labels 0..C-1): config.json gains
``n_classes`` and ``classes`` (class names in label order; from the label table's map, else "0" …),
checkpoints gain the same two keys and hold ``threshold: None`` (the argmax decides), predictions.csv
holds ``prob_0 … prob_<C-1>, predicted`` instead of ``probability``, summary.csv's ``val_auc`` is
the validation macro one-vs-rest AUC and its threshold NaN. Every class must have training slides
in every fold. Binary runs write exactly what they did before.

Only the train and validation slides of each fold are opened: for a run on the manifest's
``split`` column the test slides are never read (their feature files need not even exist).
Rerunning into a finished run directory with the same settings does nothing; other settings
are refused unless ``overwrite``, which trains the new run in a hidden sibling folder and swaps
it in only when it has finished: a replacement that fails leaves the old run as it was.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

import mil
from mil.atomic import atomic_path, remove_stale_temporaries, write_csv, write_text
from mil.data import CACHE_MODES, BagDataset, resolve_feature_files
from mil.device import autocast_dtype, resolve_device
from mil.errors import ManifestError, MilError, OptionError
from mil.rundir import read_settings, refuse_other_settings, replacing
from mil.train.instances import read_instance_labels
from mil.train.loop import TrainConfig, fit_fold
from mil.train.mining import export_hard_negatives
from mil.train.splits import make_splits, splits_table

RUN_FILES = ("config.json", "slides.csv", "splits.csv", "metrics.csv", "predictions.csv", "summary.csv")


def run_train(
    feature_dir: str | Path,
    slides: pd.DataFrame,
    out_dir: str | Path,
    config: TrainConfig,
    *,
    folds: int | None = None,
    repeats: int = 1,
    val_fraction: float = 0.2,
    cache: str = "auto",
    overwrite: bool = False,
    on_epoch: Callable[[str, dict], None] | None = None,
    instance_labels: str | Path | None = None,
    device: str = "auto",
    precision: str = "auto",
    labels: dict | None = None,
) -> pd.DataFrame:
    """Train one head per fold and write the run directory; return the per-fold summary.

    Raises (before anything is written):
        ManifestError: a label outside 0..C-1 (C = ``config.n_classes``, 2 by default), a class without
            training slides in a fold, or a bad `instance_labels` CSV (see `mil.train.instances.read_instance_labels`).
        OptionError: `instance_labels` with more than two classes (instance losses are binary).
        FeatureFileError: missing feature files (all listed) or feature files made differently.
        SettingsMismatchError: `out_dir` holds a run with other settings and `overwrite` is False.

    A rerun with the same settings into a finished run directory does nothing and returns the
    stored summary (``summary.attrs["skipped"] = True``); an unfinished one is trained again.
    `device` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) and `precision` (``auto``, ``fp32``, ``bf16``;
    `mil.device.autocast_dtype`) say where and how the heads train; they are recorded under
    ``runtime`` in config.json and are not compared on reruns. `labels` is how a label table was
    read (`mil.labels.LabelTable.describe`: layout, column, class map), recorded when given.
    """
    out = Path(out_dir)
    dev = resolve_device(device)
    autocast = autocast_dtype(precision, dev)
    if cache not in CACHE_MODES:  # before anything is written (BagDataset would only say so inside the first fold)
        raise OptionError(f"expected --cache to be one of {', '.join(CACHE_MODES)}, got {cache!r} instead.")
    C = config.n_classes
    if C == 2:
        _check_binary(slides, config.head)
    else:
        _check_classes(slides, C)
    if C > 2 and instance_labels is not None:
        raise OptionError(f"expected no --instance-labels for {C} classes, got {instance_labels}; instance losses are binary-only.")
    fold_list = make_splits(slides, folds=folds, repeats=repeats, val_fraction=val_fraction, seed=config.seed)
    if C == 2:
        _check_both_labels(slides, fold_list)
    else:
        _check_every_class(slides, fold_list, class_names(labels, C))
    used = sorted({s for f in fold_list for s in (*f.train, *f.val)})  # test slides are not opened
    files, spec = resolve_feature_files(slides[slides["slide_id"].isin(used)], feature_dir)
    label = dict(zip(slides["slide_id"], slides["label"]))
    mil.create_head(config.head, in_dim=spec.feature_dim, **config.head_kwargs)  # bad head options fail before any write
    annotations = read_instance_labels(instance_labels, files, label) if instance_labels is not None else None

    doc = {
        "stage": "train",
        "mil_version": mil.__version__,
        "feature_dir": str(feature_dir),
        "feature_spec": spec.as_dict(),
        "train": asdict(config),
        "folds": folds,
        "repeats": repeats,
        "val_fraction": val_fraction,
        "cache": cache,
        "instance_labels": None
        if annotations is None
        else {
            "path": str(instance_labels),
            "rows": annotations.n_rows,
            "rows_unused": annotations.n_unused,
            "slides": len(annotations.by_slide),
        },
        "slides_sha256": _table_hash(slides),
        **({"labels": labels} if labels is not None else {}),
        **({"n_classes": C, "classes": class_names(labels, C)} if C > 2 else {}),
        "runtime": {"device": str(dev), "precision": "fp32" if autocast is None else "bf16"},  # not compared on reruns
    }
    doc = json.loads(json.dumps(doc))  # as it reads back from config.json
    if (out / "config.json").exists() and not overwrite:
        refuse_other_settings(out, read_settings(out / "config.json", "`mil train features`"), doc)
        if (out / "summary.csv").exists():  # finished with the same settings: nothing to do
            summary = pd.read_csv(out / "summary.csv", dtype={"fold": str})
            summary.attrs["skipped"] = True
            return summary
    if overwrite and out.exists():
        # --overwrite: the new run is trained in a hidden sibling folder that replaces `out` only once it
        # has finished, so a run that fails (or is killed) keeps the old outputs.
        with replacing(out) as tmp:
            (tmp / "checkpoints").mkdir()
            return _train_folds(tmp, slides, fold_list, files, label, spec, config, doc, cache, on_epoch, annotations, (dev, autocast))
    if out.exists() and (out / "config.json").exists():
        shutil.rmtree(out)  # an unfinished run with the same settings: trained again
    created, created_checkpoints = not out.exists(), not (out / "checkpoints").exists()
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    for folder in (out, out / "checkpoints"):  # leftovers of a run killed before its config.json was written
        remove_stale_temporaries(folder)
    try:
        return _train_folds(out, slides, fold_list, files, label, spec, config, doc, cache, on_epoch, annotations, (dev, autocast))
    except MilError:
        # A user mistake found while training (a NaN bag read in the first fold, a bag beyond float16
        # range …): leave no half-written run directory behind (docs/architecture.md, "Errors").
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:  # a folder that was there before: remove only what this run wrote into it
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
            if created_checkpoints:
                shutil.rmtree(out / "checkpoints", ignore_errors=True)
            shutil.rmtree(out / "hard_negatives", ignore_errors=True)
        raise


def _train_folds(out, slides, fold_list, files, label, spec, config, doc, cache, on_epoch, annotations, runtime) -> pd.DataFrame:
    """Write the run directory's files and train every fold (see `run_train`)."""
    write_text(out / "config.json", json.dumps(doc, indent=2) + "\n")
    write_csv(out / "slides.csv", slides[[c for c in ("slide_id", "label", "patient_id", "split") if c in slides.columns]])
    write_csv(out / "splits.csv", splits_table(fold_list))

    used = list(dict.fromkeys(s for fold in fold_list for s in (*fold.train, *fold.val)))  # every bag training reads
    bags = BagDataset([files[s] for s in used], [int(label[s]) for s in used], cache=cache, slide_ids=used)  # read once

    def dataset(ids: tuple[str, ...]) -> BagDataset:
        return bags.subset(ids)

    metrics, preds, summary = [], [], []
    for fold in fold_list:
        train_ds, val_ds = dataset(fold.train), dataset(fold.val)
        report = (lambda row, f=fold.name: on_epoch(f, row)) if on_epoch else None
        res = fit_fold(train_ds, val_ds, spec.feature_dim, config, report, annotations, *runtime)  # runtime: (device, autocast)
        ckpt = {
            "head": config.head,
            "head_kwargs": dict(config.head_kwargs),
            "in_dim": spec.feature_dim,
            "feature_spec": spec.as_dict(),
            "threshold": res.threshold if config.n_classes == 2 else None,
            "best_epoch": res.best_epoch,
            "standardize": config.standardize,
            "fold": fold.name,
            "mil_version": mil.__version__,
            "state_dict": res.state_dict,
        }
        if config.n_classes > 2:
            ckpt |= {"n_classes": config.n_classes, "classes": doc["classes"]}
        with atomic_path(out / "checkpoints" / f"{fold.name}.pt") as tmp:
            torch.save(ckpt, tmp)
        if res.mined is not None:
            (out / "hard_negatives").mkdir(exist_ok=True)
            export_hard_negatives(res.mined, files, out / "hard_negatives" / f"{fold.name}.csv")
        metrics += [{"fold": fold.name, **row} for row in res.history]
        preds.append(res.val_predictions.assign(fold=fold.name))
        best = res.history[res.best_epoch - 1]
        summary.append({"fold": fold.name, "best_epoch": res.best_epoch, "val_auc": best["val_auc"], "threshold": res.threshold})
        write_csv(out / "metrics.csv", pd.DataFrame(metrics))  # after every fold: progress survives a crash
    pred = pd.concat(preds, ignore_index=True)
    write_csv(out / "predictions.csv", pred[["fold", *(c for c in pred.columns if c != "fold")]])
    write_csv(out / "summary.csv", pd.DataFrame(summary))  # written last: marks the run finished
    return pd.DataFrame(summary)


def _table_hash(slides: pd.DataFrame) -> str:
    """SHA-256 of the manifest columns that define a run (ids, labels, splits, patients)."""
    cols = [c for c in ("slide_id", "label", "split", "patient_id") if c in slides.columns]
    return hashlib.sha256(slides[cols].astype(str).to_csv(index=False).encode()).hexdigest()


def _check_both_labels(slides: pd.DataFrame, fold_list) -> None:
    """A classifier needs positive and negative training slides in every fold."""
    label = dict(zip(slides["slide_id"], slides["label"]))
    for fold in fold_list:
        present = sorted({int(label[s]) for s in fold.train})
        if len(present) < 2:
            raise ManifestError(
                f"expected training slides of both labels 0 and 1 in fold {fold.name}, got only label {present[0] if present else '-'} "
                f"({len(fold.train)} slides); label both classes in the manifest."
            )


def class_names(labels: dict | None, n_classes: int) -> list[str]:
    """Names of classes 0..C-1: the label table's map inverted (`mil.labels.LabelTable.describe`), else "0" …"""
    mapping = (labels or {}).get("label_map") or {}
    names = {int(v): str(k) for k, v in mapping.items()}
    return [names.get(k, str(k)) for k in range(n_classes)]


def _check_classes(slides: pd.DataFrame, n_classes: int) -> None:
    """Every label is an integer class 0..C-1."""
    labels = slides["label"].dropna()
    bad = labels[~labels.isin(range(n_classes))]
    if len(bad):
        i = bad.index[0]
        raise ManifestError(
            f"expected labels 0..{n_classes - 1} for {n_classes} classes, got label {bad.iloc[0]} for slide {slides['slide_id'][i]!r}"
            f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''} instead; fix the label or raise --n-classes."
        )


def _check_every_class(slides: pd.DataFrame, fold_list, names: list[str]) -> None:
    """A multi-class classifier needs training slides of every class in every fold."""
    label = dict(zip(slides["slide_id"], slides["label"]))
    for fold in fold_list:
        present = {int(label[s]) for s in fold.train}
        missing = [k for k in range(len(names)) if k not in present]
        if missing:
            k = missing[0]
            raise ManifestError(
                f"expected training slides of every class in fold {fold.name}, got none of class {names[k]!r} (label {k}) "
                f"among its {len(fold.train)} training slides; add slides of that class or use fewer --folds."
            )


def _check_binary(slides: pd.DataFrame, head: str) -> None:
    labels = slides["label"].dropna()
    bad = labels[~labels.isin([0, 1])]
    if len(bad):
        i = bad.index[0]
        raise ManifestError(
            f"expected binary labels 0/1 for head {head!r}, got label {bad.iloc[0]} for slide {slides['slide_id'][i]!r}"
            f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''} instead; every head is a binary slide classifier."
        )
