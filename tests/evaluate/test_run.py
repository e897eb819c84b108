"""`mil evaluate run` and `compare` on small trained runs: outputs, thresholds from validation only, refusals."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from mil.checkpoint import load_head
from mil.manifest import read_manifest
from mil.train.loop import TrainConfig
from mil.train.run import run_train
from tests.conftest import invoke_mil
from tests.train.test_run import needle_cohort


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Features of an 80-bag needle cohort, a split run, a second split run (other seed) and a 3-fold CV run."""
    root = tmp_path_factory.mktemp("eval")
    feats = root / "features"
    feats.mkdir()
    m = needle_cohort(feats)
    slides = read_manifest(m)
    run_train(feats, slides, root / "a", TrainConfig(epochs=6, lr=1e-3, seed=0))
    run_train(feats, slides, root / "b", TrainConfig(epochs=1, lr=1e-4, seed=1))
    run_train(feats, slides.assign(split=""), root / "cv", TrainConfig(epochs=3, lr=1e-3, seed=0), folds=3)
    return root


def copy_run(runs, name, tmp_path):
    shutil.copytree(runs / name, tmp_path / name)
    return tmp_path / name


def test_evaluate_writes_metrics_predictions_and_plots(runs, tmp_path):
    run = copy_run(runs, "a", tmp_path)
    r = invoke_mil("evaluate", "run", run, "--n-boot", "200")
    assert r.returncode == 0, r.stderr
    assert "AUC" in r.stdout and "95% CI" in r.stdout
    out = run / "eval" / "test"
    doc = json.loads((out / "metrics.json").read_text())
    pred = pd.read_csv(out / "predictions.csv")
    splits = pd.read_csv(run / "splits.csv")
    assert sorted(pred["slide_id"]) == sorted(splits.loc[splits["set"] == "test", "slide_id"])
    assert doc["auc"]["auc"] == pytest.approx(roc_auc_score(pred["label"], pred["probability"]))
    assert doc["auc"]["ci_low"] <= doc["auc"]["auc"] <= doc["auc"]["ci_high"] and doc["auc"]["n_boot"] == 200
    assert doc["auc"]["auc"] > 0.9  # the needle cohort is easy
    for name in ("roc.png", "pr.png"):
        assert (out / name).stat().st_size > 5000
    assert not [p for p in (run / "eval").iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_threshold_comes_from_the_checkpoint_not_the_evaluated_labels(runs, tmp_path):
    from mil.evaluate.run import evaluate_run

    run = copy_run(runs, "a", tmp_path)
    _, ckpt = load_head(run / "checkpoints" / "split.pt")
    doc, out = evaluate_run(run, n_boot=50)
    pred = pd.read_csv(out / "predictions.csv")
    assert (pred["threshold"] == ckpt["threshold"]).all()
    assert (pred["predicted"] == (pred["probability"] >= ckpt["threshold"])).all()
    flipped = pd.read_csv(run / "slides.csv").assign(label=lambda d: 1 - d["label"])  # evaluated labels changed
    doc2, out2 = evaluate_run(run, labels=flipped, n_boot=50)
    pred2 = pd.read_csv(out2 / "predictions.csv")
    assert (pred2["threshold"] == ckpt["threshold"]).all()
    np.testing.assert_allclose(pred2["probability"], pred["probability"])
    assert doc2["auc"]["auc"] == pytest.approx(1 - doc["auc"]["auc"])


def test_the_auc_bootstrap_is_drawn_once(runs, tmp_path, monkeypatch):
    import mil.evaluate.metrics as metrics
    from mil.evaluate.run import evaluate_run

    drawn = []
    real = metrics.bootstrap_indices
    monkeypatch.setattr(metrics, "bootstrap_indices", lambda y, n, seed: drawn.append(n) or real(y, n, seed))
    evaluate_run(copy_run(runs, "a", tmp_path), n_boot=50)
    assert sorted(drawn) == [1, 50, 50]  # the per-fold AUC (1 resample), the CI, the curve bands; not the CI twice


def test_cross_validated_run_scores_every_held_out_slide_once(runs, tmp_path):
    from mil.evaluate.run import evaluate_run

    run = copy_run(runs, "cv", tmp_path)
    doc, out = evaluate_run(run, n_boot=50)
    pred = pd.read_csv(out / "predictions.csv")
    assert len(pred) == 80 and pred["slide_id"].is_unique and set(pred["fold"]) == {"r0f0", "r0f1", "r0f2"}
    assert len(doc["per_fold"]) == 3 and len(doc["fold_mean_sd"]["auc"]) == 2
    for f in doc["per_fold"]:  # each fold with its own checkpoint threshold
        _, ckpt = load_head(run / "checkpoints" / f"{f['fold']}.pt")
        assert f["threshold"] == ckpt["threshold"]


def _slide_auc(run, split="test") -> tuple[float, pd.Series]:
    """AUC of a run's eval/<split>/predictions.csv computed here with scikit-learn (one probability per slide)."""
    pred = pd.read_csv(run / "eval" / split / "predictions.csv", dtype={"slide_id": str})
    per_slide = pred.groupby("slide_id").agg(label=("label", "first"), probability=("probability", "mean"))
    return roc_auc_score(per_slide["label"], per_slide["probability"]), per_slide["label"]


def _compare_lines(stdout: str) -> dict[str, str]:
    """`evaluate compare` output: {run path: its line}."""
    return {line.split(": AUC ")[0]: line for line in stdout.splitlines() if ": AUC " in line}


NUM = r"([+-]?\d\.\d{3})"


def test_compare_gives_a_paired_test(runs, tmp_path):
    """The printed AUCs and ΔAUC = AUC(run) − AUC(first run) agree with scikit-learn on the two predictions.csv files;
    the first run is the reference (no ΔAUC on its line), and swapping the order flips the sign."""
    import re

    a, b = copy_run(runs, "a", tmp_path), copy_run(runs, "b", tmp_path)
    r = invoke_mil("evaluate", "compare", a, b)
    assert r.returncode == 2 and "evaluate run" in r.stderr  # not evaluated yet
    for run in (a, b):
        assert invoke_mil("evaluate", "run", run, "--n-boot", "50").returncode == 0
    (auc_a, labels), (auc_b, _) = _slide_auc(a), _slide_auc(b)
    assert abs(auc_a - auc_b) > 0.01, (auc_a, auc_b)  # the runs differ, so the sign of ΔAUC is visible at 3 decimals
    for ref, other, auc_ref, auc_other in ((a, b, auc_a, auc_b), (b, a, auc_b, auc_a)):
        r = invoke_mil("evaluate", "compare", ref, other, "--n-boot", "300")
        assert r.returncode == 0, r.stderr
        lines = _compare_lines(r.stdout)
        assert list(lines) == [str(ref), str(other)], r.stdout  # the reference first
        assert "ΔAUC" not in lines[str(ref)]
        m = re.fullmatch(rf".*: AUC {NUM} \[{NUM}, {NUM}\]", lines[str(ref)])
        assert m and float(m[1]) == pytest.approx(auc_ref, abs=5e-4) and float(m[2]) <= float(m[1]) <= float(m[3]), lines[str(ref)]
        m = re.fullmatch(rf".*: AUC {NUM} \[{NUM}, {NUM}\]   vs first: ΔAUC {NUM} \[{NUM}, {NUM}\]  p = (\S+)", lines[str(other)])
        assert m, lines[str(other)]
        assert float(m[1]) == pytest.approx(auc_other, abs=5e-4)
        diff = float(m[4])
        assert diff == pytest.approx(auc_other - auc_ref, abs=5e-4) and np.sign(diff) == np.sign(auc_other - auc_ref)
        assert float(m[5]) <= diff <= float(m[6])  # the paired interval holds the point estimate
        assert 0.00333 <= float(m[7]) <= 1.0  # at least 1 / n_boot, printed to 3 significant digits
        assert f"{len(labels)} slides, paired stratified bootstrap, 300 resamples" in r.stdout
    cv = copy_run(runs, "cv", tmp_path)
    assert invoke_mil("evaluate", "run", cv, "--n-boot", "50").returncode == 0
    r = invoke_mil("evaluate", "compare", a, cv)
    assert r.returncode == 2 and "same slides" in r.stderr


def test_refusals_are_one_line(runs, tmp_path):
    def refused(*args, match):
        r = invoke_mil("evaluate", "run", *args)
        assert r.returncode == 2 and match in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr

    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", match="no config.json")
    run = copy_run(runs, "a", tmp_path)
    (run / "checkpoints" / "split.pt").write_bytes(b"not a checkpoint")
    refused(run, match="split.pt: expected a checkpoint written by `mil train features`")
    run = copy_run(runs, "b", tmp_path)
    refused(run, "--split", "holdout", match="expected --split to be one of")

    other = tmp_path / "other"  # features of another encoder
    shutil.copytree(runs / "features", other)
    for p in other.glob("*.h5"):
        with h5py.File(p, "a") as f:
            f.attrs["encoder"] = "resnet18"
    refused(run, "--features", other, match="expected features with encoder='toy' as the run was trained on, got encoder='resnet18'")
    for p in list(other.glob("b1*.h5")):
        p.unlink()
    refused(run, "--features", other, match="have no feature file")
