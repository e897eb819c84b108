"""`mil evaluate predict` on a small 3-fold run: a new cohort scored by the folds' ensemble, tile scores, metrics, refusals."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from mil.checkpoint import load_head
from mil.data import BagDataset
from mil.manifest import read_manifest
from mil.predict import predict
from mil.train.loop import TrainConfig
from mil.train.run import run_train
from tests.conftest import invoke_mil
from tests.train.test_run import D, needle_cohort, write_bag

FOLDS = ("r0f0", "r0f1", "r0f2")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 3-fold CV run on a 60-bag needle cohort, and a new 16-bag cohort (other seed) whose tiles have distinct coords."""
    root = tmp_path_factory.mktemp("predict")
    train = root / "train"
    train.mkdir()
    m = needle_cohort(train, n=60)
    run_train(train, read_manifest(m).assign(split=""), root / "run", TrainConfig(epochs=3, lr=1e-3, seed=0), folds=3, device="cpu")
    new = root / "new"
    new.mkdir()
    needle_cohort(new, n=16, seed=7)
    (new / "manifest.csv").unlink()  # a folder of feature files only
    rng = np.random.default_rng(0)
    for p in sorted(new.glob("*.h5")):
        with h5py.File(p, "a") as f:
            n = len(f["features"])
            attrs = dict(f["coords"].attrs)
            del f["coords"]
            c = f.create_dataset("coords", data=rng.permutation(n * 4)[:n, None].repeat(2, 1).astype(np.int64) * 448)
            c.attrs.update(attrs)
    return root


def predict_cli(*args):
    return invoke_mil("evaluate", "predict", *map(str, args), "--no-progress", "--device", "cpu", "--n-boot", "100")


def independent_scores(run, folder, ids):
    """{fold: (probabilities (n,), threshold)} from load_head + mil.predict.predict, outside the command."""
    out = {}
    for fold in FOLDS:
        model, ckpt = load_head(run / "checkpoints" / f"{fold}.pt")
        ds = BagDataset([folder / f"{s}.h5" for s in ids], [0] * len(ids), cache="stream", slide_ids=ids)
        out[fold] = predict(model, ds)["probability"].to_numpy(), ckpt["threshold"]
    return out


def test_unlabelled_folder_is_scored_by_the_mean_of_the_folds(setup, tmp_path):
    run, new, out = setup / "run", setup / "new", tmp_path / "pred"
    r = predict_cli(run, new, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "16 slides scored by 3 fold(s)" in r.stdout
    pred = pd.read_csv(out / "predictions.csv", dtype={"slide_id": str})
    ids = sorted(p.stem for p in new.glob("*.h5"))
    assert sorted(pred["slide_id"]) == ids and "label" not in pred.columns
    assert not (out / "metrics.json").exists()
    ref = independent_scores(run, new, pred["slide_id"].tolist())
    for fold, (probs, threshold) in ref.items():
        np.testing.assert_allclose(pred[f"probability_{fold}"], probs, rtol=1e-6)
        assert (pred[f"threshold_{fold}"] == threshold).all()  # each fold's validation threshold, from its checkpoint
        assert (pred[f"predicted_{fold}"] == (probs >= threshold)).all()
    mean = np.mean([p for p, _ in ref.values()], axis=0)
    assert np.ptp([p for p, _ in ref.values()], axis=0).max() > 1e-4  # the folds disagree, so the mean is a real check
    np.testing.assert_allclose(pred["probability"], mean, rtol=1e-6)
    t = np.mean([t for _, t in ref.values()])
    assert pred["threshold"].to_numpy() == pytest.approx(np.full(len(pred), t))
    assert (pred["predicted"] == (mean >= t)).all()
    config = json.loads((out / "config.json").read_text())
    assert config["folds"] == list(FOLDS) and config["input_kind"] == "folder" and "mil_version" in config
    assert config["thresholds"] == {f: ref[f][1] for f in FOLDS}

    sid = pred["slide_id"].iloc[3]
    with h5py.File(new / f"{sid}.h5") as f:
        X, coords = torch.from_numpy(f["features"][:])[None], f["coords"][:]
    with h5py.File(out / "tiles" / f"{sid}.h5") as f:
        assert json.loads(f.attrs["folds"]) == list(FOLDS)
        np.testing.assert_array_equal(f["coords"][:], coords)  # one row per tile, in the feature file's order
        assert f["coords"].attrs["patch_size_level0"] == 448
        inst, att = f["instance_score_folds"][:], f["attention_folds"][:]
        assert inst.shape == att.shape == (3, len(coords))
        np.testing.assert_allclose(f["instance_score"][:], inst.mean(0), rtol=1e-5)
        np.testing.assert_allclose(f["attention"][:], att.mean(0), rtol=1e-5)
    for i, fold in enumerate(FOLDS):
        o = load_head(run / "checkpoints" / f"{fold}.pt")[0](X)
        np.testing.assert_allclose(inst[i], o.instance_scores[0].detach().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(att[i], o.attention[0].detach().numpy(), rtol=1e-5, atol=1e-7)
    assert sorted(p.stem for p in (out / "tiles").iterdir()) == ids
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_manifest_with_some_labels_gives_metrics_on_the_labelled_slides(setup, tmp_path):
    run, new, out = setup / "run", setup / "new", tmp_path / "pred"
    ids = sorted(p.stem for p in new.glob("*.h5"))
    # needle_cohort: odd bags are positive; b0, b4, b8 mislabelled so that no AUC is 1; the last 4 unlabelled
    labels = {s: (int(s[1:]) + (int(s[1:]) % 4 == 0)) % 2 for s in ids[:12]}
    manifest = tmp_path / "cohort.csv"
    pd.DataFrame({"slide_id": ids, "label": [labels.get(s, "") for s in ids]}).to_csv(manifest, index=False)  # no path column
    r = predict_cli(run, manifest, "--features", new, "--out", out, "--tiles", "both")
    assert r.returncode == 0, r.stderr
    assert "12 labelled slides" in r.stdout and "AUC" in r.stdout
    pred = pd.read_csv(out / "predictions.csv", dtype={"slide_id": str})
    assert pred["label"].isna().sum() == 4
    doc = json.loads((out / "metrics.json").read_text())
    lab = pred.dropna(subset=["label"])
    assert doc["n_labelled"] == 12 and doc["n_unlabelled"] == 4 and doc["auc"]["n_boot"] == 100
    assert doc["auc"]["auc"] == pytest.approx(roc_auc_score(lab["label"], lab["probability"]))
    for f in FOLDS:  # the ensemble's AUC is not any one fold's, so the check above sees which probabilities were used
        assert abs(roc_auc_score(lab["label"], lab[f"probability_{f}"]) - doc["auc"]["auc"]) > 1e-3
    assert doc["auc"]["ci_low"] <= doc["auc"]["auc"] <= doc["auc"]["ci_high"]
    assert doc["ensemble"]["threshold"] == pytest.approx(pred["threshold"].iloc[0])
    assert doc["ensemble"]["accuracy"] == pytest.approx((lab["predicted"] == lab["label"]).mean())
    assert [f["fold"] for f in doc["per_fold"]] == list(FOLDS)
    tiles = pd.read_csv(out / "tiles" / f"{ids[0]}.csv")
    with h5py.File(out / "tiles" / f"{ids[0]}.h5") as f:
        np.testing.assert_array_equal(tiles[["x", "y"]].to_numpy(), f["coords"][:])
        np.testing.assert_allclose(tiles["attention"], f["attention"][:], rtol=1e-6)
    assert (out / "roc.png").is_file()


def refused(*args, match, out):
    r = predict_cli(*args, "--out", out)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert all(m in r.stderr for m in ([match] if isinstance(match, str) else match)), r.stderr
    assert not out.exists(), "nothing may be written"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_refusals_are_one_line_and_write_nothing(setup, tmp_path):
    run, new, out = setup / "run", setup / "new", tmp_path / "pred"
    wide = tmp_path / "wide"  # features of another dimension
    wide.mkdir()
    for p in sorted(new.glob("*.h5"))[:3]:
        write_bag(wide / p.name, np.zeros((5, 2 * D)), p.stem)
        with h5py.File(wide / p.name, "a") as f:
            f.attrs["feature_dim"] = 2 * D
    refused(run, wide, match=[f"feature_dim={D}", f"feature_dim={2 * D}"], out=out)
    (tmp_path / "empty").mkdir()
    refused(run, tmp_path / "empty", match="found none", out=out)
    refused(tmp_path / "empty", new, match="no config.json", out=out)
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"slide_id": ["b0", "zz1", "zz2"]}).to_csv(manifest, index=False)
    refused(run, manifest, "--features", new, match="2 slide(s) have no feature file", out=out)
    refused(run, manifest, match="expected --features DIR", out=out)
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = predict_cli(run, new, "--out", out)
    assert r.returncode == 2 and "--overwrite" in r.stderr and (out / "keep.txt").exists()
    r = predict_cli(run, new, "--out", out, "--overwrite", "--tiles", "none")
    assert r.returncode == 0, r.stderr
    assert not (out / "keep.txt").exists() and (out / "predictions.csv").is_file() and not (out / "tiles").exists()
    shutil.rmtree(out)
