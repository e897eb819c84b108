"""`mil evaluate heatmap --slides …`: a cohort in one process, tile scores as CSV and GeoJSON, index.html, failures, reruns.

Three small synthetic slides (2048² px at 0.25 µm/px, lesions off the diagonal) are tiled by the real
tiling stage, which records each slide's path in its file; their feature files carry those attrs.
They are the test set of a run trained for one epoch on six coordinate-less bags.
"""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mil.extract.generate.slide_writer import MASK_DOWNSAMPLE, write_slide
from mil.extract.wsi.grid import GridSpec
from mil.extract.wsi.tiles import TilingConfig, run_tiles
from mil.manifest import read_manifest
from mil.train.loop import TrainConfig
from mil.train.run import run_train
from tests.conftest import ellipse_mask, invoke_mil
from tests.evaluate.test_heatmap import D, write_bag

SIZE = 2048
TEST = ["s1", "s2", "s3"]
FAST = ("--thumbnail-size", "96", "--top-k", "1", "--no-progress")


def write_features(path, sid, coords, coord_attrs, file_attrs, X):
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=X.astype(np.float32))
        f.create_dataset("coords", data=coords).attrs.update(coord_attrs)
        f.attrs.update(file_attrs | dict(slide_id=sid, encoder="toy", encoder_weights_sha256="none", feature_dim=D, mil_version="test"))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("heatmap_cohort")
    n = SIZE // MASK_DOWNSAMPLE  # 128 mask px
    tissue = ellipse_mask(n, n, n * 0.5, n * 0.5, n * 0.4, n * 0.3)
    (root / "slides").mkdir()
    for i, sid in enumerate(TEST):
        lesion = tissue & ellipse_mask(n, n, n * (0.3 + 0.1 * i), n * 0.62, n * 0.1, n * 0.08)
        write_slide(root / "slides" / f"{sid}.tiff", tissue, lesion, width=SIZE, height=SIZE, mpp=0.25, seed=i)
    pd.DataFrame({"slide_id": TEST, "path": [f"{s}.tiff" for s in TEST]}).to_csv(root / "slides" / "slides.csv", index=False)
    run_tiles(
        read_manifest(root / "slides" / "slides.csv"),
        root / "tiles",
        TilingConfig(grid=GridSpec(target_mpp=0.5, tile_size=64)),
        progress=False,
    )
    rng = np.random.default_rng(0)
    feats = root / "features"
    feats.mkdir()
    rows = []
    for sid in TEST:
        with h5py.File(root / "tiles" / f"{sid}.h5") as f:
            coords, cattrs, fattrs = f["coords"][()], dict(f["coords"].attrs), dict(f.attrs)
        X = rng.normal(0, 0.3, (len(coords), D))  # (N, D)
        write_features(feats / f"{sid}.h5", sid, coords, cattrs, {"slide_path": fattrs["slide_path"]}, X)
        rows.append({"slide_id": sid, "path": "x", "label": int(sid != "s2"), "split": "test"})
    for i in range(6):  # training bags: no slide, only there so that run_train writes a real run directory
        write_bag(feats / f"b{i}.h5", rng.normal(0, 0.05, (20, D)) + [[i % 2, 0, 0, 0]], f"b{i}")
        rows.append({"slide_id": f"b{i}", "path": "x", "label": i % 2, "split": "val" if i >= 4 else "train"})
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    run_train(
        feats, read_manifest(root / "train.csv", check_files=False), root / "run", TrainConfig(head_kwargs={"hidden_dim": 4}, epochs=1)
    )
    return root


def heatmap(cohort, *args):
    return invoke_mil("evaluate", "heatmap", cohort / "run", *args, *FAST)


class Links(HTMLParser):
    """Every href / src of a page."""

    def __init__(self):
        super().__init__()
        self.targets = []

    def handle_starttag(self, tag, attrs):
        self.targets += [v for k, v in attrs if k in ("href", "src")]


def index_links(out):
    parser = Links()
    parser.feed((out / "index.html").read_text())
    return parser.targets


def check_tile_scores(cohort, out, sid):
    """The CSV's tiles are the feature file's (level-0 px); the GeoJSON holds the same squares and the same scores."""
    with h5py.File(cohort / "features" / f"{sid}.h5") as f:
        coords, size0 = f["coords"][()], int(f["coords"].attrs["patch_size_level0"])  # (N, 2)
    table = pd.read_csv(out / f"{sid}.csv", engine="python")  # Python float(): exact round trip
    assert list(table.columns) == ["x", "y", "width", "height", "attention", "instance_score"]
    np.testing.assert_array_equal(table[["x", "y"]].to_numpy(), coords)
    assert (table["width"] == size0).all() and (table["height"] == size0).all()
    assert table["attention"].sum() == pytest.approx(1.0)  # ABMIL attention: a softmax over the slide's tiles
    doc = json.loads((out / f"{sid}.geojson").read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == len(coords)
    for feat, (x, y), att, inst in zip(doc["features"], coords, table["attention"], table["instance_score"]):
        assert feat["type"] == "Feature" and feat["geometry"]["type"] == "Polygon"
        ring = np.array(feat["geometry"]["coordinates"][0])  # (5, 2) closed ring, (x, y) in level-0 px
        np.testing.assert_array_equal(ring, [[x, y], [x + size0, y], [x + size0, y + size0], [x, y + size0], [x, y]])
        props = feat["properties"]
        assert props["objectType"] == "detection"
        assert props["measurements"] == {"attention": att, "instance_score": inst}


def test_cohort_draws_every_test_slide_in_one_call(cohort, tmp_path):
    out = tmp_path / "maps"
    r = heatmap(cohort, "--slides", "test", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "3 slides: 3 drawn, 0 skipped (outputs exist), 0 failed" in r.stdout and f"wrote {out / 'index.html'}" in r.stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["index.html"] + [f"{s}{ext}" for s in TEST for ext in (".png", ".csv", ".geojson", ".thumb.jpg")])
    links = index_links(out)
    for sid in TEST:
        check_tile_scores(cohort, out, sid)
        assert {f"{sid}.png", f"{sid}.csv", f"{sid}.geojson", f"{sid}.thumb.jpg"} <= set(links)
        with Image.open(out / f"{sid}.png") as im:
            meta = json.loads(im.info["mil"])
        assert meta["slide_id"] == sid and meta["fold"] == "split" and meta["held_out"] == "test"
        label = int(sid != "s2")
        row = re.search(rf"<td>{sid}</td><td>([^<]*)</td><td>([^<]*)</td>", (out / "index.html").read_text())
        assert row and row.groups() == (str(label), f"{meta['probability']:.3f}")
        with Image.open(out / f"{sid}.thumb.jpg") as im:
            assert max(im.size) == 96  # the painted thumbnail (not larger than THUMB_PX)


def test_a_missing_slide_is_reported_and_the_others_are_written(cohort, tmp_path):
    out = tmp_path / "maps"
    manifest = tmp_path / "m.csv"  # the manifest's path wins over the recorded one: s2's points nowhere
    pd.DataFrame({"slide_id": ["s2"], "path": [str(tmp_path / "gone.tiff")]}).to_csv(manifest, index=False)
    r = heatmap(cohort, "--slides", "s1,s2", "--slides", "s3", "--manifest", manifest, "--out", out)
    assert r.returncode == 1, (r.stdout, r.stderr)
    errors = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: s2: ") and "gone.tiff" in errors[0], r.stderr
    assert "3 slides: 2 drawn, 0 skipped (outputs exist), 1 failed" in r.stdout
    assert not list(out.glob("s2*")) and not list(out.glob(".*"))  # nothing half-written
    for sid in ("s1", "s3"):
        check_tile_scores(cohort, out, sid)
    page = (out / "index.html").read_text()
    assert "s2.png" not in index_links(out) and re.search(r"<td>s2</td>.*error: .*gone\.tiff", page)
    r = heatmap(cohort, "--slides", "test", "--out", out)  # the slide found again: only it is drawn
    assert r.returncode == 0 and "3 slides: 1 drawn, 2 skipped" in r.stdout, (r.stdout, r.stderr)


def test_slides_root_finds_moved_slides(cohort, tmp_path):
    feats = shutil.copytree(cohort / "features", tmp_path / "features")
    for sid in TEST:  # recorded where the slides used to lie
        with h5py.File(feats / f"{sid}.h5", "a") as f:
            f.attrs["slide_path"] = f"/no/longer/here/{sid}.tiff"
    moved = tmp_path / "moved"
    (moved / "scans").mkdir(parents=True)
    for sid in TEST:
        shutil.copy(cohort / "slides" / f"{sid}.tiff", moved / ("scans" if sid == "s3" else "") / f"{sid}.tiff")
    lost = heatmap(cohort, "--slides", "test", "--features", feats, "--out", tmp_path / "lost")
    assert lost.returncode == 1 and lost.stderr.count("error: ") == 3 and "/no/longer/here/s1.tiff" in lost.stderr
    out = tmp_path / "found"
    r = heatmap(cohort, "--slides", "test", "--features", feats, "--slides-root", moved, "--out", out)
    assert r.returncode == 0 and "3 drawn" in r.stdout, (r.stdout, r.stderr)  # s1, s2 directly under the root; s3 in a subfolder
    check_tile_scores(cohort, out, "s3")
    manifest = tmp_path / "rel.csv"  # relative manifest paths start from --slides-root
    pd.DataFrame({"slide_id": ["s1"], "path": ["scans/../s1.tiff"]}).to_csv(manifest, index=False)
    r = heatmap(cohort, "--slide", "s1", "--manifest", manifest, "--slides-root", moved, "--features", feats, "--out", tmp_path / "one.png")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.glob("one.*")) == ["one.csv", "one.geojson", "one.png"]


def test_a_rerun_skips_finished_slides_and_redraws_on_new_settings(cohort, tmp_path):
    out = tmp_path / "maps"
    assert heatmap(cohort, "--slides", "test", "--out", out).returncode == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "index.html"}
    r = heatmap(cohort, "--slides", "test", "--out", out)
    assert r.returncode == 0 and "3 slides: 0 drawn, 3 skipped" in r.stdout, r.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "index.html"} == stamps
    assert all(f"{s}.geojson" in index_links(out) for s in TEST)  # the index still lists skipped slides
    r = heatmap(cohort, "--slides", "s1", "--out", out, "--score", "instance")
    assert r.returncode == 0 and "1 drawn" in r.stdout
    assert (out / "s1.png").stat().st_mtime_ns != stamps["s1.png"]


def test_slide_selection_and_refusals(cohort, tmp_path):
    from mil.evaluate.heatmap_cohort import HeatmapSource

    src = HeatmapSource(cohort / "run")
    assert src.select(["test"]) == TEST
    assert src.select(["all"]) == [f"b{i}" for i in range(6)] + TEST  # every feature file of the run's folder
    assert src.select(["s2, s1", "s2"]) == ["s2", "s1"]

    def refused(*args, needle):
        r = heatmap(cohort, *args, "--out", tmp_path / "x")
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr

    refused("--slides", "test", "--slide", "s1", needle="got both")
    refused(needle="got neither")
    refused("--slides", "s1,nope", needle="got none for 1: 'nope'")
    refused("--slides", "s1,bad id", needle="filename-safe")
    refused("--slides", "b0", needle="feature files record no slide_path and no --manifest was given")
    refused("--slides", "s1", "--slides-root", tmp_path / "nowhere", needle="--slides-root")
    assert not (tmp_path / "x").exists()
