"""Tests of mil.extract.generate.crops (nCAMELYON-style crops) and `mil extract crops`, on a synthetic cohort."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from mil.errors import OptionError
from mil.extract.generate.crop_positions import crop_mask, mask_scale, positive_positions
from mil.extract.generate.crops import POSITIONS_NAME, CropConfig, parse_range
from mil.extract.generate.synthetic import MASK_DOWNSAMPLE, load_masks, make_cohort
from mil.imagesets import read_meta, read_split
from tests.conftest import invoke_mil

SIZE, LEVEL, DS = 128, 1, 4  # crops of 128 px at level 1 (4 level-0 px per crop px) = 512 level-0 px
LO, HI = 0.02, 0.2


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """4 slides of 2048 px (2 negative, 2 positive) and a manifest whose split column the test sets:
    one negative and one positive slide in train, the others in val, none in test."""
    d = tmp_path_factory.mktemp("cohort")
    make_cohort(d, n_slides=4, size=2048, seed=0, lesion_fraction=0.02)
    df = pd.read_csv(d / "manifest.csv").drop(columns=["split"])
    df["split"] = ""
    for label in (0, 1):
        rows = df.index[df["label"] == label]
        assert len(rows) == 2
        df.loc[rows, "split"] = ["train", "val"]
    df.to_csv(d / "crops_manifest.csv", index=False)
    df.drop(columns=["split"]).to_csv(d / "no_split.csv", index=False)
    return d


@pytest.fixture(scope="module")
def made(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("crops") / "set"
    r = invoke_mil(*crops_args(cohort, out))
    assert r.returncode == 0, r.stderr
    return {"out": out, "stdout": r.stdout, "manifest": pd.read_csv(cohort / "crops_manifest.csv")}


def crops_args(cohort, out, seed=3):
    return [
        "extract",
        "crops",
        "--manifest",
        cohort / "crops_manifest.csv",
        "--masks",
        cohort / "masks",
        "--size",
        SIZE,
        "--level",
        LEVEL,
        "--o2i",
        f"{LO}-{HI}",
        "--per-lesion",
        8,
        "--per-slide",
        12,
        "--seed",
        seed,
        "--out",
        out,
        "--no-progress",
    ]


def test_image_set_is_balanced_per_split_and_summarised(made):
    meta = read_meta(made["out"])
    assert meta["generator"] == "crops" and meta["options"]["o2i"] == [LO, HI] and meta["options"]["level"] == LEVEL
    for split in ("train", "val"):
        sp = read_split(made["out"], split)
        assert sp.images.shape[1:] == (3, SIZE, SIZE) and sp.images.dtype == np.uint8
        assert len(sp) > 0 and 2 * sp.labels.sum() == len(sp) == meta["n"][split]
        b = meta["before_balance"][split]
        assert len(sp) == 2 * min(b["positive"], b["negative"])
    assert meta["n"]["test"] == 0 and len(read_split(made["out"], "test")) == 0
    line = made["stdout"].strip()
    assert "\n" not in line and "train" in line and "O2I" in line


def test_positive_crops_hold_one_whole_lesion_with_o2i_in_range(made, cohort):
    table = pd.read_csv(made["out"] / POSITIONS_NAME)
    manifest = made["manifest"]
    side0 = SIZE * DS
    n_checked = 0
    for split in ("train", "val"):
        sp = read_split(made["out"], split)
        rows = table[table["split"] == split].set_index("index")
        for i in np.flatnonzero(sp.labels == 1):
            row = rows.loc[i]
            assert manifest.loc[sp.source[i], "slide_id"] == row.slide_id and row.level0_px_per_px == DS
            _, lesion = load_masks(cohort / "masks", row.slide_id)
            # Independent O2I: the mask blown up to level 0, sampled at each crop pixel's centre.
            full = np.repeat(np.repeat(lesion, MASK_DOWNSAMPLE, 0), MASK_DOWNSAMPLE, 1)
            centres = np.arange(SIZE) * DS + DS // 2
            seen = full[np.ix_(row.y0 + centres, row.x0 + centres)]  # (S, S)
            assert LO <= sp.o2i[i] <= HI
            assert sp.o2i[i] == pytest.approx(seen.mean(), abs=1e-6)
            # The boxed component lies whole inside the crop (in level-0 px) and fills its box.
            x0, y0, x1, y1 = sp.bbox[i]
            assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE
            labels, _ = ndimage.label(lesion, structure=np.ones((3, 3)))
            in_box = crop_mask(labels, row.x0, row.y0, SIZE, DS, (16.0, 16.0))[y0:y1, x0:x1]
            k = np.bincount(in_box[in_box > 0]).argmax()
            ys, xs = np.nonzero(labels == k)
            assert row.x0 <= xs.min() * 16 and (xs.max() + 1) * 16 <= row.x0 + side0
            assert row.y0 <= ys.min() * 16 and (ys.max() + 1) * 16 <= row.y0 + side0
            box = np.nonzero(crop_mask(labels, row.x0, row.y0, SIZE, DS, (16.0, 16.0)) == k)
            assert (box[1].min(), box[0].min(), box[1].max() + 1, box[0].max() + 1) == tuple(sp.bbox[i])
            # Lesion pixels are darker (denser nuclei) than the crop's other pixels.
            img = sp.images[i].astype(float).mean(0)
            assert img[seen].mean() < img[~seen].mean()
            n_checked += 1
    assert n_checked >= 4


def test_negatives_only_from_negative_slides_and_on_tissue(made):
    manifest = made["manifest"]
    for split in ("train", "val"):
        sp = read_split(made["out"], split)
        labels = manifest["label"].to_numpy()
        assert (labels[sp.source[sp.labels == 0]] == 0).all() and (labels[sp.source[sp.labels == 1]] == 1).all()
        assert (sp.o2i[sp.labels == 0] == 0).all() and (sp.bbox[sp.labels == 0] == -1).all()
        neg = sp.images[sp.labels == 0]
        assert (neg[:, 1].mean(axis=(1, 2)) <= 200).all()  # not background
        assert set(manifest.loc[sp.source, "split"]) == {split}


def test_same_seed_identical_rerun_complete_other_seed_mismatch(made, cohort, tmp_path):
    r = invoke_mil(*crops_args(cohort, made["out"]))
    assert r.returncode == 0 and "already complete" in r.stdout
    r = invoke_mil(*crops_args(cohort, made["out"], seed=4))
    assert r.returncode == 2 and "seed" in r.stderr and "--overwrite" in r.stderr
    r = invoke_mil(*crops_args(cohort, tmp_path / "again"))
    assert r.returncode == 0, r.stderr
    for split in ("train", "val"):
        a, b = read_split(made["out"], split), read_split(tmp_path / "again", split)
        for name in ("images", "labels", "o2i", "bbox", "source"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_manifest_without_split_exits_2_naming_it(cohort, tmp_path):
    args = crops_args(cohort, tmp_path / "o")
    args[args.index(cohort / "crops_manifest.csv")] = cohort / "no_split.csv"
    r = invoke_mil(*args)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "'split' column" in r.stderr and "no_split.csv" in r.stderr
    assert not (tmp_path / "o").exists()


def test_bad_options_exit_2(cohort, tmp_path):
    for flag, value, match in (("--o2i", "0.2-0.1", "--o2i"), ("--o2i", "abc", "--o2i"), ("--level", 9, "--level")):
        args = crops_args(cohort, tmp_path / "o")
        args[args.index(flag) + 1] = value
        r = invoke_mil(*args)
        assert r.returncode == 2 and match in r.stderr, r.stderr
    assert parse_range("0.01-0.1") == (0.01, 0.1)
    with pytest.raises(OptionError, match="only one"):
        CropConfig(level=1, level_mpp=1.0)


def test_positive_positions_respect_range_and_caps():
    lesion = np.zeros((64, 64), bool)  # a 1024 px slide, mask at 16 px
    lesion[10:14, 10:14] = True  # 64 × 64 level-0 px blob
    lesion[40:60, 40:60] = True  # 320 × 320 px: too large for the range below
    cfg = CropConfig(size=64, o2i=(0.05, 0.3), per_lesion=5, seed=0)
    found, counts = positive_positions(lesion, 1024, 1024, 4.0, cfg, np.random.default_rng(0))
    assert counts == {"components": 2, "used": 1, "too_large": 1, "no_fit": 0}
    assert len(found) == 5 and all(0.05 <= p.o2i <= 0.3 and p.component == 1 for p in found)
    assert mask_scale((64, 64), 1024, 1024) == (16.0, 16.0) and mask_scale((64, 64), 1020, 1010) == (16.0, 16.0)


def test_level_mpp_matches_the_equivalent_level(made, cohort, tmp_path):
    args = crops_args(cohort, tmp_path / "mpp")
    i = args.index("--level")
    args[i : i + 2] = ["--level-mpp", 1.0]  # slides are 0.25 µm/px: 1 µm/px = 4 level-0 px per px = level 1
    r = invoke_mil(*args)
    assert r.returncode == 0, r.stderr
    assert read_meta(tmp_path / "mpp")["options"]["level_mpp"] == 1.0
    for split in ("train", "val"):
        np.testing.assert_array_equal(read_split(tmp_path / "mpp", split).images, read_split(made["out"], split).images)
    args[i + 1] = 0.1  # finer than level 0
    r = invoke_mil(*args[:-3], "--out", tmp_path / "fine", "--no-progress")
    assert r.returncode == 2 and "--level-mpp" in r.stderr


def test_bagnet_trains_and_evaluates_on_rgb_crops(made, tmp_path):
    """The nCAMELYON path end to end: 3-channel crops → `mil train bagnet` → `mil evaluate o2i` (on val: this set has no test)."""
    run = tmp_path / "run"
    r = invoke_mil(
        "train",
        "bagnet",
        made["out"],
        "--out",
        run,
        "--rf",
        9,
        "--width",
        0.0625,
        "--epochs",
        1,
        "--batch-size",
        8,
        "--lr",
        1e-3,
        "--seed",
        0,
        "--device",
        "cpu",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "config.json").read_text())["bagnet"]["in_chans"] == 3
    r = invoke_mil("evaluate", "o2i", run, "--out", tmp_path / "o2i.png", "--split", "val", "--n-boot", 20, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    doc = json.loads((run / "eval" / "val" / "metrics.json").read_text())
    val = read_split(made["out"], "val")
    assert doc["n"] == len(val) and doc["n_positive"] == int(val.labels.sum()) and 0 <= doc["accuracy"] <= 1
    assert 0 < doc["loc_ap"] <= 1 and doc["loc_ap_n"] == doc["n_positive"]
    assert LO <= doc["o2i"] <= HI  # the median lesion fraction of the positive crops
    assert (tmp_path / "o2i.png").stat().st_size > 10_000
