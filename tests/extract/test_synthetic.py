"""Tests of mil.extract.generate.synthetic: masks, slides that OpenSlide opens, pixels that follow the masks."""

from __future__ import annotations

import json
import math

import numpy as np
import openslide
import pandas as pd
import pytest
from scipy import ndimage
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu

from mil.errors import OptionError
from mil.extract.generate.slide_writer import MASK_DOWNSAMPLE, random_masks, write_slide
from mil.extract.generate.synthetic import load_masks, make_cohort

W, H = 3072, 2560  # non-square, not a multiple of the tile, on purpose


@pytest.fixture(scope="module")
def masks() -> tuple[np.ndarray, np.ndarray]:
    return random_masks(W, H, rng=np.random.default_rng(1), lesion_fraction=0.03)


@pytest.fixture(scope="module")
def slides(tmp_path_factory, masks):
    """(fmt, mpp) -> path of a slide written from `masks`."""
    d = tmp_path_factory.mktemp("slides")
    tissue, lesion = masks
    out = {}
    for fmt in ("tiff", "svs"):
        for mpp in (0.25, 0.5, None):
            out[fmt, mpp] = write_slide(d / f"s_{mpp}.{fmt}", tissue, lesion, width=W, height=H, mpp=mpp, fmt=fmt, seed=3)
    return out


def _saturation(rgb: np.ndarray) -> np.ndarray:
    return rgb2hsv(rgb[..., :3])[..., 1]


def _region(slide: openslide.OpenSlide, y: int, x: int, r: int = 16) -> np.ndarray:
    return np.asarray(slide.read_region((x - r, y - r), 0, (2 * r, 2 * r)))[..., :3]


def _sample(mask: np.ndarray, n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Level-0 centres of n random mask cells."""
    ys, xs = np.nonzero(mask)
    assert ys.size > 0
    pick = rng.choice(ys.size, size=min(n, ys.size), replace=False)
    return [(int((ys[i] + 0.5) * MASK_DOWNSAMPLE), int((xs[i] + 0.5) * MASK_DOWNSAMPLE)) for i in pick]


# --- masks -------------------------------------------------------------------------------------


def test_random_masks_shape_fractions_and_geometry(masks):
    tissue, lesion = masks
    assert tissue.dtype == bool and lesion.dtype == bool
    assert tissue.shape == lesion.shape == (math.ceil(H / 16), math.ceil(W / 16))
    assert tissue.mean() == pytest.approx(0.4, abs=0.03)
    assert not (lesion & ~tissue).any(), "lesion must lie inside tissue"
    assert lesion.sum() / tissue.sum() == pytest.approx(0.03, rel=0.15)
    # Away from the borders.
    b = 3
    assert not tissue[:b].any() and not tissue[-b:].any()
    assert not tissue[:, :b].any() and not tissue[:, -b:].any()
    # A few blobs, not salt-and-pepper: the 5 largest components hold almost all of it.
    for m in (tissue, lesion):
        labels, n = ndimage.label(m)
        sizes = np.sort(np.bincount(labels.ravel())[1:])[::-1]
        assert sizes[:5].sum() >= 0.95 * m.sum(), n


def test_random_masks_no_lesion_and_seeds():
    a_t, a_l = random_masks(2048, 2048, rng=np.random.default_rng(5))
    b_t, _ = random_masks(2048, 2048, rng=np.random.default_rng(5))
    c_t, _ = random_masks(2048, 2048, rng=np.random.default_rng(6))
    assert not a_l.any()
    assert np.array_equal(a_t, b_t)
    assert not np.array_equal(a_t, c_t)
    t, _ = random_masks(2048, 1000, rng=np.random.default_rng(0), mask_downsample=8, tissue_fraction=0.2)
    assert t.shape == (125, 256)
    assert t.mean() == pytest.approx(0.2, abs=0.03)


# --- slides open in OpenSlide ------------------------------------------------------------------


@pytest.mark.parametrize("fmt,vendor", [("tiff", "generic-tiff"), ("svs", "aperio")])
@pytest.mark.parametrize("mpp", [0.25, 0.5])
def test_slide_opens_with_mpp_and_pyramid(slides, fmt, vendor, mpp):
    s = openslide.OpenSlide(slides[fmt, mpp])
    p = s.properties
    assert p["openslide.vendor"] == vendor
    assert float(p["openslide.mpp-x"]) == pytest.approx(mpp, rel=1e-4)
    assert float(p["openslide.mpp-y"]) == pytest.approx(mpp, rel=1e-4)
    if fmt == "svs":
        assert p["openslide.objective-power"] == ("40" if mpp <= 0.3 else "20")
        assert p["openslide.comment"].startswith("Aperio Image Library")
    else:
        assert "openslide.objective-power" not in p
    assert s.dimensions == (W, H)
    assert s.level_count == 2  # 3072 -> 768 <= 1024
    assert s.level_dimensions[1] == (W // 4, H // 4)
    assert s.level_downsamples == pytest.approx((1.0, 4.0), rel=1e-3)


@pytest.mark.parametrize("fmt", ["tiff", "svs"])
def test_slide_without_mpp(slides, fmt):
    p = openslide.OpenSlide(slides[fmt, None]).properties
    assert "openslide.mpp-x" not in p and "openslide.mpp-y" not in p
    assert "openslide.objective-power" not in p


def test_bigger_slide_has_more_levels(tmp_path):
    w = h = 4200  # 4200 -> 1050 -> 263
    t, _lesion = random_masks(w, h, rng=np.random.default_rng(0))
    s = openslide.OpenSlide(write_slide(tmp_path / "b.tiff", t, None, width=w, height=h))
    assert s.level_count == 3
    assert s.level_downsamples == pytest.approx((1, 4, 16), rel=2e-3)
    assert s.level_dimensions[2] == (263, 263)


# --- pixels follow the masks -------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["tiff", "svs"])
def test_level0_pixels_follow_masks(slides, masks, fmt):
    tissue, lesion = masks
    s = openslide.OpenSlide(slides[fmt, 0.25])
    rng = np.random.default_rng(0)
    inner_tissue = ndimage.binary_erosion(tissue & ~ndimage.binary_dilation(lesion, iterations=2), iterations=2)
    outside = ~ndimage.binary_dilation(tissue, iterations=2)
    inner_lesion = ndimage.binary_erosion(lesion, iterations=2)

    tis = [_region(s, y, x) for y, x in _sample(inner_tissue, 40, rng)]
    bg = [_region(s, y, x) for y, x in _sample(outside, 40, rng)]
    les = [_region(s, y, x) for y, x in _sample(inner_lesion, 20, rng)]
    for px in tis:
        assert _saturation(px).mean() > 0.2
        assert px.mean() < 225
    for px in bg:
        assert _saturation(px).mean() < 0.05
        assert px.mean() > 230
    # Lesion: darker (denser, darker nuclei) than ordinary tissue, clearly, on average.
    assert np.mean([p.mean() for p in les]) < np.mean([p.mean() for p in tis]) - 25
    assert all(_saturation(p).mean() > 0.2 for p in les)


def test_lowest_level_follows_masks_and_otsu_finds_tissue(slides, masks):
    tissue, lesion = masks
    s = openslide.OpenSlide(slides["tiff", 0.25])
    lvl = s.level_count - 1
    w, h = s.level_dimensions[lvl]
    img = np.asarray(s.read_region((0, 0), lvl, (w, h)))[..., :3]
    d = s.level_downsamples[lvl]
    # Mask cell under each level pixel centre.
    rows = np.minimum(((np.arange(h) + 0.5) * d // MASK_DOWNSAMPLE).astype(int), tissue.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * d // MASK_DOWNSAMPLE).astype(int), tissue.shape[1] - 1)
    t = tissue[np.ix_(rows, cols)]
    le = lesion[np.ix_(rows, cols)]
    sat = _saturation(img)
    gray = img.mean(axis=2)
    core_t = ndimage.binary_erosion(t & ~ndimage.binary_dilation(le, iterations=3), iterations=3)
    # JPEG 4:2:0 chroma rings up to one 16-px MCU from an edge, so keep 16 px away from tissue.
    core_bg = ~ndimage.binary_dilation(t, iterations=16)
    core_l = ndimage.binary_erosion(le, iterations=3)
    assert sat[core_t].min() > 0.15 and sat[core_t].mean() > 0.25
    assert sat[core_bg].max() < 0.05 and gray[core_bg].min() > 225
    assert gray[core_l].mean() < gray[core_t].mean() - 25
    # The tiling stage's detector: Otsu on saturation recovers the tissue mask.
    found = sat > threshold_otsu(sat)
    iou = (found & t).sum() / (found | t).sum()
    assert iou > 0.95


def test_write_slide_deterministic_and_atomic(tmp_path, masks):
    tissue, lesion = masks
    a = write_slide(tmp_path / "a.svs", tissue, lesion, width=W, height=H, fmt="svs", seed=7)
    b = write_slide(tmp_path / "b.svs", tissue, lesion, width=W, height=H, fmt="svs", seed=7)
    c = write_slide(tmp_path / "c.svs", tissue, lesion, width=W, height=H, fmt="svs", seed=8)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.svs", "b.svs", "c.svs"]


def test_write_slide_rejects_bad_arguments(tmp_path, masks):
    tissue, lesion = masks
    with pytest.raises(OptionError, match="shape"):
        write_slide(tmp_path / "x.tiff", tissue[:-1], None, width=W, height=H)
    with pytest.raises(OptionError, match="expected --format to be 'tiff' or 'svs', got 'png' instead"):
        write_slide(tmp_path / "x.png", tissue, lesion, width=W, height=H, fmt="png")
    with pytest.raises(OptionError, match="--mpp"):
        write_slide(tmp_path / "x.tiff", tissue, lesion, width=W, height=H, mpp=0)
    assert list(tmp_path.iterdir()) == []


# --- cohorts -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    seen: list[str] = []
    manifest = make_cohort(out, n_slides=5, size=2048, fmt="svs", seed=11, mpp=0.5, progress=seen.append)
    return out, manifest, seen


def test_cohort_manifest(cohort):
    out, manifest, seen = cohort
    assert manifest == out / "manifest.csv"
    df = pd.read_csv(manifest)
    assert list(df.columns) == ["slide_id", "path", "label", "split", "patient_id"]
    ids = [f"synth_{i:03d}" for i in range(5)]
    assert df.slide_id.tolist() == ids == seen
    assert df.path.tolist() == [f"{i}.svs" for i in ids]
    assert (df.patient_id == df.slide_id).all()
    assert set(df.label) == {0, 1} and df.label.sum() in (2, 3)
    assert set(df.split) <= {"train", "test"}
    for _, g in df.groupby("label"):
        if len(g) >= 2:
            assert (g.split == "test").sum() >= 1 and (g.split == "train").sum() >= 1
    for row in df.itertuples():
        s = openslide.OpenSlide(out / row.path)
        assert s.properties["openslide.vendor"] == "aperio"
        assert s.properties["openslide.objective-power"] == "20"
        assert s.level_count == 2


def test_cohort_masks_and_json(cohort):
    out, manifest, _ = cohort
    df = pd.read_csv(manifest)
    meta = json.loads((out / "synthetic.json").read_text())
    for key, value in {
        "seed": 11,
        "size": 2048,
        "fmt": "svs",
        "mpp": 0.5,
        "levels": 2,
        "mask_downsample": MASK_DOWNSAMPLE,
        "tile": 256,
    }.items():
        assert meta[key] == value
    for row in df.itertuples():
        tissue, lesion = load_masks(out / "masks", row.slide_id)
        assert tissue.shape == lesion.shape == (128, 128) and tissue.dtype == bool
        info = meta["slides"][row.slide_id]
        assert info["tissue_fraction"] == pytest.approx(tissue.mean())
        assert info["tissue_fraction"] == pytest.approx(0.4, abs=0.05)
        if row.label == 1:
            assert lesion.any() and not (lesion & ~tissue).any()
            assert info["lesion_fraction"] == pytest.approx(0.02, rel=0.3)
        else:
            assert not lesion.any() and info["lesion_fraction"] == 0


def test_cohort_is_deterministic(cohort, tmp_path):
    out, manifest, _ = cohort
    again = make_cohort(tmp_path / "again", n_slides=5, size=2048, fmt="svs", seed=11, mpp=0.5)
    assert again.read_bytes() == manifest.read_bytes()
    for f in sorted((out / "masks").iterdir()):
        assert (tmp_path / "again" / "masks" / f.name).read_bytes() == f.read_bytes()
    assert (tmp_path / "again" / "synth_000.svs").read_bytes() == (out / "synth_000.svs").read_bytes()
    other = make_cohort(tmp_path / "other", n_slides=5, size=2048, fmt="svs", seed=12, mpp=0.5)
    t_a, _ = load_masks(out / "masks", "synth_000")
    t_b, _ = load_masks(other.parent / "masks", "synth_000")
    assert not np.array_equal(t_a, t_b)


@pytest.mark.parametrize("n,frac,n_pos,n_test", [(2, 0.05, 1, 0), (2, 0.95, 1, 0), (8, 0.5, 4, 2), (1, 0.5, None, 0), (4, 0.0, 0, 1)])
def test_cohort_labels_and_splits(tmp_path, n, frac, n_pos, n_test):
    df = pd.read_csv(make_cohort(tmp_path, n_slides=n, size=512, seed=0, positive_fraction=frac))
    assert len(df) == n
    if n_pos is not None:
        assert df.label.sum() == n_pos
    assert (df.split == "test").sum() == n_test
    assert (tmp_path / "synth_000.tiff").exists()


@pytest.mark.parametrize(
    "kwargs,option",
    [
        ({"n_slides": 0}, "--n-slides"),
        ({"size": 256}, "--size"),
        ({"fmt": "png"}, "--format"),
        ({"mpp": 0}, "--mpp"),
        ({"mpp": -0.25}, "--mpp"),
        ({"positive_fraction": 1.5}, "--positive-fraction"),
        ({"positive_fraction": -0.1}, "--positive-fraction"),
    ],
)
def test_cohort_validates_arguments(tmp_path, kwargs, option):
    with pytest.raises(OptionError, match=f"expected {option} to be"):
        make_cohort(tmp_path / "c", **{"n_slides": 1, "size": 512, **kwargs})
    assert not (tmp_path / "c").exists()
    if option == "--format":
        with pytest.raises(OptionError, match="expected --format to be 'tiff' or 'svs', got 'png' instead"):
            make_cohort(tmp_path / "c", fmt="png")


def test_labels_depend_on_seed_but_keep_counts():
    from mil.extract.generate.synthetic import _labels_and_splits

    draws = {tuple(_labels_and_splits(10, 0.3, np.random.default_rng(s))[0]) for s in range(6)}
    assert len(draws) > 1, "positives should be drawn from the seed, not always the first ones"
    assert all(sum(d) == 3 for d in draws)


def test_cohort_rerun_with_same_parameters_writes_nothing(tmp_path):
    manifest = make_cohort(tmp_path, n_slides=2, size=512, seed=3)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert make_cohort(tmp_path, n_slides=2, size=512, seed=3) == manifest
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == stamps
    make_cohort(tmp_path, n_slides=2, size=512, seed=4)  # other parameters: rewritten
    assert (tmp_path / "synth_000.tiff").stat().st_mtime_ns != stamps[tmp_path / "synth_000.tiff"]


def test_cli_synthetic_reports_a_skipped_rerun(tmp_path):
    from tests.conftest import invoke_mil

    args = ("extract", "synthetic", tmp_path, "--n-slides", "2", "--size", "512", "--seed", "1")
    first, second = invoke_mil(*args), invoke_mil(*args)
    assert first.returncode == second.returncode == 0
    assert "wrote 2 slides" in first.stdout and "nothing written" in second.stdout
    bad = invoke_mil("extract", "synthetic", tmp_path / "x", "--format", "png")
    assert bad.returncode == 2 and "expected --format to be one of 'tiff', 'svs', got 'png'" in bad.stderr
