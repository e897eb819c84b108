"""A batch of slides with bad ones in it: every good slide finishes, every bad one is reported
with its reason, nothing partial is left, and the exit status is the CLI's (1, or 0 with
--skip-errors). The batch: `cases.BAD_SLIDES` (truncated, not a slide, no tissue, no mpp, zero
bytes, corrupt level-0 tiles, and two good slides)."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest

from tests.reliability.cases import BAD_SLIDES, FAST_FEATURES, FAST_TILES, bad_slide_batch, invoke, leftovers

BAD = [sid for sid, (_, tiles, feats, _) in BAD_SLIDES.items() if "error" in (tiles, feats)]


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    return bad_slide_batch(tmp_path_factory.mktemp("bad_batch"))


def check_report(out, stage: int, stderr: str) -> pd.DataFrame:
    """The report holds every slide with its expected status; each error is one line with its reason."""
    report = pd.read_csv(out / "extract_report.csv", keep_default_na=False).set_index("slide_id")
    assert list(report.index) == list(BAD_SLIDES)
    for sid, spec in BAD_SLIDES.items():
        status, reason = spec[stage], spec[3]
        assert report.loc[sid, "status"] == status, (sid, report.loc[sid].to_dict())
        if status == "error":
            assert reason in report.loc[sid, "error"] and "\n" not in report.loc[sid, "error"]
            lines = [line for line in stderr.splitlines() if line.startswith(f"error {sid}:")]
            assert len(lines) == 1 and reason in lines[0], stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert not leftovers(out), leftovers(out)
    return report


def test_tiles_finishes_good_slides_and_reports_bad_ones(batch, tmp_path):
    out = tmp_path / "tiles"
    r = invoke("extract", "tiles", batch, "--out", out, *FAST_TILES)
    assert r.returncode == 1, r.stderr
    report = check_report(out, 1, r.stderr)
    for sid in BAD_SLIDES:
        h5 = out / f"{sid}.h5"
        assert h5.exists() == (report.loc[sid, "status"] != "error"), sid  # no file at all for a failed slide
        if h5.exists():
            with h5py.File(h5) as f:
                assert f["coords"].shape == (report.loc[sid, "n_tiles"], 2)
    assert report.loc["blank", "n_tiles"] == 0 and report.loc["good0", "n_tiles"] > 0
    # --skip-errors: same report, exit 0 (the good slides are skipped, the bad ones tried again)
    r = invoke("extract", "tiles", batch, "--out", out, *FAST_TILES, "--skip-errors")
    assert r.returncode == 0, r.stderr
    report = pd.read_csv(out / "extract_report.csv", keep_default_na=False).set_index("slide_id")
    assert report.loc["good0", "status"] == "skipped" and report.loc["zero", "status"] == "error"


def test_features_finishes_good_slides_and_reports_bad_ones(batch, tmp_path):
    out = tmp_path / "features"
    r = invoke("extract", "features", batch, "--out", out, *FAST_FEATURES, "--workers", "1", "--skip-errors")
    assert r.returncode == 0, r.stderr  # --skip-errors
    report = check_report(out, 2, r.stderr)
    for sid in BAD_SLIDES:
        h5 = out / f"{sid}.h5"
        if report.loc[sid, "status"] == "error":
            # at most the whole coords file of the tiles stage (the corrupt slide tiles fine), never features
            if h5.exists():
                with h5py.File(h5) as f:
                    assert "features" not in f and "coords" in f
        else:
            with h5py.File(h5) as f:
                n = report.loc[sid, "n_tiles"]
                assert f["features"].shape == (n, 512) and f["coords"].shape == (n, 2)
                assert np.isfinite(f["features"][:]).all()
    # without --skip-errors: exit 1, the good slides are not redone
    stamp = (out / "good0.h5").stat().st_mtime_ns
    r = invoke("extract", "features", batch, "--out", out, *FAST_FEATURES, "--workers", "0")
    assert r.returncode == 1, r.stderr
    assert (out / "good0.h5").stat().st_mtime_ns == stamp
    report = pd.read_csv(out / "extract_report.csv", keep_default_na=False).set_index("slide_id")
    assert report.loc["good0", "status"] == "skipped" and report.loc["corrupt", "status"] == "error"
    assert "could not read the tile" in report.loc["corrupt", "error"]  # also without worker processes
    assert not leftovers(out)
