"""Splits: patient-level, stratified, validation carved from training data only."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mil.errors import ManifestError, OptionError
from mil.train.splits import make_splits, splits_table


def cohort(n_patients=40, slides_per_patient=(1, 3), pos_rate=0.4, seed=0, split=None) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = int(rng.random() < pos_rate)
        for s in range(rng.integers(*slides_per_patient, endpoint=True)):
            rows.append({"slide_id": f"p{p}_s{s}", "patient_id": f"p{p}", "label": label, "split": "" if split is None else split(p)})
    df = pd.DataFrame(rows)
    df["label"] = df["label"].astype("Int64")
    return df


def patients(df, ids):
    return set(df.set_index("slide_id").loc[list(ids), "patient_id"])


@pytest.mark.parametrize("folds, repeats", [(5, 1), (3, 2)])
def test_cross_validation_never_leaks_a_patient(folds, repeats):
    df = cohort()
    out = make_splits(df, folds=folds, repeats=repeats, seed=1)
    assert len(out) == folds * repeats
    for f in out:
        tr, va, te = patients(df, f.train), patients(df, f.val), patients(df, f.test)
        assert not (tr & va or tr & te or va & te)
        assert set(f.train) | set(f.val) | set(f.test) == set(df["slide_id"])
        assert 0 < df.set_index("slide_id").loc[list(f.val), "label"].mean() < 1  # both classes in val
    for r in range(repeats):  # every slide held out exactly once per repeat
        held = [s for f in out if f.name.startswith(f"r{r}") for s in f.test]
        assert sorted(held) == sorted(df["slide_id"])


def test_seed_makes_splits_reproducible_and_changes_them():
    df = cohort()
    assert make_splits(df, folds=4, seed=3) == make_splits(df, folds=4, seed=3)
    assert make_splits(df, folds=4, seed=3) != make_splits(df, folds=4, seed=4)


def test_manifest_split_column_with_val_carved_from_train():
    df = cohort(split=lambda p: "test" if p % 4 == 0 else "train")
    (fold,) = make_splits(df, seed=0)
    test_ids = set(df.loc[df["split"] == "test", "slide_id"])
    assert set(fold.test) == test_ids
    assert not (set(fold.val) & test_ids) and fold.val  # validation comes from training slides only
    assert not (patients(df, fold.train) & patients(df, fold.val))


def test_manifest_val_split_is_used_as_given():
    df = cohort(split=lambda p: ["train", "val", "test"][p % 3])
    (fold,) = make_splits(df)
    assert set(fold.val) == set(df.loc[df["split"] == "val", "slide_id"])


def test_unlabelled_rows_are_ignored_and_table_is_long():
    df = cohort(n_patients=20)
    df.loc[0, "label"] = pd.NA
    out = make_splits(df, folds=2)
    table = splits_table(out)
    assert list(table.columns) == ["fold", "set", "slide_id"]
    assert df.loc[0, "slide_id"] not in set(table["slide_id"])
    assert len(table) == 2 * (len(df) - 1)


def test_bad_requests():
    with pytest.raises(ManifestError, match="--folds K"):
        make_splits(cohort())
    with pytest.raises(OptionError, match="expected at least 10 patients"):
        make_splits(cohort(n_patients=5), folds=10)
    with pytest.raises(OptionError, match="--folds >= 2"):
        make_splits(cohort(), folds=1)
    with pytest.raises(OptionError, match="--val-fraction"):
        make_splits(cohort(), folds=3, val_fraction=1.5)
