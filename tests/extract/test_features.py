"""`mil extract features`: file layout, reuse of the tiles stage, reruns, crashes, precision."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pandas as pd
import pytest

from mil.extract.wsi.encoders import create_encoder
from mil.extract.wsi.features import FeatureConfig, run_features
from mil.extract.wsi.grid import GridSpec
from mil.extract.wsi.tiles import TilingConfig, run_tiles
from mil.features import read_bag
from mil.manifest import read_manifest
from tests.conftest import invoke_mil

# Small and fast: 64-px tiles at 1 µm/px on 0.25 µm/px slides, resnet18 with random weights.
TILING = TilingConfig(grid=GridSpec(target_mpp=1.0, tile_size=64))
FAST = [
    "--encoder",
    "resnet18",
    "--weights",
    "none",
    "--target-mpp",
    "1.0",
    "--tile-size",
    "64",
    "--batch-size",
    "16",
    "--workers",
    "0",
    "--precision",
    "fp32",
    "--no-progress",
]


@pytest.fixture(scope="module")
def encoder():
    with pytest.warns(UserWarning, match="random"):
        return create_encoder("resnet18", weights="none", precision="fp32", input_size=64)


@pytest.fixture()
def cohort(tmp_path, slide_factory):
    rows = [{"slide_id": f"s{i}", "path": slide_factory(f"feat{i}", size=3072)} for i in range(2)]
    p = tmp_path / "m.csv"
    pd.DataFrame(rows).to_csv(p, index=False)
    return p


def test_feature_file_layout_and_coords_match_tiles(tmp_path, cohort, encoder):
    slides = read_manifest(cohort)
    run_tiles(slides, tmp_path / "tiles", TILING, progress=False)
    report = run_features(
        slides, tmp_path / "feats", encoder, FeatureConfig(tiling=TILING, workers=0), coords_dir=tmp_path / "tiles", progress=False
    )
    assert report["status"].tolist() == ["ok", "ok"]
    for sid in ("s0", "s1"):
        with h5py.File(tmp_path / "feats" / f"{sid}.h5") as f, h5py.File(tmp_path / "tiles" / f"{sid}.h5") as t:
            feats, coords = f["features"], f["coords"]
            assert feats.dtype == np.float32 and feats.shape == (coords.shape[0], 512) and feats.chunks[1] == 512
            assert np.array_equal(coords[:], t["coords"][:]) and coords.dtype == np.int64
            assert dict(coords.attrs) == dict(t["coords"].attrs)
            assert f.attrs["encoder"] == "resnet18" and f.attrs["feature_dim"] == 512
            assert f.attrs["encoder_weights_sha256"] == "none" and feats.attrs["encoder"] == "resnet18"
            assert json.loads(f.attrs["tissue_params"]) == json.loads(t.attrs["tissue_params"])
            assert f.attrs["mil_version"] and f.attrs["slide_id"] == sid
            assert np.isfinite(feats[:]).all() and feats[:].std() > 0
        bag = read_bag(tmp_path / "feats" / f"{sid}.h5")
        assert bag.features.shape[0] == bag.coords.shape[0] > 0
    # the same tile embedded on its own gives the same row
    from mil.extract.wsi.reader import TileDataset

    ds = TileDataset.from_coords_file(tmp_path / "tiles" / "s0.h5", slides["path"][0])
    import torch

    row = encoder.encode(torch.from_numpy(ds[3][None]))[0].numpy()
    assert np.allclose(row, read_bag(tmp_path / "feats" / "s0.h5").features[3], atol=1e-4)


def test_cli_tiles_first_then_skips_on_rerun(tmp_path, cohort):
    out = tmp_path / "o"
    r = invoke_mil("extract", "features", cohort, "--out", out, *FAST)
    assert r.returncode == 0, r.stderr
    assert "random" in r.stderr  # the random-weights warning reaches the user
    assert (out / "thumbnails" / "s0.png").exists() and (out / "features_config.json").exists()
    stamp = (out / "s0.h5").stat().st_mtime_ns
    r = invoke_mil("extract", "features", cohort, "--out", out, *FAST)
    assert r.returncode == 0 and (out / "s0.h5").stat().st_mtime_ns == stamp
    assert pd.read_csv(out / "extract_report.csv")["status"].tolist() == ["skipped", "skipped"]
    # another encoder into the same folder is refused before any work, naming the setting
    r = invoke_mil("extract", "features", cohort, "--out", out, *FAST[:-1], "--dtype", "float16")
    assert r.returncode == 2 and "dtype='float32'" in r.stderr and "--overwrite" in r.stderr
    assert (out / "s0.h5").stat().st_mtime_ns == stamp
    assert invoke_mil("extract", "features", cohort, "--out", out, *FAST, "--dtype", "float16", "--overwrite").returncode == 0
    with h5py.File(out / "s0.h5") as f:
        assert f["features"].dtype == np.float16


def test_features_take_the_tiling_of_tiles_config_json(tmp_path, cohort):
    """After `mil extract tiles`, features need no tiling options again: tiles_config.json gives them,
    and an option that contradicts it is refused before any work rather than tiling a second time."""
    tiles, out = tmp_path / "tiles", tmp_path / "feats"
    r = invoke_mil("extract", "tiles", "--manifest", cohort, "--out", tiles, "--target-mpp", "1.0", "--tile-size", "64", "--no-progress")
    assert r.returncode == 0, r.stderr
    no_tiling = [a for a in FAST if a not in ("--target-mpp", "1.0", "--tile-size", "64")]
    r = invoke_mil("extract", "features", "--manifest", cohort, "--coords-dir", tiles, "--out", out, *no_tiling, "--tile-size", "64")
    assert r.returncode == 0, r.stderr
    assert "tiling from" in r.stderr and str(tiles / "tiles_config.json") in r.stderr
    with h5py.File(tiles / "s0.h5") as t, h5py.File(out / "s0.h5") as f:
        np.testing.assert_array_equal(t["coords"][:], f["coords"][:])
    assert not (tiles / "s0.h5.tmp").exists()
    r = invoke_mil("extract", "features", cohort, "--coords-dir", tiles, "--out", tmp_path / "other", *no_tiling, "--tile-size", "128")
    assert r.returncode == 2 and "--tile-size" in r.stderr and "64" in r.stderr and "128" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not list((tmp_path / "other").glob("*.h5"))


def test_input_or_manifest_but_one_of_them(tmp_path, cohort):
    r = invoke_mil("extract", "tiles", "--out", tmp_path / "o")
    assert r.returncode == 2 and "--manifest" in r.stderr
    r = invoke_mil("extract", "tiles", cohort, "--manifest", tmp_path / "else.csv", "--out", tmp_path / "o")
    assert r.returncode == 2 and "one input" in r.stderr and not (tmp_path / "o").exists()


def test_bad_slide_is_reported_and_others_finish(tmp_path, cohort):
    df = pd.read_csv(cohort)
    (tmp_path / "bad.svs").write_text("not a slide")
    df.loc[len(df)] = ["bad", str(tmp_path / "bad.svs")]
    df.to_csv(cohort, index=False)
    r = invoke_mil("extract", "features", cohort, "--out", tmp_path / "o", *FAST)
    assert r.returncode == 1 and "bad" in r.stderr
    rep = pd.read_csv(tmp_path / "o" / "extract_report.csv").set_index("slide_id")
    assert rep.loc["bad", "status"] == "error" and rep.loc["s0", "status"] == "ok"
    assert not (tmp_path / "o" / "bad.h5").exists()


def test_no_tissue_slide_gives_empty_feature_file(tmp_path, slide_factory, encoder):
    path = slide_factory("blank_f", size=2048, tissue=np.zeros((128, 128), bool))
    slides = pd.DataFrame({"slide_id": ["b"], "path": [str(path)], "mpp": [np.nan]})
    report = run_features(slides, tmp_path, encoder, FeatureConfig(tiling=TILING, workers=0), progress=False)
    assert report["status"].tolist() == ["empty"]
    with h5py.File(tmp_path / "b.h5") as f:
        assert f["features"].shape == (0, 512) and f["coords"].shape == (0, 2)


def test_killed_run_resumes_to_identical_features(tmp_path, cohort):
    """kill -9 while the first slide's features are being written, rerun, compare with a clean run."""
    ref = tmp_path / "ref"
    assert invoke_mil("extract", "features", cohort, "--out", ref, *FAST).returncode == 0
    cmd = [sys.executable, "-m", "mil.cli", "extract", "features", str(cohort), "--out", str(tmp_path / "o"), *FAST]
    for attempt in range(4):  # noqa: B007 - named in the failure message below  # the kill can miss the window (features renamed in between): run again
        out = tmp_path / "o"
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        # coords of s0 exist and a temporary file is open: the features of s0 are being written
        while time.monotonic() < deadline and not ((out / "s0.h5").exists() and list(out.glob(".s0.h5.tmp-*"))):
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        with h5py.File(out / "s0.h5") as f:
            in_window = proc.returncode == -signal.SIGKILL and "features" not in f
        if in_window and list(out.glob(".s0.h5.tmp-*")):
            break
    assert proc.returncode == -signal.SIGKILL  # killed, not finished
    with h5py.File(out / "s0.h5") as f:  # what exists under its final name is whole: the coords file
        assert "coords" in f and "features" not in f, f"kill missed the write window {attempt + 1} times"
    assert list(out.glob(".s0.h5.tmp-*"))  # the half-written features, under a temporary name
    assert invoke_mil("extract", "features", cohort, "--out", out, *FAST).returncode == 0
    for sid in ("s0", "s1"):
        a, b = read_bag(ref / f"{sid}.h5"), read_bag(out / f"{sid}.h5")
        assert np.array_equal(a.features, b.features) and np.array_equal(a.coords, b.coords)
    assert not list(out.rglob(".*tmp*"))


def test_workers_give_the_same_features_as_the_main_process(tmp_path, cohort, encoder):
    slides = read_manifest(cohort).iloc[:1]
    run_features(slides, tmp_path / "w0", encoder, FeatureConfig(tiling=TILING, workers=0, batch_size=7), progress=False)
    run_features(slides, tmp_path / "w2", encoder, FeatureConfig(tiling=TILING, workers=2, batch_size=7), progress=False)
    a, b = read_bag(tmp_path / "w0" / "s0.h5"), read_bag(tmp_path / "w2" / "s0.h5")
    assert np.allclose(a.features, b.features, atol=1e-5)


@pytest.mark.parametrize(
    "opt",
    [
        ["--batch-size", "0"],
        ["--dtype", "float64"],
        ["--workers", "-1"],
        ["--precision", "fp8"],
        ["--encoder", "nonexistent_net"],
        ["--device", "tpu"],
    ],
)
def test_bad_feature_options_exit_2(tmp_path, cohort, opt):
    r = invoke_mil("extract", "features", cohort, "--out", tmp_path / "o", *FAST, *opt)
    assert r.returncode == 2, r.stderr
    assert "expected" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_compile_builds_one_graph_for_every_slide_and_reports_its_time(tmp_path, cohort, monkeypatch):
    """`--compile`: the encoder is compiled once for the run (one input shape across slides whose
    last batches differ), the time is printed and recorded, and the features are the eager ones."""
    from mil.extract.wsi import encoders

    shapes = set()

    def fake_compile(model, device):  # torch.compile(dynamic=False) compiles once per input shape
        return lambda x: shapes.add(tuple(x.shape)) or model(x)

    monkeypatch.setattr(encoders, "compile_model", fake_compile)
    r = invoke_mil("extract", "features", cohort, "--out", tmp_path / "c", *FAST, "--compile")
    assert r.returncode == 0, r.stderr
    assert (pd.read_csv(tmp_path / "c" / "extract_report.csv")["n_tiles"] % 16 != 0).all()  # smaller last batches
    assert shapes == {(16, 3, 224, 224)} and "compiled the encoder in" in r.stderr  # 64-px tiles resized to 224
    assert json.loads((tmp_path / "c" / "features_config.json").read_text())["compile"] is True
    assert invoke_mil("extract", "features", cohort, "--out", tmp_path / "e", *FAST).returncode == 0
    for s in ("s0", "s1"):
        assert np.allclose(read_bag(tmp_path / "c" / f"{s}.h5").features, read_bag(tmp_path / "e" / f"{s}.h5").features, atol=1e-4)


def test_the_cli_bounds_the_heap_before_embedding(tmp_path, cohort, monkeypatch):
    """`mil extract features` sets glibc's mmap threshold (peak RSS: docs/benchmarks.md) before any work."""
    import platform

    from mil.extract.wsi import features

    def stop():
        raise SystemExit(7)  # called: stop before the slides are read

    monkeypatch.setattr(features, "release_freed_memory", stop)
    assert invoke_mil("extract", "features", cohort, "--out", tmp_path / "o", *FAST).returncode == 7
    assert not list((tmp_path / "o").glob("*.h5"))
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert (
            subprocess.run([sys.executable, "-c", "from mil.extract.wsi.features import release_freed_memory as r; assert r()"]).returncode
            == 0
        )
