"""`mil evaluate predict` with a 3-class run: softmax per fold, the ensemble their mean, argmax predictions, tiles, metrics."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import confusion_matrix, roc_auc_score

from mil.checkpoint import load_head
from mil.evaluate.predict import predict_cohort
from mil.features import read_bag
from mil.labels import read_label_table
from mil.train.loop import TrainConfig
from mil.train.run import run_train
from tests.train.test_multiclass import NAMES, class_cohort

C = 3
FOLDS = ("r0f0", "r0f1")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 2-fold 3-class ABMIL run (string classes) on 45 bags, and a new labelled 15-bag cohort (other seed)."""
    root = tmp_path_factory.mktemp("predict_mc")
    train, new = root / "train", root / "new"
    train.mkdir()
    new.mkdir()
    table = read_label_table(class_cohort(train, n=45, names=NAMES), n_classes=C)
    cfg = TrainConfig(head="abmil", head_kwargs={"n_classes": C}, epochs=2, seed=0)
    run_train(train, table.slides.assign(split=""), root / "run", cfg, folds=2, device="cpu", labels=table.describe())
    class_cohort(new, n=15, seed=5, names=NAMES)
    return root


@pytest.fixture(scope="module")
def predicted(setup):
    out = setup / "pred"
    pred, doc, _ = predict_cohort(setup / "run", setup / "new" / "manifest.csv", out, features=setup / "new", device="cpu", n_boot=100)
    return pred, doc, out


def independent_probs(run, folder, ids):
    """{fold: (n, C) softmax probabilities} from load_head, outside the command."""
    out = {}
    for fold in FOLDS:
        model, ckpt = load_head(run / "checkpoints" / f"{fold}.pt")
        assert ckpt["n_classes"] == C
        with torch.inference_mode():
            rows = [
                torch.softmax(model(torch.from_numpy(read_bag(folder / f"{s}.h5").features).float()[None]).logits.double(), 1)[0]
                for s in ids
            ]
        out[fold] = torch.stack(rows).numpy()
    return out


def test_ensemble_is_the_mean_of_the_folds_softmax_and_predicted_its_argmax(setup, predicted):
    pred, _, out = predicted
    probs = [f"prob_{k}" for k in range(C)]
    per_fold = [c for f in FOLDS for c in (*(f"prob_{k}_{f}" for k in range(C)), f"predicted_{f}")]
    assert list(pred.columns) == ["slide_id", "label", "n_tiles", *probs, "predicted", *per_fold]
    assert pd.read_csv(out / "predictions.csv").columns.tolist() == pred.columns.tolist()
    ref = independent_probs(setup / "run", setup / "new", pred["slide_id"].tolist())
    for f, P in ref.items():
        np.testing.assert_allclose(pred[[f"prob_{k}_{f}" for k in range(C)]], P, rtol=1e-5, atol=1e-7)
        assert (pred[f"predicted_{f}"] == P.argmax(axis=1)).all()
    mean = np.mean(list(ref.values()), axis=0)  # (n, C)
    assert np.abs(ref["r0f0"] - ref["r0f1"]).max() > 1e-4  # the folds disagree, so the mean is a real check
    np.testing.assert_allclose(pred[probs], mean, rtol=1e-5, atol=1e-7)
    assert (pred["predicted"] == mean.argmax(axis=1)).all()
    config = json.loads((out / "config.json").read_text())
    assert config["thresholds"] == "argmax" and config["n_classes"] == C and config["classes"] == list(NAMES)


def test_tile_files_hold_per_class_instance_scores(setup, predicted):
    pred, _, out = predicted
    for sid, n in zip(pred["slide_id"], pred["n_tiles"]):
        with h5py.File(out / "tiles" / f"{sid}.h5") as f:
            assert f["coords"].shape == (n, 2)
            assert f["instance_score"].shape == (n, C) and f["instance_score_folds"].shape == (len(FOLDS), n, C)
            assert f["attention"].shape == (n,) and f["attention_folds"].shape == (len(FOLDS), n)
            np.testing.assert_allclose(f["instance_score"][:], f["instance_score_folds"][:].mean(0), rtol=1e-6)
            assert json.loads(f.attrs["folds"]) == list(FOLDS)


def test_labelled_cohort_gets_the_multiclass_metrics_of_evaluate_run(predicted):
    pred, doc, out = predicted
    y, P = pred["label"].to_numpy(int), pred[[f"prob_{k}" for k in range(C)]].to_numpy(float)
    assert doc == json.loads((out / "metrics.json").read_text())
    assert doc["n_labelled"] == 15 and doc["classes"] == list(NAMES)
    assert doc["auc_macro"]["auc"] == pytest.approx(roc_auc_score(y, P, multi_class="ovr", average="macro"))
    assert [c["auc"] for c in doc["auc_per_class"]] == pytest.approx(roc_auc_score(y, P, multi_class="ovr", average=None))
    assert doc["auc_macro"]["ci_low"] <= doc["auc_macro"]["auc"] <= doc["auc_macro"]["ci_high"]
    assert doc["ensemble"]["confusion_matrix"] == confusion_matrix(y, pred["predicted"].astype(int), labels=[0, 1, 2]).tolist()
    assert [f["fold"] for f in doc["per_fold"]] == list(FOLDS)
    assert (out / "roc.png").stat().st_size > 0 and (out / "confusion.png").stat().st_size > 0
