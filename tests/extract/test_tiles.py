"""`mil extract tiles` on synthetic slides: geometry, tissue, bad input, reruns and crashes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pandas as pd
import pytest

from mil.extract.wsi.grid import GridSpec, tile_grid, tissue_fraction
from mil.extract.wsi.reader import TileDataset
from mil.extract.wsi.tiles import TilingConfig, run_tiles
from mil.manifest import read_manifest
from mil.slides import open_slide, slide_geometry
from tests.conftest import ellipse_mask, invoke_mil

MASK_DS = 16  # level-0 px per pixel of the masks given to slide_factory


def manifest(tmp_path, rows, name="m.csv"):
    p = tmp_path / name
    pd.DataFrame(rows).to_csv(p, index=False)
    return p


def expected_count(truth: np.ndarray, size: int, spec: GridSpec, level0_mpp: float, threshold: float) -> int:
    coords = tile_grid(size, size, spec, level0_mpp)
    frac = tissue_fraction(truth, MASK_DS, coords, spec.tile_size_level0(level0_mpp))
    return int((frac >= threshold).sum())


@pytest.mark.parametrize(
    "slide_mpp, target_mpp, tile_size",
    [(0.25, 0.25, 224), (0.25, 0.5, 224), (0.5, 0.5, 128), (0.25, 1.0, 128), (0.5, 2.0, 64)],
)
def test_tile_counts_match_the_ground_truth_mask(tmp_path, slide_factory, slide_mpp, target_mpp, tile_size):
    size = 4096
    n = size // MASK_DS
    truth = ellipse_mask(n, n, n * 0.5, n * 0.5, n * 0.3, n * 0.4)
    path = slide_factory(f"geom_{slide_mpp}", size=size, mpp=slide_mpp)
    spec = GridSpec(target_mpp=target_mpp, tile_size=tile_size)
    slides = pd.DataFrame({"slide_id": ["s"], "path": [str(path)], "mpp": [np.nan]})
    report = run_tiles(slides, tmp_path, TilingConfig(grid=spec), progress=False)
    expected = expected_count(truth, size, spec, slide_mpp, 0.5)
    n_tiles = int(report["n_tiles"][0])
    # Tolerance: tiles on the tissue border may flip; the interior is exact.
    assert abs(n_tiles - expected) <= max(2, 0.06 * expected), (n_tiles, expected)
    with h5py.File(tmp_path / "s.h5") as f:
        c = f["coords"]
        assert c.dtype == np.int64 and c.shape == (n_tiles, 2)
        size0 = round(tile_size * target_mpp / slide_mpp)
        assert c.attrs["patch_size_level0"] == size0 and c.attrs["patch_size"] == tile_size
        assert c.attrs["target_mpp"] == target_mpp and c.attrs["level0_mpp"] == pytest.approx(slide_mpp)
        assert (c.attrs["level0_width"], c.attrs["level0_height"]) == (size, size)
        # every kept tile really lies on tissue in the ground truth
        frac = tissue_fraction(truth, MASK_DS, c[:], size0)
        assert frac.min() >= 0.3
        assert json.loads(f.attrs["tissue_params"])["mask_mpp"] == 8.0


def test_both_formats_report_mpp(slide_factory):
    for fmt in ("tiff", "svs"):
        path = slide_factory("fmt", fmt=fmt, mpp=0.5)
        slide = open_slide(path)
        geom = slide_geometry(slide, path)
        assert geom.level0_mpp == pytest.approx(0.5, rel=1e-3) and geom.mpp_source == "openslide.mpp-x"
        assert len(geom.level_downsamples) >= 2


def test_tissue_threshold(tmp_path, slide_factory):
    path = slide_factory("thr")
    slides = pd.DataFrame({"slide_id": ["s"], "path": [str(path)], "mpp": [np.nan]})
    counts = []
    for i, thr in enumerate([0.0, 0.5, 1.0]):
        rep = run_tiles(slides, tmp_path / str(i), TilingConfig(tissue_threshold=thr), progress=False)
        counts.append(int(rep["n_tiles"][0]))
        with h5py.File(tmp_path / str(i) / "s.h5") as f:
            assert (f["tissue_fraction"][:] >= thr).all()
    assert counts[0] > counts[1] > counts[2] > 0


def test_no_tissue_gives_empty_valid_file(tmp_path, slide_factory):
    path = slide_factory("blank", tissue=np.zeros((256, 256), bool))
    r = invoke_mil("extract", "tiles", manifest(tmp_path, [{"slide_id": "blank", "path": path}]), "--out", tmp_path / "o", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "no tissue" in r.stderr
    with h5py.File(tmp_path / "o" / "blank.h5") as f:
        assert f["coords"].shape == (0, 2) and f["coords"].dtype == np.int64
    assert pd.read_csv(tmp_path / "o" / "extract_report.csv")["status"].tolist() == ["empty"]


def test_missing_mpp_names_slide_and_override(tmp_path, slide_factory):
    path = slide_factory("nompp", mpp=None)
    m = manifest(tmp_path, [{"slide_id": "nompp", "path": path}])
    r = invoke_mil("extract", "tiles", m, "--out", tmp_path / "o", "--no-progress")
    assert r.returncode == 1
    err = pd.read_csv(tmp_path / "o" / "extract_report.csv")["error"][0]
    assert "nompp" in err and "--mpp" in err and "'mpp' column" in err
    assert not (tmp_path / "o" / "nompp.h5").exists()
    # the global override, then the manifest column, fix it
    assert invoke_mil("extract", "tiles", m, "--out", tmp_path / "g", "--mpp", "0.25", "--no-progress").returncode == 0
    m2 = manifest(tmp_path, [{"slide_id": "nompp", "path": path, "mpp": 0.5}], "m2.csv")
    assert invoke_mil("extract", "tiles", m2, "--out", tmp_path / "c", "--no-progress").returncode == 0
    with h5py.File(tmp_path / "c" / "nompp.h5") as f:
        assert f["coords"].attrs["level0_mpp"] == 0.5 and f.attrs["mpp_source"] == "override"


def test_bad_slides_do_not_stop_the_batch(tmp_path, slide_factory):
    good = slide_factory("good")
    (tmp_path / "zero.svs").write_bytes(b"")
    (tmp_path / "text.svs").write_text("not a slide")
    truncated = tmp_path / "trunc.tiff"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    rows = [
        {"slide_id": s, "path": p}
        for s, p in [("good", good), ("zero", tmp_path / "zero.svs"), ("text", tmp_path / "text.svs"), ("trunc", truncated)]
    ]
    m = manifest(tmp_path, rows)
    r = invoke_mil("extract", "tiles", m, "--out", tmp_path / "o", "--no-progress")
    assert r.returncode == 1
    rep = pd.read_csv(tmp_path / "o" / "extract_report.csv").set_index("slide_id")
    assert rep.loc["good", "status"] == "ok" and rep.loc["good", "n_tiles"] > 0
    for bad in ("zero", "text", "trunc"):
        assert rep.loc[bad, "status"] == "error" and bad in r.stderr
        assert not (tmp_path / "o" / f"{bad}.h5").exists()
    assert "empty (0 bytes)" in rep.loc["zero", "error"]
    assert invoke_mil("extract", "tiles", m, "--out", tmp_path / "o", "--skip-errors", "--no-progress").returncode == 0
    assert not list((tmp_path / "o").glob(".*tmp*"))


@pytest.mark.parametrize(
    "rows, match",
    [
        ([{"slide_id": "../x", "path": "a.tiff"}], "filename-safe slide_id"),
        ([{"slide_id": "a", "path": "a.tiff"}, {"slide_id": "a", "path": "a.tiff"}], "duplicate slide_id"),
        ([{"slide_id": "a", "path": "missing.tiff"}], "does not exist"),
        ([{"slide_id": "a", "path": "a.tiff", "label": 3}], "expected label 0, 1 or empty"),
        (
            [
                {"slide_id": "a", "path": "a.tiff", "split": "train", "patient_id": "p"},
                {"slide_id": "b", "path": "a.tiff", "split": "test", "patient_id": "p"},
            ],
            "patient 'p' appears in splits",
        ),
        ([{"slide": "a", "path": "a.tiff"}], "missing slide_id"),
    ],
)
def test_bad_manifest_exits_2_and_writes_nothing(tmp_path, slide_factory, rows, match):
    (tmp_path / "a.tiff").write_bytes(slide_factory("any").read_bytes())
    m = manifest(tmp_path, rows)
    r = invoke_mil("extract", "tiles", m, "--out", tmp_path / "o")
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and match in lines[0] and "m.csv" in lines[0], r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "opt", [["--tile-size", "4"], ["--overlap", "300"], ["--tissue-threshold", "1.5"], ["--mpp", "-1"], ["--target-mpp", "0"]]
)
def test_bad_options_exit_2(tmp_path, slide_factory, opt):
    m = manifest(tmp_path, [{"slide_id": "a", "path": slide_factory("any")}])
    r = invoke_mil("extract", "tiles", m, "--out", tmp_path / "o", *opt)
    assert r.returncode == 2 and "expected" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_rerun_skips_and_changed_settings_are_refused(tmp_path, slide_factory):
    m = manifest(tmp_path, [{"slide_id": "a", "path": slide_factory("any")}])
    out = tmp_path / "o"
    assert invoke_mil("extract", "tiles", m, "--out", out, "--no-progress").returncode == 0
    stamp = (out / "a.h5").stat().st_mtime_ns
    assert invoke_mil("extract", "tiles", m, "--out", out, "--no-progress").returncode == 0
    assert (out / "a.h5").stat().st_mtime_ns == stamp
    assert pd.read_csv(out / "extract_report.csv")["status"].tolist() == ["skipped"]
    r = invoke_mil("extract", "tiles", m, "--out", out, "--tile-size", "256")
    assert r.returncode == 2 and "tile_size=224" in r.stderr and "tile_size=256" in r.stderr and "--overwrite" in r.stderr
    assert (out / "a.h5").stat().st_mtime_ns == stamp
    assert invoke_mil("extract", "tiles", m, "--out", out, "--tile-size", "256", "--overwrite", "--no-progress").returncode == 0
    with h5py.File(out / "a.h5") as f:
        assert f["coords"].attrs["patch_size"] == 256
    assert json.loads((out / "tiles_config.json").read_text())["grid"]["tile_size"] == 256


def test_folder_input_uses_file_stems(tmp_path, slide_factory):
    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / "S-01.tiff").write_bytes(slide_factory("any").read_bytes())
    (folder / "notes.txt").write_text("ignored")
    assert invoke_mil("extract", "tiles", folder, "--out", tmp_path / "o", "--no-progress").returncode == 0
    assert (tmp_path / "o" / "S-01.h5").exists() and (tmp_path / "o" / "thumbnails" / "S-01.png").exists()


def test_killed_run_leaves_no_complete_looking_file(tmp_path, slide_factory):
    """kill -9 at several moments; every .h5 that exists opens and is whole, and a rerun finishes."""
    paths = [slide_factory(f"kill{i}", size=6144) for i in range(3)]
    m = manifest(tmp_path, [{"slide_id": f"k{i}", "path": p} for i, p in enumerate(paths)])
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "mil.cli", "extract", "tiles", str(m), "--out", str(out), "--no-progress"]
    for wait_for in ("k0.h5", "k1.h5"):  # kill just after a slide finished, i.e. while the next one runs
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (out / wait_for).exists() and proc.poll() is None:
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        for h5 in out.glob("*.h5"):
            with h5py.File(h5) as f:  # would raise on a partial file
                assert f["coords"].shape[1] == 2 and "tiling_settings" in f.attrs
    assert invoke_mil("extract", "tiles", m, "--out", out, "--no-progress").returncode == 0
    assert sorted(p.name for p in out.glob("*.h5")) == ["k0.h5", "k1.h5", "k2.h5"]
    assert not list(out.rglob(".*tmp*"))


def test_tile_reader_reads_tissue_at_target_size(tmp_path, slide_factory):
    path = slide_factory("any")
    slides = read_manifest(manifest(tmp_path, [{"slide_id": "a", "path": path}]))
    run_tiles(slides, tmp_path / "o", TilingConfig(grid=GridSpec(target_mpp=0.5, tile_size=112)), progress=False)
    ds = TileDataset.from_coords_file(tmp_path / "o" / "a.h5", path)
    assert len(ds) > 0
    tiles = np.stack([ds[i] for i in range(len(ds))])  # (N, 112, 112, 3)
    assert tiles.shape[1:] == (112, 112, 3) and tiles.dtype == np.uint8
    sat = (tiles.max(-1).astype(float) - tiles.min(-1)) / np.maximum(tiles.max(-1), 1)
    assert np.median(sat) > 0.15  # tissue, not white background
    import pickle

    clone = pickle.loads(pickle.dumps(ds))  # what a DataLoader worker receives
    assert np.array_equal(clone[0], tiles[0])
