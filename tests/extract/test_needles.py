"""Tests of mil.extract.generate.needles (nMNIST-style canvases) and `mil extract needles`."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from mil.errors import IdxError
from mil.extract.generate import needles as nd
from mil.extract.generate.idx import idx_splits, load_idx_dir, read_idx, resize_objects
from mil.extract.generate.needles import default_n_clutter, make_needles
from mil.imagesets import SPLITS, read_meta, read_split
from tests.conftest import invoke_mil

OBJ = 8  # object side (px)
N_TRAIN, N_TEST, VAL = 60, 30, 20
TARGET = 1


def write_idx(path, arr: np.ndarray) -> None:
    """Write `arr` (uint8) in the IDX format; gzip-compressed when the name ends in .gz."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    raw = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes() + arr.tobytes()
    (gzip.open if str(path).endswith(".gz") else open)(path, "wb").write(raw)


def tiny_objects(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(n, 8, 8) uint8 objects with values 1–20 (sums of ≤ 12 never clip) and (n,) labels 0–2."""
    objects = rng.integers(1, 21, (n, OBJ, OBJ)).astype(np.uint8)
    labels = np.arange(n) % 3  # every class in every split
    rng.shuffle(labels)
    return objects, labels.astype(np.uint8)


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    tr_x, tr_y = tiny_objects(N_TRAIN, rng)
    te_x, te_y = tiny_objects(N_TEST, rng)
    write_idx(d / "train-images-idx3-ubyte.gz", tr_x)
    write_idx(d / "train-labels-idx1-ubyte.gz", tr_y)
    write_idx(d / "t10k-images-idx3-ubyte", te_x)  # plain and gzip mixed on purpose
    write_idx(d / "t10k-labels-idx1-ubyte", te_y)
    return d


def rebuild(objects: np.ndarray, made, i: int, canvas: int) -> np.ndarray:
    """Canvas i rebuilt from the recorded target box and clutter (source index = row of `objects`)."""
    acc = np.zeros((canvas, canvas), np.int64)
    if made.split.labels[i]:
        x0, y0, x1, y1 = made.split.bbox[i]
        acc[y0:y1, x0:x1] += objects[made.split.source[i]]
    for src, (x, y) in zip(made.clutter_source[i], made.clutter_xy[i]):
        if src >= 0:
            acc[y : y + OBJ, x : x + OBJ] += objects[src]
    return np.minimum(acc, 255)


# ---------------------------------------------------------------------------------------------
# IDX files


def test_read_idx_round_trip_plain_and_gz(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a.idx", "a.idx.gz"):
        write_idx(tmp_path / name, a)
        np.testing.assert_array_equal(read_idx(tmp_path / name), a)
    write_idx(tmp_path / "l", np.array([3, 1, 2], np.uint8))
    assert read_idx(tmp_path / "l").tolist() == [3, 1, 2]


@pytest.mark.parametrize(
    "raw, match",
    [
        (b"\x89PNG\r\n\x1a\n" + bytes(20), "magic number"),
        (bytes([0, 0, 8, 3]) + np.asarray([2, 3, 4], ">u4").tobytes() + bytes(5), "expected 40 bytes"),
        (b"\x00\x00", "magic number"),
    ],
)
def test_read_idx_refuses_bad_files_naming_them(tmp_path, raw, match):
    p = tmp_path / "bad-idx"
    p.write_bytes(raw)
    with pytest.raises(IdxError, match=match) as e:
        read_idx(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    with pytest.raises(IdxError, match="bad.gz"):
        read_idx(tmp_path / "bad.gz")


def test_load_idx_dir_lists_missing_files(tmp_path, idx_dir):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(IdxError, match="missing train-labels-idx1-ubyte.*t10k-images.*t10k-labels"):
        load_idx_dir(tmp_path)
    data = load_idx_dir(idx_dir)
    assert data["train"][0].shape == (N_TRAIN, OBJ, OBJ) and data["t10k"][1].shape == (N_TEST,)


def test_source_splits_are_disjoint(idx_dir):
    s = idx_splits(idx_dir, val_size=VAL)
    assert s["train"].index.tolist() == list(range(N_TRAIN - VAL))
    assert s["val"].index.tolist() == list(range(N_TRAIN - VAL, N_TRAIN))
    assert "t10k" in s["test"].origin and len(s["test"].objects) == N_TEST
    with pytest.raises(nd.OptionError, match="--val-size"):
        idx_splits(idx_dir, val_size=N_TRAIN)


# ---------------------------------------------------------------------------------------------
# make_needles


@pytest.mark.parametrize("canvas", [16, 32, 64, 128])
def test_canvases_are_built_as_recorded(idx_dir, canvas):
    s = idx_splits(idx_dir, val_size=VAL)["train"]
    n_clutter = {16: 1, 32: 3, 64: 6, 128: 10}[canvas]
    made = make_needles(s.objects, s.labels, TARGET, canvas, n_clutter=n_clutter, duplicates=2, seed=5)
    sp = made.split
    n_targets = int((s.labels == TARGET).sum())
    assert len(sp) == 4 * n_targets and sp.images.shape == (len(sp), 1, canvas, canvas)
    assert sp.labels.sum() * 2 == len(sp)  # exactly balanced
    pos = sp.labels == 1
    np.testing.assert_allclose(sp.o2i[pos], OBJ * OBJ / canvas**2)
    assert (sp.o2i[~pos] == 0).all() and (sp.bbox[~pos] == -1).all() and (sp.source[~pos] == -1).all()
    # N clutter objects on positives, N + 1 on negatives; never one of the target class.
    used = made.clutter_source >= 0
    assert (used.sum(1) == np.where(pos, n_clutter, n_clutter + 1)).all() and (made.n_objects == n_clutter + 1).all()
    assert (s.labels[made.clutter_source[used]] != TARGET).all()
    assert (s.labels[sp.source[pos]] == TARGET).all()
    for i in range(len(sp)):  # pixel mass: the canvas is exactly the sum of what was recorded
        np.testing.assert_array_equal(sp.images[i, 0], rebuild(s.objects, made, i, canvas))
    x0, y0, x1, y1 = sp.bbox[pos].T
    assert (x1 - x0 == OBJ).all() and (y1 - y0 == OBJ).all() and (x0 >= 0).all() and (y1 <= canvas).all()
    for i in np.flatnonzero(pos):  # the target is there, under whatever clutter was added on top
        bx0, by0, bx1, by1 = sp.bbox[i]
        assert (sp.images[i, 0, by0:by1, bx0:bx1] >= s.objects[sp.source[i]]).all()
    for i in np.flatnonzero(pos):  # the recorded occlusion is the distractor boxes' cover of the target box
        cover = np.zeros((canvas, canvas), bool)
        for src, (x, y) in zip(made.clutter_source[i], made.clutter_xy[i]):
            cover[y : y + OBJ, x : x + OBJ] |= src >= 0
        bx0, by0, bx1, by1 = sp.bbox[i]
        assert made.occlusion[i] == pytest.approx(cover[by0:by1, bx0:bx1].mean())
    assert np.isnan(made.occlusion[~pos]).all() and made.mean_occlusion == pytest.approx(made.occlusion[pos].mean())


@pytest.mark.parametrize("canvas", [96, 100])
def test_target_lies_anywhere_it_fits(canvas):
    """Not only in the top-left 64² cell (the authors' grid at a canvas that is not a multiple of 64)."""
    rng = np.random.default_rng(0)
    objects, labels = rng.integers(1, 21, (40, 28, 28)).astype(np.uint8), np.arange(40) % 2
    made = make_needles(objects, labels, 1, canvas, n_clutter=1, duplicates=50, seed=0)
    x0, y0, x1, y1 = made.split.bbox[made.split.labels == 1].T  # 1,000 positives
    assert x0.min() == 0 and y0.min() == 0 and x1.max() == canvas and y1.max() == canvas
    for lo in (x0, y0):  # uniform over the canvas - 28 + 1 positions: each third holds about a third
        counts = np.histogram(lo, bins=3, range=(0, canvas - 28 + 1))[0]
        assert counts.min() > 0.25 * len(lo)


def test_each_target_used_duplicates_times_and_caps_keep_balance(idx_dir):
    s = idx_splits(idx_dir, val_size=VAL)["train"]
    targets = np.flatnonzero(s.labels == TARGET)
    made = make_needles(s.objects, s.labels, TARGET, 32, n_clutter=2, duplicates=3, seed=1)
    counts = np.bincount(made.split.source[made.split.labels == 1], minlength=len(s.labels))
    assert (counts[targets] == 3).all() and counts.sum() == 3 * len(targets)
    capped = make_needles(s.objects, s.labels, TARGET, 32, n_clutter=2, n_images=9, duplicates=3, seed=1)
    assert len(capped.split) == 8 and capped.split.labels.sum() == 4
    src = capped.split.source[capped.split.labels == 1]
    assert len(set(src.tolist())) == 4  # a cap below #targets uses distinct targets


def test_same_seed_same_bytes_other_seed_differs(idx_dir):
    s = idx_splits(idx_dir, val_size=VAL)["val"]
    a, b, c = (make_needles(s.objects, s.labels, TARGET, 32, n_clutter=3, seed=seed, source_index=s.index) for seed in (7, 7, 8))
    for name in ("images", "labels", "o2i", "bbox", "source"):
        np.testing.assert_array_equal(getattr(a.split, name), getattr(b.split, name))
    assert not np.array_equal(a.split.images, c.split.images)
    # source_index maps rows to the IDX file: val objects come from the end of the train file
    assert (a.split.source[a.split.labels == 1] >= N_TRAIN - VAL).all()
    assert (a.clutter_source[a.clutter_source >= 0] >= N_TRAIN - VAL).all()


def test_clutter_table_and_o2i_of_the_paper():
    assert [default_n_clutter(c) for c in (64, 128, 256, 512, 1024, 2048)] == [2, 6, 25, 100, 400, 1600]
    assert default_n_clutter(384) == round(384**2 / 2600) - 1
    assert default_n_clutter(256, density=2.0) == 32
    # other object sizes get the count of the paper's canvas at the same canvas-to-object ratio
    assert [default_n_clutter(c, object_size=7) for c in (32, 64, 128)] == [6, 25, 100]
    assert default_n_clutter(96, object_size=7) == round(384**2 / 2600) - 1


def test_occlusion_falls_with_canvas_at_the_paper_density():
    """At the paper's clutter density the mean occlusion of the target grows as the canvas shrinks."""
    rng = np.random.default_rng(0)
    objects, labels = rng.integers(1, 21, (200, 28, 28)).astype(np.uint8), np.arange(200) % 2
    occ = {c: make_needles(objects, labels, 1, c, duplicates=4, seed=1).mean_occlusion for c in (64, 128, 256)}
    assert occ[64] > occ[128] > 0.1 and occ[256] > 0.1  # about 0.50 / 0.32 / 0.28


def test_resize_objects_keeps_shape_of_the_object():
    objects = np.zeros((3, 28, 28), np.uint8)
    objects[:, 8:20, 12:16] = 200  # a bar
    small = resize_objects(objects, 7)
    assert small.shape == (3, 7, 7) and small.dtype == np.uint8
    assert small[:, 2:5, 3].min() > 100 and small[:, :, 0].max() == 0  # the bar stays where it was
    assert resize_objects(objects, 28) is objects
    assert round(100 * 28 * 28 / 64**2, 1) == 19.1


def test_refuses_bad_arguments_and_oversized_splits(idx_dir, monkeypatch):
    s = idx_splits(idx_dir, val_size=VAL)["train"]
    with pytest.raises(nd.OptionError, match="--canvas of at least"):
        make_needles(s.objects, s.labels, TARGET, 4)
    with pytest.raises(nd.OptionError, match="target class 7"):
        make_needles(s.objects, s.labels, 7, 16)
    monkeypatch.setattr(nd, "MAX_BYTES", 1000)
    with pytest.raises(nd.OptionError, match="--max-per-split"):
        make_needles(s.objects, s.labels, TARGET, 64, n_clutter=1)


# ---------------------------------------------------------------------------------------------
# The command


def test_cli_end_to_end_rerun_and_mismatch(idx_dir, tmp_path):
    out = tmp_path / "needles"
    args = [
        "extract",
        "needles",
        "--idx-dir",
        idx_dir,
        "--target",
        TARGET,
        "--canvas",
        "16,32",
        "--val-size",
        VAL,
        "--seed",
        3,
        "--out",
        out,
        "--no-progress",
    ]
    r = invoke_mil(*args)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and "canvas_16" in lines[0] and "O2I 25 %" in lines[0] and "O2I 6.25 %" in lines[1]
    n_tr, n_te = (int((np.asarray(load_idx_dir(idx_dir)[k][1]) == TARGET).sum()) for k in ("train", "t10k"))
    for canvas in (16, 32):
        folder = out / f"canvas_{canvas}"
        meta = read_meta(folder)
        assert meta["generator"] == "needles" and meta["options"]["canvas"] == canvas and meta["o2i"] == OBJ**2 / canvas**2
        sources = {}
        for split in SPLITS:
            sp = read_split(folder, split)
            assert sp.images.shape[1:] == (1, canvas, canvas) and 2 * sp.labels.sum() == len(sp) == meta["n"][split]
            sources[split] = set(sp.source[sp.labels == 1].tolist())
        assert meta["n"]["train"] + meta["n"]["val"] == 4 * n_tr and meta["n"]["test"] == 4 * n_te
        assert max(sources["train"]) < N_TRAIN - VAL <= min(sources["val"])  # disjoint ranges of the train file
        assert meta["origin"]["test"].startswith("t10k")
    first = read_split(out / "canvas_32", "train").images

    r = invoke_mil(*args)
    assert r.returncode == 0 and r.stdout.count("already complete") == 2
    r = invoke_mil(*[a if a != 3 else 4 for a in args])  # another seed into the same folders
    assert r.returncode == 2 and "seed" in r.stderr and "--overwrite" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = invoke_mil(*[a if a != 3 else 4 for a in args], "--overwrite")
    assert r.returncode == 0 and json.loads((out / "canvas_32" / "imageset.json").read_text())["seed"] == 4
    assert not np.array_equal(read_split(out / "canvas_32", "train").images, first)
    r = invoke_mil(*[a if a != out else tmp_path / "again" for a in args])  # same seed elsewhere: identical
    assert r.returncode == 0
    np.testing.assert_array_equal(read_split(tmp_path / "again" / "canvas_32", "train").images, first)


def test_cli_bad_idx_file_exits_2_naming_it(idx_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in idx_dir.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    (bad / "t10k-labels-idx1-ubyte").write_bytes(b"<html>not found</html>")
    r = invoke_mil("extract", "needles", "--idx-dir", bad, "--target", 1, "--canvas", "16", "--out", tmp_path / "o", "--no-progress")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "t10k-labels-idx1-ubyte" in r.stderr and "magic number" in r.stderr
    assert not (tmp_path / "o" / "canvas_16" / "imageset.json").exists()
    r = invoke_mil("extract", "needles", "--target", 1, "--canvas", "16", "--out", tmp_path / "o")
    assert r.returncode == 2 and "--idx-dir" in r.stderr
    r = invoke_mil("extract", "needles", "--idx-dir", idx_dir, "--target", 1, "--canvas", "16,x", "--out", tmp_path / "o")
    assert r.returncode == 2 and "--canvas" in r.stderr
    r = invoke_mil("extract", "needles", "--idx-dir", idx_dir, "--target", 9, "--canvas", "16", "--val-size", VAL, "--out", tmp_path / "o")
    assert r.returncode == 2 and "--target" in r.stderr


def test_cli_sklearn_digits_offline(tmp_path):
    out = tmp_path / "digits"
    r = invoke_mil(
        "extract",
        "needles",
        "--source",
        "sklearn-digits",
        "--target",
        3,
        "--canvas",
        "64",
        "--max-per-split",
        "40,10,10",
        "--out",
        out,
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    meta = read_meta(out / "canvas_64")
    assert meta["n"] == {"train": 40, "val": 10, "test": 10} and meta["options"]["source"] == "sklearn-digits"
    assert meta["object_size"] == [28, 28] and abs(meta["o2i"] - 0.191) < 1e-3 and meta["n_clutter"] == 2
    sp = read_split(out / "canvas_64", "test")
    assert sp.images.max() == 255 and sp.labels.sum() == 5
    src = {k: set(read_split(out / "canvas_64", k).source.tolist()) - {-1} for k in SPLITS}
    assert max(src["train"]) < 1078 <= min(src["val"]) and max(src["val"]) < 1438 <= min(src["test"])
    occ = meta["target_occlusion"]
    assert set(occ) == set(SPLITS) and all(0 < v < 1 for v in occ.values())


def test_cli_object_size_scales_the_paper_geometry(idx_dir, tmp_path):
    """--object-size resizes the objects; the clutter count follows the canvas-to-object ratio."""
    out = tmp_path / "small"
    r = invoke_mil(
        "extract",
        "needles",
        "--idx-dir",
        idx_dir,
        "--target",
        TARGET,
        "--canvas",
        "16",
        "--val-size",
        VAL,
        "--object-size",
        4,
        "--out",
        out,
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    meta = read_meta(out / "canvas_16")
    assert meta["object_size"] == [4, 4] and meta["o2i"] == 16 / 256 and meta["options"]["object_size"] == 4
    assert meta["n_clutter"] == default_n_clutter(16, object_size=4) == 4  # 16 / 4 = 112 / 28: round(112² / 2600) - 1
    sp = read_split(out / "canvas_16", "train")
    x0, y0, x1, y1 = sp.bbox[sp.labels == 1].T
    assert (x1 - x0 == 4).all() and (y1 - y0 == 4).all()
    r = invoke_mil("extract", "needles", "--idx-dir", idx_dir, "--target", TARGET, "--canvas", "16", "--object-size", 1, "--out", out)
    assert r.returncode == 2 and "--object-size" in r.stderr
