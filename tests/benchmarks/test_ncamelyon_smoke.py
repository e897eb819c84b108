"""Smoke test of benchmarks/ncamelyon.py: the quick configuration makes both cohorts, crops every O2I band,
trains and evaluates the usable image sets, writes the table and figure, and a rerun retrains nothing."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mil.imagesets import read_meta, read_split
from tests.benchmarks import load_benchmark


def test_ncamelyon_quick(tmp_path: Path) -> None:
    study = load_benchmark("ncamelyon")
    table = study.main(["--config", "quick", "--out", str(tmp_path)])
    bands = [study.band_name(b) for b in study.BANDS]
    assert list(zip(table["cohort"], table["band"])) == [(c, b) for c in study.LESIONS for b in bands]
    assert pd.read_csv(tmp_path / "ncamelyon.csv")[["cohort", "band"]].values.tolist() == table[["cohort", "band"]].values.tolist()
    assert (tmp_path / "ncamelyon.png").stat().st_size > 0 and (tmp_path / "eval_o2i.png").is_file()

    for band, (lo, hi) in zip(bands, study.BANDS):  # every positive crop of every split lies in its band; 3-channel RGB crops
        for cohort in study.LESIONS:
            for split in ("train", "val", "test"):
                s = read_split(tmp_path / "sets" / f"{cohort}_{band}", split)
                assert s.images.shape[1:] == (3, 32, 32) and ((s.o2i[s.labels == 1] >= lo) & (s.o2i[s.labels == 1] <= hi)).all()
                assert (s.labels == 1).sum() == (s.labels == 0).sum()  # balanced

    trained = table[table["n_runs"] > 0]
    assert len(trained) >= 1 and (trained["n_runs"] == 2).all()  # two seeds per trained image set
    for col in ("acc_mean", "auc_mean", "loc_ap_mean"):
        assert trained[col].between(0, 1).all(), trained[col]
    for row in trained.itertuples():
        meta = read_meta(tmp_path / "sets" / f"{row.cohort}_{row.band}")
        assert min(meta["n_positive"].values()) > 0 and row.n_test == meta["n"]["test"]
        assert trained["o2i"].between(0, 1).all() and len(row.best_train_acc.split(" / ")) == 2
    untrained = table[table["n_runs"] == 0]
    assert untrained["acc_mean"].isna().all()  # reported, not trained: some split has no positive crop

    runs = sorted((tmp_path / "runs").glob("*/summary.csv"))
    assert len(runs) == 2 * len(trained) and all((r.parent / "eval" / "test" / "metrics.json").is_file() for r in runs)
    stamp = {p: p.stat().st_mtime_ns for p in runs}
    again = study.main(["--config", "quick", "--out", str(tmp_path)])  # finished runs are skipped, not retrained
    assert {p: p.stat().st_mtime_ns for p in runs} == stamp
    pd.testing.assert_frame_equal(again, table)
