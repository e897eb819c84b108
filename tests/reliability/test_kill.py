"""`kill -9` of `mil extract features` and `mil train features` inside their work, then a rerun of the
same command: the result is identical to an uninterrupted run's, what exists after the kill is whole,
and no temporary file is left. Each kill is aimed at a seeded moment after a marker of started work
appears in the output folder, and must land there: the process still running, some of its output
written, not all of it (`cases.kill_inside`); a kill that misses is retried, never counted. Two
kills each here; ten each, one table row per kill, in benchmarks/reliability.py."""

from __future__ import annotations

import random
import shutil
from functools import partial

import h5py
import pandas as pd
import pytest

from tests.reliability.cases import (
    KILL_FEATURES,
    bag_cohort,
    feature_state,
    features_started,
    invoke,
    kill_inside,
    leftovers,
    run_state,
    same_features,
    same_run_outputs,
    slide_cohort,
    training_started,
    watch,
)

FEATURES = KILL_FEATURES
FOLDS = 2
TRAIN = ["--epochs", "3", "--folds", str(FOLDS), "--seed", "3", "--no-progress"]
SHARE = (0.05, 0.7)  # a kill lands this share of the reference's marker-to-exit window after the marker


@pytest.fixture(scope="module")
def features_ref(tmp_path_factory):
    """Slides, and the features of an uninterrupted, watched run of the real executable (its work window)."""
    root = tmp_path_factory.mktemp("kill_features")
    manifest = slide_cohort(root / "slides", n=2)
    w = watch(["extract", "features", manifest, "--out", root / "ref", *FEATURES], root / "ref", features_started)
    assert w.returncode == 0 and w.marker_s is not None, w.stderr
    return manifest, root / "ref", w.window_s


@pytest.fixture(scope="module")
def train_ref(tmp_path_factory):
    """Feature bags, and the run directory of an uninterrupted, watched training run (its work window)."""
    root = tmp_path_factory.mktemp("kill_train")
    manifest = bag_cohort(root / "bags", n=24, split=False)
    args = ["train", "features", root / "bags", "--manifest", manifest, "--out", root / "ref", *TRAIN]
    w = watch(args, root / "ref", training_started)
    assert w.returncode == 0 and w.marker_s is not None, w.stderr
    return manifest, root / "ref", w.window_s


def assert_whole_feature_files(out) -> None:
    """Every `<slide>.h5` that exists under its final name opens and is complete: a coords file, or
    features with as many rows as coords."""
    for p in out.glob("*.h5"):
        with h5py.File(p, "r") as f:
            assert "coords" in f, p
            if "features" in f:
                assert f["features"].shape[0] == f["coords"].shape[0] and "feature_settings" in f.attrs, p


def assert_interrupted(kill, i: int) -> None:
    """The kill landed inside the work: the process was running, had written part of its output, not all."""
    assert kill.signalled, (i, kill.describe())
    assert kill.state.parts > 0 and not kill.state.complete, (i, kill.describe())


def check_killed_features(features_ref, tmp_path, n: int, seed: int) -> None:
    manifest, ref, window = features_ref
    rng = random.Random(seed)
    ids = pd.read_csv(manifest)["slide_id"].tolist()
    for i in range(n):
        out = tmp_path / f"k{i}"
        kill = kill_inside(
            ["extract", "features", manifest, "--out", out, *FEATURES],
            out,
            started=features_started,
            state=partial(feature_state, n_slides=len(ids)),
            extra=rng.uniform(*SHARE) * window,
        )
        assert_interrupted(kill, i)
        assert_whole_feature_files(out)
        r = invoke("extract", "features", manifest, "--out", out, *FEATURES)
        assert r.returncode == 0, (i, kill.describe(), r.stderr)
        same, why = same_features(ref, out, ids)
        assert same, (i, kill.describe(), why)
        assert not leftovers(out), (i, kill.describe(), leftovers(out))
        shutil.rmtree(out)


def check_killed_training(train_ref, tmp_path, n: int, seed: int) -> None:
    manifest, ref, window = train_ref
    rng = random.Random(seed)
    feature_dir = manifest.parent
    for i in range(n):
        out = tmp_path / f"t{i}"
        args = ["train", "features", feature_dir, "--manifest", manifest, "--out", out, *TRAIN]
        kill = kill_inside(args, out, started=training_started, state=partial(run_state, n_folds=FOLDS), extra=rng.uniform(*SHARE) * window)
        assert_interrupted(kill, i)
        r = invoke(*args)
        assert r.returncode == 0, (i, kill.describe(), r.stderr)
        same, why = same_run_outputs(ref, out)
        assert same, (i, kill.describe(), why)
        assert not leftovers(out), (i, kill.describe(), leftovers(out))
        shutil.rmtree(out)


def test_killed_feature_extraction_reruns_to_identical_features(features_ref, tmp_path):
    check_killed_features(features_ref, tmp_path, n=2, seed=0)


def test_killed_training_reruns_to_an_identical_run(train_ref, tmp_path):
    check_killed_training(train_ref, tmp_path, n=2, seed=0)


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
