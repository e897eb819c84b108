"""`kill -9` of `mil extract features` and `mil train features` at random (seeded) moments, then a
rerun of the same command: the result is identical to an uninterrupted run's, what exists after
the kill is whole, and no temporary file is left. Three kills each here; ten each under `slow`
(and in benchmarks/reliability.py)."""

from __future__ import annotations

import random
import shutil
import time

import h5py
import pandas as pd
import pytest

from tests.reliability.cases import (
    bag_cohort,
    invoke,
    kill_during,
    leftovers,
    run,
    same_features,
    same_run_outputs,
    slide_cohort,
)

# 21 tiles per slide (64 px at 1 µm/px), one reading worker: a few seconds per slide.
FEATURES = ["--encoder", "resnet18", "--weights", "none", "--precision", "fp32", "--device", "cpu", "--target-mpp", "1.0",
            "--tile-size", "64", "--input-size", "64", "--batch-size", "8", "--workers", "1", "--no-progress"]  # fmt: skip
TRAIN = ["--epochs", "3", "--folds", "2", "--seed", "3", "--no-progress"]


@pytest.fixture(scope="module")
def features_ref(tmp_path_factory):
    """Slides, and the features of an uninterrupted run of the real executable (and its wall time)."""
    root = tmp_path_factory.mktemp("kill_features")
    manifest = slide_cohort(root / "slides", n=2)
    t0 = time.monotonic()
    r = run("extract", "features", manifest, "--out", root / "ref", *FEATURES)
    assert r.returncode == 0, r.stderr
    return manifest, root / "ref", time.monotonic() - t0


@pytest.fixture(scope="module")
def train_ref(tmp_path_factory):
    """Feature bags, and the run directory of an uninterrupted training run (and its wall time)."""
    root = tmp_path_factory.mktemp("kill_train")
    manifest = bag_cohort(root / "bags", n=24, split=False)
    t0 = time.monotonic()
    r = run("train", "features", root / "bags", "--manifest", manifest, "--out", root / "ref", *TRAIN)
    assert r.returncode == 0, r.stderr
    return manifest, root / "ref", time.monotonic() - t0


def assert_whole_feature_files(out) -> None:
    """Every `<slide>.h5` that exists under its final name opens and is complete: a coords file, or
    features with as many rows as coords."""
    for p in out.glob("*.h5"):
        with h5py.File(p, "r") as f:
            assert "coords" in f, p
            if "features" in f:
                assert f["features"].shape[0] == f["coords"].shape[0] and "feature_settings" in f.attrs, p


def check_killed_features(features_ref, tmp_path, n: int, seed: int) -> None:
    manifest, ref, wall = features_ref
    rng = random.Random(seed)
    ids = pd.read_csv(manifest)["slide_id"].tolist()
    for i in range(n):
        out = tmp_path / f"k{i}"
        delay = rng.uniform(0.5, 0.95) * wall  # the first part is interpreter start-up
        kill_during(["extract", "features", manifest, "--out", out, *FEATURES], delay, out)
        if out.exists():
            assert_whole_feature_files(out)
        r = invoke("extract", "features", manifest, "--out", out, *FEATURES)
        assert r.returncode == 0, (i, delay, r.stderr)
        same, why = same_features(ref, out, ids)
        assert same, (i, delay, why)
        assert not leftovers(out), (i, delay, leftovers(out))
        shutil.rmtree(out)


def check_killed_training(train_ref, tmp_path, n: int, seed: int) -> None:
    manifest, ref, wall = train_ref
    rng = random.Random(seed)
    feature_dir = manifest.parent
    for i in range(n):
        out = tmp_path / f"t{i}"
        delay = rng.uniform(0.5, 0.95) * wall  # the first part is interpreter start-up
        kill_during(["train", "features", feature_dir, "--manifest", manifest, "--out", out, *TRAIN], delay, out)
        r = invoke("train", "features", feature_dir, "--manifest", manifest, "--out", out, *TRAIN)
        assert r.returncode == 0, (i, delay, r.stderr)
        same, why = same_run_outputs(ref, out)
        assert same, (i, delay, why)
        assert not leftovers(out), (i, delay, leftovers(out))
        shutil.rmtree(out)


def test_killed_feature_extraction_reruns_to_identical_features(features_ref, tmp_path):
    check_killed_features(features_ref, tmp_path, n=3, seed=0)


def test_killed_training_reruns_to_an_identical_run(train_ref, tmp_path):
    check_killed_training(train_ref, tmp_path, n=3, seed=0)


@pytest.mark.slow
def test_killed_feature_extraction_ten_times(features_ref, tmp_path):
    check_killed_features(features_ref, tmp_path, n=10, seed=1)


@pytest.mark.slow
def test_killed_training_ten_times(train_ref, tmp_path):
    check_killed_training(train_ref, tmp_path, n=10, seed=1)


def test_training_removes_temporaries_of_a_run_killed_before_its_config(train_ref, tmp_path):
    """A run killed while writing its very first file leaves only a temporary; the rerun removes it."""
    manifest, ref, _ = train_ref
    out = tmp_path / "early"
    (out / "checkpoints").mkdir(parents=True)
    (out / ".config.json.tmp-999999999").write_text("{")  # no such process: a dead writer's leftover
    r = invoke("train", "features", manifest.parent, "--manifest", manifest, "--out", out, *TRAIN)
    assert r.returncode == 0, r.stderr
    assert not leftovers(out) and same_run_outputs(ref, out)[0]


def test_evaluation_removes_the_temporary_folder_of_a_killed_evaluation(train_ref, tmp_path):
    """`mil evaluate run` writes eval/<split>/ through a temporary folder; a killed one's is removed on the rerun."""
    _, ref, _ = train_ref
    run_dir = tmp_path / "run"
    shutil.copytree(ref, run_dir)
    stale = run_dir / "eval" / ".test.tmp-999999999"  # no such process
    stale.mkdir(parents=True)
    (stale / "metrics.json").write_text("{")
    r = invoke("evaluate", "run", run_dir, "--n-boot", "10")
    assert r.returncode == 0, r.stderr
    assert not leftovers(run_dir) and (run_dir / "eval" / "test" / "metrics.json").is_file()
