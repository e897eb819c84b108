"""Tests of the lesion mimic of synthetic cohorts (`make_cohort(mimic_fraction=…)`, `--mimic-fraction`):
hard negatives in the lesion's colours with another texture, on every slide whatever its label."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import openslide
import pandas as pd
import pytest
from scipy import ndimage

from mil.errors import OptionError
from mil.extract.generate.mimic import LESION_GAP
from mil.extract.generate.synthetic import MASK_DOWNSAMPLE, load_mask, load_masks, make_cohort

SIZE, F, LESION = 2048, 0.08, 0.05
ARGS = dict(n_slides=4, size=SIZE, seed=5, lesion_fraction=LESION)  # two positives, two negatives

# sha256 of make_cohort(d, n_slides=2, size=1024) (every file: relative path, then bytes, sorted by
# path), computed with the generator as it was before the mimic existed (commit 9130d77). A bump of
# numpy, scipy, Pillow or imagecodecs may change it: recompute it from that commit, not from this code.
DEFAULT_SHA256 = "b48e96e2ca896a879c1df1835f17ad591177e98bf88b1f2d559b79846290e2ac"


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory) -> dict[float, Path]:
    """The same cohort with the mimic (F) and without it (0)."""
    root = tmp_path_factory.mktemp("mimic")
    for f in (F, 0.0):
        make_cohort(root / str(f), mimic_fraction=f, **ARGS)
    return {f: root / str(f) for f in (F, 0.0)}


@pytest.fixture(scope="module")
def slides(cohorts) -> list[dict]:
    """Per slide: label, masks and level-0 pixels of the cohort with the mimic."""
    out = cohorts[F]
    rows = []
    for row in pd.read_csv(out / "manifest.csv").itertuples():
        masks = {k: load_mask(out / "masks", row.slide_id, k) for k in ("tissue", "lesion", "mimic")}
        img = np.asarray(openslide.OpenSlide(out / row.path).read_region((0, 0), 0, (SIZE, SIZE)).convert("RGB"))
        rows.append({"sid": row.slide_id, "label": row.label, "img": img.astype(np.float32), **masks})
    assert sorted(r["label"] for r in rows) == [0, 0, 1, 1]
    return rows


def _pixels(mask: np.ndarray) -> np.ndarray:
    """Level-0 pixel mask of the mask cells at least 2 cells inside `mask` (away from blended edges)."""
    core = ndimage.binary_erosion(mask, iterations=2)
    return np.kron(core, np.ones((MASK_DOWNSAMPLE, MASK_DOWNSAMPLE), bool))


def test_default_cohort_is_byte_identical_to_before(tmp_path):
    make_cohort(tmp_path / "default", n_slides=2, size=1024)
    make_cohort(tmp_path / "zero", n_slides=2, size=1024, mimic_fraction=0.0)
    assert _digest(tmp_path / "default") == _digest(tmp_path / "zero") == DEFAULT_SHA256
    meta = json.loads((tmp_path / "zero" / "synthetic.json").read_text())
    assert "mimic_fraction" not in meta and all("mimic_fraction" not in s for s in meta["slides"].values())
    assert not list((tmp_path / "zero" / "masks").glob("*_mimic.png"))


def test_mimic_masks_inside_tissue_apart_from_lesion_with_the_fraction(slides, cohorts):
    meta = json.loads((cohorts[F] / "synthetic.json").read_text())
    assert meta["mimic_fraction"] == F
    for s in slides:
        tissue, lesion, mimic = s["tissue"], s["lesion"], s["mimic"]
        assert mimic.dtype == bool and mimic.shape == tissue.shape == (SIZE // MASK_DOWNSAMPLE,) * 2
        assert not (mimic & ~tissue).any(), "mimic must lie inside tissue"
        assert not (mimic & ndimage.binary_dilation(lesion, iterations=LESION_GAP)).any(), "mimic must keep off the lesion"
        assert lesion.any() == bool(s["label"])
        # Same fraction of the tissue on negatives and positives: its presence says nothing about the label.
        assert mimic.sum() / tissue.sum() == pytest.approx(F, rel=0.03), s["sid"]
        assert meta["slides"][s["sid"]]["mimic_fraction"] == pytest.approx(mimic.sum() / tissue.sum())
        # Compact blobs like the lesion, not salt-and-pepper.
        labels, _ = ndimage.label(mimic)
        sizes = np.sort(np.bincount(labels.ravel())[1:])[::-1]
        assert sizes[:5].sum() >= 0.95 * mimic.sum()


def test_mimic_changes_nothing_else(cohorts):
    """Tissue and lesion masks are the same bytes; slide tiles away from the mimic are the same pixels."""
    with_m, without = cohorts[F], cohorts[0.0]
    assert (with_m / "manifest.csv").read_bytes() == (without / "manifest.csv").read_bytes()
    for sid in pd.read_csv(without / "manifest.csv").slide_id:
        for kind in ("tissue", "lesion"):
            assert (with_m / "masks" / f"{sid}_{kind}.png").read_bytes() == (without / "masks" / f"{sid}_{kind}.png").read_bytes()
        mimic = load_mask(with_m / "masks", sid, "mimic")
        a, b = (openslide.OpenSlide(d / f"{sid}.tiff") for d in (with_m, without))
        n = t = SIZE // 256
        same = differ = 0
        for ty in range(n):
            for tx in range(t):
                cells = mimic[max(ty * 16 - 1, 0) : ty * 16 + 17, max(tx * 16 - 1, 0) : tx * 16 + 17]
                pa, pb = (np.asarray(s.read_region((tx * 256, ty * 256), 0, (256, 256))) for s in (a, b))
                if not cells.any():
                    assert np.array_equal(pa, pb), (sid, ty, tx)
                    same += 1
                elif mimic[ty * 16 : ty * 16 + 16, tx * 16 : tx * 16 + 16].all():
                    assert not np.array_equal(pa, pb), (sid, ty, tx)
                    differ += 1
        assert same > 0


def test_mimic_has_the_lesion_colour_and_another_texture(slides):
    lesion_rgb, mimic_rgb, normal_rgb, blob = [], [], [], {"lesion": [], "mimic": []}
    for s in slides:
        img = s["img"]
        regions = {"mimic": s["mimic"], "normal": s["tissue"] & ~s["lesion"] & ~s["mimic"]}
        if s["label"]:
            regions["lesion"] = s["lesion"]
        means = {k: img[_pixels(m)].mean(axis=0) for k, m in regions.items()}
        mimic_rgb.append(means["mimic"])
        normal_rgb.append(means["normal"])
        if s["label"]:
            lesion_rgb.append(means["lesion"])
        # Nuclei: dark connected components; their mean size is the texture property that differs.
        for k in blob:
            if k in regions:
                dark, _ = ndimage.label((img.mean(axis=2) < 110) & _pixels(regions[k]))
                blob[k].append(np.bincount(dark.ravel())[1:].mean())
    lesion, mimic, normal = (np.mean(v, axis=0) for v in (lesion_rgb, mimic_rgb, normal_rgb))
    # Colour: the mimic is the lesion's stain and darkness, far from ordinary tissue.
    assert np.abs(mimic - lesion).max() < 10, (mimic, lesion)
    assert abs(mimic.mean() - lesion.mean()) < 6
    assert np.linalg.norm(mimic - normal) > 8 * np.linalg.norm(mimic - lesion)
    assert normal.mean() - mimic.mean() > 40
    # Texture: much smaller nuclei than the lesion's (and more of them) at the same darkness.
    assert np.mean(blob["mimic"]) < 0.5 * np.mean(blob["lesion"]), blob


def test_load_mask(cohorts):
    out = cohorts[F] / "masks"
    tissue, lesion = load_masks(out, "synth_000")
    assert np.array_equal(load_mask(out, "synth_000", "tissue"), tissue)
    assert np.array_equal(load_mask(out, "synth_000", "lesion"), lesion)
    assert load_mask(out, "synth_000", "mimic").dtype == bool
    with pytest.raises(OptionError, match="expected the mask kind to be one of 'tissue', 'lesion', 'mimic', got 'tumour' instead"):
        load_mask(out, "synth_000", "tumour")
    with pytest.raises(FileNotFoundError, match="--mimic-fraction"):
        load_mask(cohorts[0.0] / "masks", "synth_000", "mimic")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"mimic_fraction": -0.1}, "expected --mimic-fraction to be in [0, 1), got -0.1 instead"),
        ({"mimic_fraction": 1.0}, "expected --mimic-fraction to be in [0, 1), got 1.0 instead"),
        ({"mimic_fraction": math.nan}, "expected --mimic-fraction to be in [0, 1), got nan instead"),
        (
            {"mimic_fraction": 0.5, "lesion_fraction": 0.4},
            "expected --lesion-fraction + --mimic-fraction to be < 0.9, got 0.4 + 0.5 instead",
        ),
    ],
)
def test_mimic_fraction_is_validated(tmp_path, kwargs, message):
    with pytest.raises(OptionError) as e:
        make_cohort(tmp_path / "c", n_slides=1, size=512, **kwargs)
    assert str(e.value) == message
    assert not (tmp_path / "c").exists()


def test_rerun_without_the_mimic_removes_its_masks(tmp_path):
    make_cohort(tmp_path, n_slides=1, size=512, mimic_fraction=0.1)
    assert (tmp_path / "masks" / "synth_000_mimic.png").exists()
    make_cohort(tmp_path, n_slides=1, size=512)
    assert not list((tmp_path / "masks").glob("*_mimic.png"))
    assert "mimic_fraction" not in json.loads((tmp_path / "synthetic.json").read_text())


def test_cli_mimic_fraction(tmp_path):
    from tests.conftest import invoke_mil

    ok = invoke_mil("extract", "synthetic", tmp_path / "c", "--n-slides", "2", "--size", "512", "--mimic-fraction", "0.1")
    assert ok.returncode == 0 and "wrote 2 slides" in ok.stdout
    meta = json.loads((tmp_path / "c" / "synthetic.json").read_text())
    assert meta["mimic_fraction"] == 0.1
    for sid in ("synth_000", "synth_001"):
        assert load_mask(tmp_path / "c" / "masks", sid, "mimic").any()
    for args, message in [
        (("--mimic-fraction", "1"), "error: expected --mimic-fraction to be in [0, 1), got 1.0 instead"),
        (("--lesion-fraction", "0.5", "--mimic-fraction", "0.45"), "expected --lesion-fraction + --mimic-fraction to be < 0.9"),
    ]:
        bad = invoke_mil("extract", "synthetic", tmp_path / "x", *args)
        assert bad.returncode == 2 and message in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
