"""`mil evaluate run` on a multi-class run: per-class and macro one-vs-rest AUC with CIs, confusion matrix, plots."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, roc_auc_score

from mil.errors import OptionError
from mil.evaluate.metrics import multiclass_auc_ci, multiclass_metrics
from tests.conftest import invoke_mil
from tests.train.test_multiclass import NAMES, class_cohort


def test_multiclass_auc_ci_and_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], [10, 14, 6])
    P = rng.dirichlet(np.ones(3), size=len(y)) + 0.4 * np.eye(3)[y] * rng.random((len(y), 1))
    P /= P.sum(axis=1, keepdims=True)
    doc = multiclass_auc_ci(y, P, n_boot=200, seed=0, classes=["a", "b", "c"])
    want = roc_auc_score(y, P, multi_class="ovr", average=None)
    assert [c["auc"] for c in doc["per_class"]] == pytest.approx(want)
    assert doc["macro"]["auc"] == pytest.approx(roc_auc_score(y, P, multi_class="ovr", average="macro"))
    assert [c["class"] for c in doc["per_class"]] == ["a", "b", "c"]
    for c in [*doc["per_class"], doc["macro"]]:
        assert 0 <= c["ci_low"] <= c["auc"] <= c["ci_high"] <= 1
    yhat = P.argmax(axis=1)
    m = multiclass_metrics(y, yhat, 3)
    assert m["confusion_matrix"] == confusion_matrix(y, yhat, labels=[0, 1, 2]).tolist()
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, yhat))
    assert m["accuracy"] == pytest.approx(np.mean(y == yhat))
    with pytest.raises(OptionError, match="no slide of class 2"):
        multiclass_auc_ci(y[y < 2], P[y < 2])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-class run (string classes, 2-fold CV) of meanpool heads, 2 epochs."""
    folder = tmp_path_factory.mktemp("mc")
    m = class_cohort(folder, n=60, names=NAMES)
    r = invoke_mil(
        "train",
        "features",
        folder,
        "--manifest",
        m,
        "--out",
        folder / "run",
        "--n-classes",
        "3",
        "--head",
        "meanpool",
        "--folds",
        "2",
        "--epochs",
        "2",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    return folder, m


def test_evaluate_run_reports_per_class_and_macro_auc_and_the_confusion_matrix(trained):
    folder, m = trained
    r = invoke_mil("evaluate", "run", folder / "run", "--n-boot", "200", "--manifest", m)
    assert r.returncode == 0, r.stderr
    assert "macro one-vs-rest AUC" in r.stdout and "squamous: AUC" in r.stdout
    out = folder / "run" / "eval" / "test"
    doc = json.loads((out / "metrics.json").read_text())
    pred = pd.read_csv(out / "predictions.csv")
    assert list(pred.columns) == ["fold", "slide_id", "label", "prob_0", "prob_1", "prob_2", "predicted"]
    assert len(pred) == 60 and doc["n_slides"] == 60 and doc["classes"] == list(NAMES)  # 2-fold CV: every slide once
    y, P = pred["label"].to_numpy(), pred[["prob_0", "prob_1", "prob_2"]].to_numpy()
    assert [c["auc"] for c in doc["auc_per_class"]] == pytest.approx(roc_auc_score(y, P, multi_class="ovr", average=None))
    assert doc["auc_macro"]["auc"] == pytest.approx(roc_auc_score(y, P, multi_class="ovr", average="macro"))
    assert doc["auc_macro"]["ci_low"] <= doc["auc_macro"]["auc"] <= doc["auc_macro"]["ci_high"]
    assert doc["confusion_matrix"] == confusion_matrix(y, pred["predicted"], labels=[0, 1, 2]).tolist()
    assert (pred["predicted"] == P.argmax(axis=1)).all()
    assert doc["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred["predicted"]))
    assert [f["fold"] for f in doc["per_fold"]] == ["r0f0", "r0f1"] and "fold_mean_sd" in doc
    assert (out / "roc.png").stat().st_size > 0 and (out / "confusion.png").stat().st_size > 0


def test_mil_evaluate_predict_on_a_multiclass_run_prints_the_argmax_summary(trained):
    """The CLI's summary of `evaluate predict` for a C-class run (the scoring itself: test_predict_multiclass.py)."""
    from tests.conftest import invoke_mil

    folder, m = trained
    r = invoke_mil(
        "evaluate", "predict", folder / "run", m, "--features", folder, "--out", folder / "pred", "--n-boot", "20", "--no-progress"
    )
    assert r.returncode == 0, r.stderr
    assert "ensemble argmax" in r.stdout and "macro one-vs-rest AUC" in r.stdout
    assert (folder / "pred" / "predictions.csv").is_file()
