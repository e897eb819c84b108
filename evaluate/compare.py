"""`mil evaluate compare`: runs scored on the same slides, with a paired test of their AUC difference.

Each run's ``eval/<split>/predictions.csv`` (from `mil evaluate run`) is read; runs must hold the
same slides with the same labels. Each slide's probability is its mean over the run's folds (one
point per slide, as for the AUC of `mil evaluate run`). Every run is compared with the first by a
paired stratified bootstrap (`mil.evaluate.metrics.paired_auc_test`).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mil.errors import OptionError
from mil.evaluate.metrics import auc_ci, paired_auc_test
from mil.evaluate.run import RunError


def slide_probabilities(run_dir: str | Path, split: str = "test") -> pd.DataFrame:
    """``slide_id``-indexed ``label, probability`` (mean over folds) of an evaluated run."""
    path = Path(run_dir) / "eval" / split / "predictions.csv"
    if not path.is_file():
        raise RunError(f"{path}: expected the predictions of `mil evaluate run {run_dir} --split {split}`, got no such file; run it first.")
    pred = pd.read_csv(path, dtype={"slide_id": str})
    return pred.groupby("slide_id").agg(label=("label", "first"), probability=("probability", "mean"))


def compare_runs(run_dirs: list[str | Path], split: str = "test", n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per run: AUC with its CI, and ΔAUC vs the first run with a paired-bootstrap CI and p-value."""
    if len(run_dirs) < 2:
        raise OptionError(f"expected at least two run directories to compare, got {len(run_dirs)} instead.")
    tables = [slide_probabilities(r, split) for r in run_dirs]
    ref = tables[0]
    for r, t in zip(run_dirs[1:], tables[1:]):
        if set(t.index) != set(ref.index):
            only = sorted(set(t.index) ^ set(ref.index))
            raise OptionError(
                f"expected {r} to be evaluated on the same slides as {run_dirs[0]}, got {len(only)} different: {', '.join(only[:10])}."
            )
        if not (t.loc[ref.index, "label"].to_numpy() == ref["label"].to_numpy()).all():
            raise OptionError(
                f"expected the same labels in {r} and {run_dirs[0]}, got different ones; were they trained on different manifests?"
            )
    rows = []
    for r, t in zip(run_dirs, tables):
        t = t.loc[ref.index]
        ci = auc_ci(t["label"], t["probability"], n_boot=n_boot, seed=seed)
        row = {"run": str(r), "n_slides": len(t), "auc": ci["auc"], "ci_low": ci["ci_low"], "ci_high": ci["ci_high"]}
        if r is not run_dirs[0]:
            test = paired_auc_test(ref["label"], ref["probability"], t["probability"], n_boot=n_boot, seed=seed)
            row.update(diff=test["diff"], diff_low=test["ci_low"], diff_high=test["ci_high"], p_value=test["p_value"])
        rows.append(row)
    return pd.DataFrame(rows)
