"""`mil evaluate predict`: score a new cohort (labelled or not) with the ensemble of a run's folds.

Input: a folder of feature files (every ``*.h5`` in it; slide id = file name; no labels) or a
manifest CSV (``slide_id`` and optionally ``label`` 0/1/empty; other columns such as ``path`` are
ignored) with ``--features DIR``. Every fold's checkpoint scores every slide, one bag at a time:

    OUT/predictions.csv    slide_id, [label], n_tiles, probability, threshold, predicted,
                           then per fold f: probability_<f>, threshold_<f>, predicted_<f>
    OUT/tiles/<slide_id>.h5   coords (N, 2); instance_score (N,) and attention (N,) (heads with
                           attention only) averaged over folds; instance_score_folds (F, N) and
                           attention_folds (F, N) per fold, rows in the order of the ``folds`` attr
    OUT/config.json        the resolved options: run, input, features, folds, thresholds, mil_version …
    OUT/metrics.json, roc.png, pr.png   when some slides are labelled (both classes): `evaluate run`'s
                           metrics on the labelled slides, plus ``ensemble`` (metrics of the ensemble rule)

Ensemble rule: ``probability`` is the mean of the folds' probabilities; ``threshold`` the mean of
the folds' validation thresholds (each stored in its checkpoint, chosen during training);
``predicted = probability >= threshold``. Each fold's own threshold and prediction sit beside it.
A slide with no tile has empty probabilities (a warning names it) and is left out of the metrics.

Multi-class runs (config.json ``n_classes`` = C > 2): each fold gives the softmax of its C class logits;
the ensemble's ``prob_<k>`` is the mean over folds of those probability vectors and ``predicted`` its
argmax (each fold's ``predicted_<f>`` the argmax of its own); no thresholds (config.json says
``"argmax"``). predictions.csv: ``slide_id, [label], n_tiles, prob_0 … prob_<C-1>, predicted``, then per
fold f: ``prob_0_<f> … prob_<C-1>_<f>, predicted_<f>``. Tile files: ``instance_score`` (N, C) fold mean and
``instance_score_folds`` (F, N, C) (csv: ``instance_score_<k>``, ``instance_score_<k>_<f>``); attention as
above. metrics.json (labelled slides holding every class): `evaluate run`'s multi-class metrics
(`summarise_multiclass`: per-class and macro one-vs-rest AUC with bootstrap CIs on the ensemble
probabilities, accuracy, balanced accuracy, recall and confusion matrix over every (fold, slide) prediction,
``per_fold``), plus ``ensemble`` (those hard-prediction metrics of the ensemble's argmax); plots ``roc.png``
and ``confusion.png``.

Everything is checked before any work (run, input, feature files and their spec against the
run's, --out); the outputs are written into a temporary folder renamed when whole.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import mil
from mil.checkpoint import load_head
from mil.data import resolve_feature_files
from mil.device import resolve_device
from mil.errors import OptionError, SettingsMismatchError
from mil.evaluate.metrics import multiclass_metrics, threshold_metrics
from mil.evaluate.run import Run, load_run, plot_curves, plot_multiclass, summarise, summarise_multiclass
from mil.features import check_finite, read_bag
from mil.labels import read_label_table
from mil.manifest import check_slide_id
from mil.rundir import replacing

TILE_FORMATS = ("h5", "csv", "both", "none")
COORD_ATTRS = ("patch_size", "patch_size_level0", "target_mpp", "level0_mpp", "level0_width", "level0_height", "overlap")


@dataclass
class Cohort:
    """The slides to score: ``slides`` (slide_id, label: Int64, NA = unlabelled) and their feature folder."""

    source: Path
    kind: str  # "folder" | "manifest"
    features: Path
    slides: pd.DataFrame


def read_cohort(source: str | Path, features: str | Path | None = None, labels: dict | None = None) -> Cohort:
    """The slides of a feature folder (every ``*.h5``, unlabelled) or of a label table with `features`.

    A label table is read as `mil train features` reads one (ours or CLAM's, `mil.labels`), with the
    training run's label column and class map (`labels`, config.json's ``labels``); without one,
    labels must be 0, 1 or empty (a multi-class run's: its class names or 0..C-1, or empty).

    Raises (one line): OptionError (a source that is neither, no ``.h5`` in the folder, --features
    missing or superfluous), ManifestError (no slide_id column, duplicate id, label not 0/1/empty).
    """
    source = Path(source)
    if source.is_dir():
        if features is not None and Path(features).resolve() != source.resolve():
            raise OptionError(f"{source}: is a folder of feature files already; drop --features (it is for a manifest CSV).")
        files = sorted(source.glob("*.h5"))
        if not files:
            raise OptionError(f"{source}: expected a folder of feature files (*.h5), found none; run `mil extract features` first.")
        ids = [check_slide_id(p.stem, where=f"{p}: ") for p in files]
        slides = pd.DataFrame({"slide_id": ids, "label": pd.array([None] * len(ids), dtype="Int64")})
        return Cohort(source, "folder", source, slides)
    if not source.is_file():
        raise OptionError(f"expected a folder of feature files or a manifest CSV, got {str(source)!r} which does not exist.")
    if features is None:
        raise OptionError(f"{source}: is a manifest; expected --features DIR, the folder of its slides' feature files.")
    labels = labels or {}
    n_classes = int(labels.get("n_classes", 2))
    binary_map = {"0": 0, "1": 1, "0.0": 0, "1.0": 1} if n_classes == 2 else None
    table = read_label_table(
        source, label_column=labels.get("label_column", "label"), label_map=labels.get("label_map") or binary_map, n_classes=n_classes
    )
    if table.ignored:
        warnings.warn(f"{source}: ignoring column(s) {', '.join(map(repr, table.ignored))}", stacklevel=2)
    return Cohort(source, "manifest", Path(features), table.slides[["slide_id", "label"]].reset_index(drop=True))


def check_out(out: Path, overwrite: bool, keep: list[Path]) -> None:
    """Refuse an --out that is a file, holds the run / features / input, or is a non-empty folder without `overwrite`."""
    if out.exists() and not out.is_dir():
        raise OptionError(f"{out}: expected --out to be a folder, got a file; choose another --out.")
    for p in keep:
        if p.resolve() == out.resolve() or p.resolve().is_relative_to(out.resolve()):
            raise OptionError(f"{out}: expected an --out folder apart from the run, the features and the input, got one holding {p}.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SettingsMismatchError(f"{out}: exists and is not empty; choose another --out, or pass --overwrite to replace it.")


def predict_cohort(
    run_dir: str | Path,
    source: str | Path,
    out: str | Path,
    *,
    features: str | Path | None = None,
    device: str = "auto",
    tiles: str = "h5",
    overwrite: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = False,
) -> tuple[pd.DataFrame, dict | None, Path]:
    """Score `source` with every fold of `run_dir` and write `out` (see the module docstring).

    Returns:
        (predictions.csv's table, metrics.json's content or None when no labelled slides of both
        classes, the output folder).

    Raises (before anything is written, one line each): RunError (not a run, unreadable checkpoint),
    OptionError / ManifestError (bad input or option), FeatureFileError (missing feature files, all
    listed), SettingsMismatchError (features made differently from the run's, or --out not empty).
    """
    if tiles not in TILE_FORMATS:
        raise OptionError(f"expected --tiles to be one of {', '.join(TILE_FORMATS)}, got {tiles!r} instead.")
    if n_boot < 1:
        raise OptionError(f"expected --n-boot >= 1, got {n_boot!r} instead.")
    run = load_run(run_dir)
    multi = run.n_classes > 2
    cohort = read_cohort(source, features, run.config.get("labels"))
    files, spec = resolve_feature_files(cohort.slides, cohort.features)
    run.check_features(spec, cohort.features)
    out = Path(out)
    check_out(out, overwrite, [run.path, cohort.features, cohort.source])
    dev = resolve_device(device)
    heads = {fold: load_head(path) for fold, path in run.checkpoints.items()}
    models = {fold: model.to(dev) for fold, (model, _) in heads.items()}
    thresholds = None if multi else {fold: float(ckpt["threshold"]) for fold, (_, ckpt) in heads.items()}
    ckpt0 = next(iter(heads.values()))[1]
    config = {
        "command": "mil evaluate predict",
        "run": str(run.path.resolve()),
        "input": str(cohort.source.resolve()),
        "input_kind": cohort.kind,
        "features": str(cohort.features.resolve()),
        "feature_spec": spec.as_dict(),
        "folds": list(models),
        "head": ckpt0.get("head"),
        "thresholds": "argmax" if multi else thresholds,
        "ensemble": (
            "prob_k = mean of the folds' softmax probabilities; predicted = argmax"
            if multi
            else "probability = mean of the folds' probabilities; predicted = probability >= mean of the folds' thresholds"
        ),
        "ensemble_threshold": "argmax" if multi else float(np.mean(list(thresholds.values()))),
        **({"n_classes": run.n_classes, "classes": run.classes} if multi else {}),
        "tiles": tiles,
        "device": str(dev),
        "n_boot": n_boot,
        "seed": seed,
        "n_slides": len(cohort.slides),
        "n_labelled": int(cohort.slides["label"].notna().sum()),
        "mil_version": mil.__version__,
    }
    with replacing(out) as tmp:
        ts = None if multi else thresholds  # multi-class: the argmax, no threshold
        pred = score_cohort(models, ts, cohort.slides, files, tmp / "tiles", tiles, progress, dev, n_classes=run.n_classes)
        doc = summarise_labelled(run, pred, n_boot, seed)
        config["empty_slides"] = empty = pred.loc[pred["n_tiles"] == 0, "slide_id"].tolist()
        if empty:
            warnings.warn(f"{len(empty)} slide(s) have no tile: {', '.join(empty[:10])}; their probabilities are left empty.", stacklevel=2)
        config["metrics"] = "metrics.json" if doc is not None else None
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        table = pred if cohort.slides["label"].notna().any() else pred.drop(columns=["label"])
        table.to_csv(tmp / "predictions.csv", index=False)
        if doc is not None and multi:
            (tmp / "metrics.json").write_text(json.dumps(doc, indent=2) + "\n")
            plot_multiclass(_long_multiclass(pred), doc, tmp, title=f"{run.path.name} · {cohort.source.name}")
        elif doc is not None:
            (tmp / "metrics.json").write_text(json.dumps(doc, indent=2) + "\n")
            scored = pred[pred["label"].notna() & (pred["n_tiles"] > 0)]
            title = f"{run.path.name} · {cohort.source.name}"
            plot_curves(scored["label"].astype(int), scored["probability"], tmp, title=title, auc=doc["auc"], n_boot=n_boot, seed=seed)
        if tiles == "none":
            (tmp / "tiles").rmdir()
    return table, doc, out


@torch.inference_mode()
def score_cohort(
    models: dict[str, torch.nn.Module],
    thresholds: dict[str, float] | None,
    slides: pd.DataFrame,
    files: dict[str, Path],
    tile_dir: Path,
    tiles: str,
    progress: bool,
    device: torch.device,
    n_classes: int = 2,
) -> pd.DataFrame:
    """predictions.csv's table; each bag is read once and scored by every fold, its tile scores written to `tile_dir`.

    Binary (`thresholds` from the checkpoints): sigmoid per fold, the ensemble the mean probability, predictions
    at the thresholds. ``n_classes`` C > 2 (`thresholds` None): softmax per fold, the ensemble the mean of those
    vectors, predictions the argmax.
    """
    tile_dir.mkdir()
    folds = list(models)
    rows = []
    with _progress_bar(progress) as bar:
        task = bar.add_task("scoring slides", total=len(slides))
        for sid, label in zip(slides["slide_id"], slides["label"]):
            bag = read_bag(files[sid], dtype=np.float32)
            check_finite(bag)
            probs, inst, att = _fold_scores(models, bag, device, n_classes)  # (F, C'), (F, N[, C]), (F, N) | None
            row, p = (_binary_row if n_classes == 2 else _multiclass_row)(folds, probs, thresholds)
            rows.append({"slide_id": sid, "label": label, "n_tiles": bag.n_instances, **row})
            if tiles != "none":
                write_tiles(tile_dir, sid, bag.coords, bag.attrs, folds, inst, att, p, tiles)
            bar.advance(task)
    pred = pd.DataFrame(rows)
    pred["label"] = pred["label"].astype("Int64")
    for c in ["predicted", *(f"predicted_{f}" for f in folds)]:
        pred[c] = pred[c].astype("Int64")
    return pred


def _fold_scores(models: dict[str, torch.nn.Module], bag, device: torch.device, n_classes: int):
    """Each fold's class probabilities ``(F, 1)`` (binary: P(positive)) or ``(F, C)``, tile scores ``(F, N)`` or
    ``(F, N, C)`` and attention ``(F, N)`` (None for heads without it); NaN probabilities for a bag without tiles."""
    n, F = bag.n_instances, len(models)
    width = 1 if n_classes == 2 else n_classes
    probs = np.full((F, width), np.nan)  # (F, C')
    inst = np.zeros((F, n) if n_classes == 2 else (F, n, n_classes), np.float32)
    att = np.zeros((F, n), np.float32) if n > 0 else None
    if n == 0:
        return probs, inst, None
    X = torch.from_numpy(np.ascontiguousarray(bag.features))[None].to(device)  # (1, N, D)
    for i, model in enumerate(models.values()):
        o = model(X)  # logits (1,) or (1, C), instance_scores (1, N) or (1, N, C), attention (1, N) | None
        if n_classes == 2:
            probs[i, 0] = torch.sigmoid(o.logits.float())[0].item()
        else:
            probs[i] = torch.softmax(o.logits.double(), dim=1)[0].cpu().numpy()  # (C,), as `mil.predict.predict`
        inst[i] = o.instance_scores[0].float().cpu().numpy()  # (N,) or (N, C)
        if o.attention is None:
            att = None
        elif att is not None:
            att[i] = o.attention[0].float().cpu().numpy()  # (N,)
    return probs, inst, att


def _binary_row(folds: list[str], probs: np.ndarray, thresholds: dict[str, float]) -> tuple[dict, float]:
    """predictions.csv's columns of one slide, binary: the mean probability at the mean threshold, and each fold's."""
    t_ens = float(np.mean([thresholds[f] for f in folds]))
    p = float(probs[:, 0].mean())  # NaN without tiles
    row = {"probability": p, "threshold": t_ens, "predicted": _hard(p, t_ens)}
    for i, f in enumerate(folds):
        row |= {f"probability_{f}": probs[i, 0], f"threshold_{f}": thresholds[f], f"predicted_{f}": _hard(probs[i, 0], thresholds[f])}
    return row, p


def _multiclass_row(folds: list[str], probs: np.ndarray, thresholds=None) -> tuple[dict, np.ndarray]:
    """predictions.csv's columns of one slide, C classes: the mean probability vector and its argmax, and each fold's."""
    C = probs.shape[1]
    p = probs.mean(axis=0)  # (C,) NaN without tiles
    row = {**{f"prob_{k}": p[k] for k in range(C)}, "predicted": _argmax(p)}
    for i, f in enumerate(folds):
        row |= {f"prob_{k}_{f}": probs[i, k] for k in range(C)} | {f"predicted_{f}": _argmax(probs[i])}
    return row, p


def _argmax(p: np.ndarray):
    return None if np.isnan(p).any() else int(np.argmax(p))


def _hard(p: float, t: float):
    return None if np.isnan(p) else int(p >= t)


def write_tiles(
    folder: Path, sid: str, coords: np.ndarray, attrs: dict, folds: list[str], inst: np.ndarray, att: np.ndarray | None, p: float, fmt: str
) -> None:
    """``<sid>.h5`` and/or ``<sid>.csv`` of one slide: coords (N, 2), fold-mean and per-fold ``(F, N)`` tile scores
    (multi-class instance scores: ``(N, C)`` and ``(F, N, C)``; `p` the ensemble's class probabilities ``(C,)``)."""
    scores = {"instance_score": inst} | ({"attention": att} if att is not None else {})
    if fmt in ("h5", "both"):
        import h5py

        with h5py.File(folder / f"{sid}.h5", "w") as f:
            c = f.create_dataset("coords", data=np.asarray(coords, np.int64))  # (N, 2)
            c.attrs.update({k: attrs[k] for k in COORD_ATTRS if isinstance(attrs.get(k), (int, float, str))})
            for name, per_fold in scores.items():
                f.create_dataset(name, data=per_fold.mean(0))  # (N,) or (N, C)
                f.create_dataset(f"{name}_folds", data=per_fold)  # (F, N) or (F, N, C)
            f.attrs.update(slide_id=sid, folds=json.dumps(folds), probability=p, mil_version=mil.__version__)
    if fmt in ("csv", "both"):
        table = {"x": coords[:, 0], "y": coords[:, 1]}
        for name, per_fold in scores.items():
            if per_fold.ndim == 3:  # (F, N, C): one column per class, then per class and fold
                mean = per_fold.mean(0)
                table |= {f"{name}_{k}": mean[:, k] for k in range(mean.shape[1])}
                table |= {f"{name}_{k}_{f}": per_fold[i, :, k] for k in range(mean.shape[1]) for i, f in enumerate(folds)}
                continue
            table[name] = per_fold.mean(0)
            table |= {f"{name}_{f}": per_fold[i] for i, f in enumerate(folds)}
        pd.DataFrame(table).to_csv(folder / f"{sid}.csv", index=False)


def summarise_labelled(run: Run, pred: pd.DataFrame, n_boot: int, seed: int) -> dict | None:
    """metrics.json: `summarise` on the labelled slides (every fold scores each), plus the ensemble's metrics.

    None (with a warning) when no labelled slide, or only one class among them: there is no AUC to give.
    """
    if run.n_classes > 2:
        return summarise_labelled_multiclass(run, pred, n_boot, seed)
    scored = pred[pred["label"].notna() & (pred["n_tiles"] > 0)]
    if scored.empty:
        return None
    labels = scored["label"].astype(int)
    if labels.nunique() < 2:
        warnings.warn(
            f"all {len(scored)} labelled slides have label {labels.iloc[0]}: no AUC, so no metrics.json; predictions are written.",
            stacklevel=2,
        )
        return None
    folds = list(dict.fromkeys(c[len("threshold_") :] for c in pred.columns if c.startswith("threshold_")))
    long = pd.concat(
        [
            pd.DataFrame(
                {
                    "fold": f,
                    "slide_id": scored["slide_id"],
                    "label": labels,
                    "probability": scored[f"probability_{f}"],
                    "threshold": scored[f"threshold_{f}"],
                    "predicted": scored[f"predicted_{f}"].astype(int),
                }
            )
            for f in folds
        ],
        ignore_index=True,
    )
    doc = {
        "run": str(run.path.resolve()),
        "n_labelled": len(scored),
        "n_unlabelled": int(len(pred) - len(scored)),
        "mil_version": mil.__version__,
        **summarise(long, n_boot, seed),
    }
    doc["ensemble"] = {"threshold": float(scored["threshold"].iloc[0]), **threshold_metrics(labels, scored["predicted"].astype(int))}
    return doc


def _long_multiclass(pred: pd.DataFrame) -> pd.DataFrame:
    """`score_split`'s multi-class table (``fold, slide_id, label, prob_0 … prob_<C-1>, predicted``) of the labelled, scored slides."""
    scored = pred[pred["label"].notna() & (pred["n_tiles"] > 0)]
    folds = [c[len("predicted_") :] for c in pred.columns if c.startswith("predicted_")]
    C = sum(1 for c in pred.columns if c.startswith("prob_") and c[len("prob_") :].isdigit())
    parts = []
    for f in folds:
        part = pd.DataFrame({"fold": f, "slide_id": scored["slide_id"], "label": scored["label"].astype(int)})
        part = part.assign(**{f"prob_{k}": scored[f"prob_{k}_{f}"].astype(float) for k in range(C)})
        parts.append(part.assign(predicted=scored[f"predicted_{f}"].astype(int)))
    return pd.concat(parts, ignore_index=True)


def summarise_labelled_multiclass(run: Run, pred: pd.DataFrame, n_boot: int, seed: int) -> dict | None:
    """metrics.json of a multi-class run: `summarise_multiclass` on the labelled slides (every fold scores each, so the
    per-slide mean probabilities are the ensemble's), plus the ensemble argmax's ``multiclass_metrics``.

    None (with a warning) when no labelled slide, or not every class among them: there is no macro one-vs-rest AUC to give.
    """
    scored = pred[pred["label"].notna() & (pred["n_tiles"] > 0)]
    if scored.empty:
        return None
    labels = scored["label"].astype(int)
    missing = [run.classes[k] for k in range(run.n_classes) if not (labels == k).any()]
    if missing:
        warnings.warn(
            f"the {len(scored)} labelled slides hold no slide of class {', '.join(map(repr, missing))}: no one-vs-rest AUC, so no "
            "metrics.json; predictions are written.",
            stacklevel=3,
        )
        return None
    doc = {
        "run": str(run.path.resolve()),
        "n_labelled": len(scored),
        "n_unlabelled": int(len(pred) - len(scored)),
        "mil_version": mil.__version__,
        **summarise_multiclass(_long_multiclass(pred), run.classes, n_boot, seed),
    }
    doc["ensemble"] = {"rule": "argmax", **multiclass_metrics(labels, scored["predicted"].astype(int), run.n_classes)}
    return doc


def _progress_bar(enabled: bool):
    """A rich progress bar on stderr (slides done / total, elapsed, remaining); silent when disabled."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    return Progress(*columns, console=Console(stderr=True), disable=not enabled, transient=True)
