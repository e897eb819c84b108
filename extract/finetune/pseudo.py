"""Pseudo-labels for the encoder fine-tuning, from a `mil train features` run's training slides only.

The seeds (ItS2CLR, HNM-WSI; methods.md §1.1–§1.3) take each tile's pseudo score from the MIL
model's instance classifier, ``p = sigmoid(instance logit)``, and binarise it as
``y = 1 if (slide label 1 and p > 0.3) else 0``. Here the instance logits are the run's selected
head's ``instance_scores`` (its checkpoint of the fold), on the run's own feature files.

**Only the training slides of the fold are opened**: the run's ``splits.csv`` names them; the
validation and test slides' feature files and pixels are never read, so the encoder never sees
a label it will be judged on. The run must have one fold (trained on the manifest's ``split``
column): with K-fold cross-validation every slide is some fold's validation slide, and an encoder
fine-tuned on one fold's training labels would leak them into the others.

Of several runs (the rounds so far), pseudo-labels come from the latest one whose validation AUC
is at least every earlier one's: the seed replaces its pseudo-labels only when a MIL round's
validation score is ≥ the best so far (``update_signal`` in ``trainer.py``; it uses F1, we the
run's selection metric, validation AUC).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mil.checkpoint import load_head
from mil.data import resolve_feature_files
from mil.errors import OptionError
from mil.features import read_bag, read_bag_attrs
from mil.selection import PSEUDO_LABEL_THRESHOLD, confident_positives, random_fraction, top_fraction

COLUMNS = ("slide_id", "tile_index", "x", "y", "bag_label", "prob")


@dataclass(frozen=True)
class RunInfo:
    """What the fine-tuning needs of a run: its fold, training slides, labels and feature files."""

    path: Path
    fold: str
    train_ids: tuple[str, ...]
    labels: dict[str, int]
    feature_dir: Path
    val_auc: float
    files: dict[str, Path] = field(default_factory=dict)  # the training slides' feature files


def read_run(run_dir: str | Path) -> RunInfo:
    """Check `run_dir` is a finished, binary, one-fold run; `OptionError` (one line) otherwise."""
    run = Path(run_dir)
    for name in ("config.json", "splits.csv", "slides.csv", "summary.csv"):
        if not (run / name).is_file():
            raise OptionError(f"expected --run to be a finished `mil train features` run, got {run} without {name}.")
    config = json.loads((run / "config.json").read_text())
    if config.get("n_classes", 2) > 2:
        raise OptionError(f"expected --run to be a binary run, got {run} with {config['n_classes']} classes; pseudo-labels are binary.")
    splits = pd.read_csv(run / "splits.csv", dtype={"fold": str, "slide_id": str})
    folds = list(dict.fromkeys(splits["fold"]))
    if len(folds) != 1:
        raise OptionError(
            f"expected --run trained on the manifest's split column (one fold), got {run} with {len(folds)} folds; "
            "an encoder fine-tuned on one fold's training labels would have seen other folds' validation slides. "
            "Train the run with a train/val/test split column and no --folds."
        )
    summary = pd.read_csv(run / "summary.csv", dtype={"fold": str})
    slides = pd.read_csv(run / "slides.csv", dtype={"slide_id": str})
    train = splits[(splits["fold"] == folds[0]) & (splits["set"] == "train")]["slide_id"].tolist()
    files, _ = resolve_feature_files(pd.DataFrame({"slide_id": train}), config["feature_dir"])  # metadata only
    return RunInfo(
        run,
        folds[0],
        tuple(train),
        dict(zip(slides["slide_id"], slides["label"].astype(int))),
        Path(config["feature_dir"]),
        float(summary["val_auc"].iloc[0]),
        files,
    )


def read_encoder_config(run: RunInfo) -> dict:
    """The encoder settings (name, input_size, mean, std, precision, seed …) stored in the run's feature files."""
    path = run.files[run.train_ids[0]]
    text = read_bag_attrs(path).get("encoder_config")
    if not text:
        raise OptionError(
            f"{path}: expected a feature file of `mil extract features` (attr encoder_config), got none; fine-tuning re-reads its tiles."
        )
    return json.loads(text)


def pick_source(runs: list[RunInfo]) -> RunInfo:
    """The latest run whose validation AUC is at least every earlier run's (the seed's update rule)."""
    best = runs[0]
    for r in runs[1:]:
        if r.val_auc >= best.val_auc:
            best = r
    return best


@torch.inference_mode()
def score_training_tiles(run: RunInfo) -> pd.DataFrame:
    """Pseudo scores of every tile of the run's training slides: one row per tile, `COLUMNS`.

    Opens the fold's checkpoint and the training slides' feature files, nothing else.
    """
    model, _ = load_head(run.path / "checkpoints" / f"{run.fold}.pt")
    parts = []
    for sid in run.train_ids:
        bag = read_bag(run.files[sid], dtype=np.float32)
        X = torch.from_numpy(np.asarray(bag.features))  # (N, D)
        s = model(X[None]).instance_scores[0].float() if len(X) else torch.zeros(0)  # (N,) logits
        xy = np.asarray(bag.coords).reshape(-1, 2)  # (N, 2) level-0 px
        parts.append(
            pd.DataFrame(
                {
                    "slide_id": sid,
                    "tile_index": np.arange(len(X)),
                    "x": xy[:, 0],
                    "y": xy[:, 1],
                    "bag_label": run.labels[sid],
                    "prob": torch.sigmoid(s).numpy(),
                }
            )
        )
    return pd.concat(parts, ignore_index=True)[list(COLUMNS)]


@dataclass(frozen=True)
class Pools:
    """Row positions (into the score table) of the tiles each step of the fine-tuning draws from.

    Attributes:
        negatives: the mined negatives of negative slides (``hard``: top ``neg_ratio`` by score;
            ``random``: as many drawn uniformly, the seed's ablation).
        tumour: tiles of positive slides with p > θ (pseudo-label 1; the denominators of the
            negative step).
        threshold: the hard negatives' score threshold (NaN for random negatives).
    """

    negatives: np.ndarray
    tumour: np.ndarray
    threshold: float


def _by_slide(table: pd.DataFrame, rows: np.ndarray) -> dict[str, np.ndarray]:
    groups = table.iloc[rows].groupby("slide_id", sort=False).indices
    return {sid: rows[idx] for sid, idx in groups.items()}


def _gather(picked: dict[str, np.ndarray], rows: dict[str, np.ndarray]) -> np.ndarray:
    return np.sort(np.concatenate([rows[sid][i] for sid, i in picked.items()])) if picked else np.zeros(0, np.int64)


def make_pools(table: pd.DataFrame, neg_ratio: float, negatives: str, seed: int) -> Pools:
    """The negative and tumour pools of a score table (`score_training_tiles`)."""
    prob, bag = table["prob"].to_numpy(), table["bag_label"].to_numpy()
    neg_rows = _by_slide(table, np.flatnonzero(bag == 0))  # {slide: rows}
    scores = {sid: prob[r] for sid, r in neg_rows.items()}
    if negatives == "hard":
        picked, t = top_fraction(scores, neg_ratio)
    elif negatives == "random":
        picked, t = random_fraction(scores, neg_ratio, np.random.default_rng([seed, 7])), float("nan")
    else:
        raise OptionError(f"expected --negatives hard or random, got {negatives!r} instead.")
    tumour = np.flatnonzero((bag == 1) & (prob > PSEUDO_LABEL_THRESHOLD))
    return Pools(_gather(picked, neg_rows), tumour, t)


def self_paced_positives(table: pd.DataFrame, ratio: float) -> np.ndarray:
    """Rows of the top `ratio` of the confident (p > θ) positive-slide tiles (ItS2CLR's self-paced positives)."""
    prob, bag = table["prob"].to_numpy(), table["bag_label"].to_numpy()
    rows = _by_slide(table, np.flatnonzero(bag == 1))
    return _gather(confident_positives({sid: prob[r] for sid, r in rows.items()}, ratio), rows)


def uncertain_negatives(table: pd.DataFrame, ratio: float) -> np.ndarray:
    """Rows of the lowest-scoring `ratio` of the positive slides' tiles with p ≤ θ (pseudo-label 0).

    The seed adds them to its negatives after the first pseudo-label update (``ro_neg`` schedule).
    """
    prob, bag = table["prob"].to_numpy(), table["bag_label"].to_numpy()
    rows = np.flatnonzero((bag == 1) & (prob <= PSEUDO_LABEL_THRESHOLD))
    if rows.size == 0:
        return rows
    return rows[prob[rows] <= np.quantile(prob[rows], ratio)]


def self_paced_ratio(t: int, total: int, warmup: int, start: float, end: float) -> float:
    """ItS2CLR's linear schedule: ``start`` until ``warmup``, then linearly to ``end`` at epoch ``total``."""
    if t < warmup or total <= warmup:
        return start
    return start + (end - start) * (t - warmup) / (total - warmup)
