"""Training end to end on synthetic feature bags: learns, writes the run directory, never reads test."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from mil.checkpoint import load_head
from mil.errors import OptionError, SettingsMismatchError
from mil.features import FeatureFileError
from mil.train.loop import TrainConfig
from mil.train.run import run_train
from tests.conftest import invoke_mil

D = 16


def write_bag(path, feats, sid):
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats.astype(np.float32))
        c = f.create_dataset("coords", data=np.zeros((len(feats), 2), np.int64))
        c.attrs.update(patch_size=224, target_mpp=0.5, level0_mpp=0.25, patch_size_level0=448)
        f.attrs.update(slide_id=sid, encoder="toy", encoder_weights_sha256="none", feature_dim=D, mil_version="test")


def needle_cohort(tmp_path, n=80, witness=0.1, seed=0, split=True):
    """Bags of N(0,1) instances; positive bags hold a few instances shifted along one direction."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        y = i % 2
        X = rng.normal(size=(rng.integers(20, 60), D))
        if y:
            k = max(1, int(witness * len(X)))
            X[:k, 0] += 5.0
        write_bag(tmp_path / f"b{i}.h5", X, f"b{i}")
        rows.append({"slide_id": f"b{i}", "path": f"b{i}.h5", "label": y, "split": ("test" if i % 5 == 0 else "train") if split else ""})
    m = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(m, index=False)
    return m


SEEDS = (0, 1, 2)  # each seed draws its own cohort and its own initialisation and batch order


def learned_on_every_seed(tmp_path, threshold: float, **cfg) -> dict:
    """Train once per seed of `SEEDS` (cohort and training seed alike); every seed's validation AUC must exceed
    `threshold`. An untrained head scores 0.29, 0.60 and 0.52 on these cohorts, so one lucky draw cannot pass.

    Returns ``{seed: (folder, summary)}``; the seed-0 run is in ``folder / "run"``.
    """
    from mil.manifest import read_manifest

    runs = {}
    for seed in SEEDS:
        folder = tmp_path / f"s{seed}"
        folder.mkdir()
        m = needle_cohort(folder, seed=seed)
        runs[seed] = folder, run_train(folder, read_manifest(m), folder / "run", TrainConfig(lr=1e-3, seed=seed, **cfg))
    aucs = {seed: s["val_auc"][0] for seed, (_, s) in runs.items()}
    assert all(a > threshold for a in aucs.values()), aucs
    return runs


def test_learns_and_writes_the_run_directory(tmp_path):
    """Learns on each of 3 seeds (4 epochs each); the run directory is checked on the seed-0 run."""
    run = learned_on_every_seed(tmp_path, 0.95, epochs=4)[0][0] / "run"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["feature_spec"]["encoder"] == "toy" and cfg["train"]["seed"] == 0
    splits = pd.read_csv(run / "splits.csv")
    assert set(splits["set"]) == {"train", "val", "test"}
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics.columns)[:6] == ["fold", "epoch", "train_loss", "val_loss", "val_auc", "n_hard_negatives"]
    assert {"loss_bag", "loss_ranking", "ranking_steps"} <= set(metrics.columns)
    preds = pd.read_csv(run / "predictions.csv")
    assert set(preds["slide_id"]) == set(splits.query("set == 'val'")["slide_id"])  # validation only
    model, ckpt = load_head(run / "checkpoints" / "split.pt")
    assert ckpt["head"] == "abmil" and 0 <= ckpt["threshold"] <= 1
    X = torch.from_numpy(np.random.default_rng(1).normal(size=(1, 30, D)).astype(np.float32))
    assert torch.isfinite(model(X).logits).all()


def test_test_split_is_never_read(tmp_path):
    m = needle_cohort(tmp_path)
    from mil.manifest import read_manifest

    slides = read_manifest(m)
    for sid in slides.loc[slides["split"] == "test", "slide_id"]:
        (tmp_path / f"{sid}.h5").write_bytes(b"not hdf5: reading this would fail")
    summary = run_train(tmp_path, slides, tmp_path / "run", TrainConfig(epochs=2, seed=0))  # reading one would raise
    test_ids = set(slides.loc[slides["split"] == "test", "slide_id"])
    assert len(summary) == 1 and test_ids
    assert not test_ids & set(pd.read_csv(tmp_path / "run" / "predictions.csv")["slide_id"])
    splits = pd.read_csv(tmp_path / "run" / "splits.csv")
    assert set(splits.query("set == 'test'")["slide_id"]) == test_ids


def test_cross_validation_and_determinism(tmp_path):
    m = needle_cohort(tmp_path, split=False)
    from mil.manifest import read_manifest

    slides = read_manifest(m)
    a = run_train(tmp_path, slides, tmp_path / "a", TrainConfig(epochs=3, seed=4), folds=3)
    b = run_train(tmp_path, slides, tmp_path / "b", TrainConfig(epochs=3, seed=4), folds=3)
    assert list(a["fold"]) == ["r0f0", "r0f1", "r0f2"]
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a" / "metrics.csv"), pd.read_csv(tmp_path / "b" / "metrics.csv"))


def test_ranking_loss_option_trains(tmp_path):
    """The ranking loss (balanced batches of 4) learns on each of 3 seeds in 3 epochs, and is in the loss."""
    runs = learned_on_every_seed(tmp_path, 0.9, epochs=3, batch_size=4, ranking_weight=0.5)
    for seed, (folder, summary) in runs.items():
        assert summary["val_auc"][0] > 0.9, seed
        metrics = pd.read_csv(folder / "run" / "metrics.csv")
        assert (metrics["loss_ranking"] > 0).all(), (seed, metrics["loss_ranking"].tolist())  # the term is trained, not just accepted


def test_refusals(tmp_path):
    m = needle_cohort(tmp_path)
    from mil.manifest import read_manifest

    slides = read_manifest(m)
    (tmp_path / "b1.h5").unlink()
    (tmp_path / "b3.h5").unlink()
    with pytest.raises(FeatureFileError, match=r"2 slide\(s\) have no feature file in .*: b1, b3"):
        run_train(tmp_path, slides, tmp_path / "run", TrainConfig(epochs=1))
    assert not (tmp_path / "run").exists()
    with pytest.raises(OptionError, match="--epochs"):
        TrainConfig(epochs=0)
    (tmp_path / "x").mkdir()
    ok = needle_cohort(tmp_path / "x")
    first = run_train(tmp_path / "x", read_manifest(ok), tmp_path / "done", TrainConfig(epochs=1))
    stamp = (tmp_path / "done" / "checkpoints" / "split.pt").stat().st_mtime_ns
    again = run_train(tmp_path / "x", read_manifest(ok), tmp_path / "done", TrainConfig(epochs=1))  # same settings: skipped
    assert again.attrs.get("skipped") and (tmp_path / "done" / "checkpoints" / "split.pt").stat().st_mtime_ns == stamp
    pd.testing.assert_frame_equal(again, first, check_dtype=False)
    with pytest.raises(SettingsMismatchError, match=r"holds a run with a different 'train'"):
        run_train(tmp_path / "x", read_manifest(ok), tmp_path / "done", TrainConfig(epochs=2))
    (tmp_path / "done" / "summary.csv").unlink()  # an unfinished run with the same settings is trained again
    run_train(tmp_path / "x", read_manifest(ok), tmp_path / "done", TrainConfig(epochs=1))
    assert (tmp_path / "done" / "summary.csv").exists()


def test_overwrite_that_fails_keeps_the_old_run(tmp_path):
    """--overwrite replaces a run only once the new one has finished: a replacement that fails on a bad
    bag leaves the old run directory exactly as it was, and no temporary folder beside it."""
    from mil.manifest import read_manifest

    slides = read_manifest(needle_cohort(tmp_path))
    run_train(tmp_path, slides, tmp_path / "runs" / "r", TrainConfig(epochs=1))
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "runs").rglob("*") if p.is_file()}
    good = (tmp_path / "b1.h5").read_bytes()
    with h5py.File(tmp_path / "b1.h5", "r+") as f:  # a NaN in a training bag, found while the new run loads its bags
        f["features"][0, 0] = np.nan
    with pytest.raises(FeatureFileError, match="b1.h5"):
        run_train(tmp_path, slides, tmp_path / "runs" / "r", TrainConfig(epochs=2), overwrite=True)
    after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "runs").rglob("*") if p.is_file()}
    assert after == before and sorted(os.listdir(tmp_path / "runs")) == ["r"]
    (tmp_path / "b1.h5").write_bytes(good)
    run_train(tmp_path, slides, tmp_path / "runs" / "r", TrainConfig(epochs=2), overwrite=True)  # now it is replaced
    assert json.loads((tmp_path / "runs" / "r" / "config.json").read_text())["train"]["epochs"] == 2
    assert sorted(os.listdir(tmp_path / "runs")) == ["r"]


def test_cli_train_features(tmp_path):
    m = needle_cohort(tmp_path)
    r = invoke_mil("train", "features", tmp_path, "--manifest", m, "--out", tmp_path / "run", "--epochs", "3", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run" / "checkpoints" / "split.pt").exists() and "val_auc" in r.stdout
    r = invoke_mil("train", "features", tmp_path, "--manifest", m, "--out", tmp_path / "run2", "--head", "abmill")
    assert r.returncode == 2 and "did you mean 'abmil'" in r.stderr and not (tmp_path / "run2").exists()


def test_hard_negative_mining_trains_and_logs_the_mined_count(tmp_path):
    """Mining after 1 warm-up epoch learns on each of 3 seeds (2 epochs each) and logs its count per epoch."""
    runs = learned_on_every_seed(
        tmp_path, 0.9, epochs=2, batch_size=4, ranking_weight=0.5, hard_negatives=True, neg_ratio=0.1, hnm_warmup=1, hnm_every=2
    )
    for folder, _ in runs.values():
        mined = pd.read_csv(folder / "run" / "metrics.csv")["n_hard_negatives"]
        assert len(mined) == 2 and mined[0] == 0 and mined[1] > 0, mined  # mined before epoch 2, after 1 warm-up epoch
    m = runs[0][0] / "manifest.csv"
    r = invoke_mil(
        "train",
        "features",
        runs[0][0],
        "--manifest",
        m,
        "--out",
        tmp_path / "c",
        "--epochs",
        "3",
        "--hard-negatives",
        "--hnm-warmup",
        "1",
        "--hnm-every",
        "1",
    )
    assert r.returncode == 0 and "hard negatives" in r.stderr


def test_standardize_uses_training_statistics_and_round_trips(tmp_path):
    """--standardize: the checkpoint holds the training bags' mean/sd and reproduces the fold's predictions."""
    from mil.data import BagDataset, feature_stats
    from mil.manifest import read_manifest

    rng = np.random.default_rng(3)
    rows = []
    for i in range(24):
        X = 100.0 + 50.0 * rng.normal(size=(10, D))  # far from zero mean / unit sd
        X[:2, 0] += 200.0 * (i % 2)
        write_bag(tmp_path / f"b{i}.h5", X, f"b{i}")
        rows.append({"slide_id": f"b{i}", "path": f"b{i}.h5", "label": i % 2, "split": "test" if i % 6 == 0 else "train"})
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    run = tmp_path / "run"
    run_train(tmp_path, read_manifest(tmp_path / "manifest.csv"), run, TrainConfig(epochs=3, patience=3, seed=0, standardize=True))
    model, ckpt = load_head(run / "checkpoints" / "split.pt")
    assert ckpt["standardize"] is True
    splits = pd.read_csv(run / "splits.csv")
    train_ids = splits.loc[splits["set"] == "train", "slide_id"].tolist()
    mean, std = feature_stats(BagDataset([tmp_path / f"{s}.h5" for s in train_ids], [0] * len(train_ids), slide_ids=train_ids))
    torch.testing.assert_close(model.mean, mean)
    torch.testing.assert_close(model.std, std)
    assert float(mean.min()) > 50 and float(std.min()) > 20
    pred = pd.read_csv(run / "predictions.csv")
    ids = pred["slide_id"].tolist()
    val_ds = BagDataset([tmp_path / f"{s}.h5" for s in ids], pred["label"].tolist(), slide_ids=ids)
    with torch.inference_mode():
        p = [torch.sigmoid(model(val_ds[i][0][None]).logits).item() for i in range(len(val_ds))]
    np.testing.assert_allclose(p, pred["probability"], rtol=1e-5, atol=1e-6)
