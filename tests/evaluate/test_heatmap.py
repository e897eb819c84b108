"""`mil evaluate heatmap` on a synthetic slide whose lesion is known: placement, figure, fallbacks, refusals.

The slide (4096² px at 0.25 µm/px) has a lesion off the diagonal, so an x/y swap would miss it. Tiles
come from the real tiling stage; each tile's feature 0 is its lesion area fraction (plus noise).
The run directory is written by `run_train` (1 epoch, so its files are the real format), then its
checkpoint's weights are set by hand so that attention grows with feature 0: the test checks where
scores are painted, not whether a head can learn.
"""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import mil
from mil.extract.generate.slide_writer import MASK_DOWNSAMPLE, write_slide
from mil.extract.wsi.grid import GridSpec, tissue_fraction
from mil.extract.wsi.tiles import TilingConfig, run_tiles
from mil.manifest import read_manifest
from mil.train.loop import TrainConfig
from mil.train.run import run_train
from tests.conftest import ellipse_mask, invoke_mil

SIZE, D = 4096, 4


def write_bag(path, feats, sid, coords=None, coord_attrs=None, encoder="toy"):
    """A feature file in the mil layout; coords (N, 2) and their attrs default to zeros / 224 px tiles."""
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats.astype(np.float32))
        c = f.create_dataset("coords", data=np.zeros((len(feats), 2), np.int64) if coords is None else coords)
        c.attrs.update(coord_attrs or dict(patch_size=64, target_mpp=0.5, level0_mpp=0.25, patch_size_level0=128))
        f.attrs.update(slide_id=sid, encoder=encoder, encoder_weights_sha256="none", feature_dim=D, mil_version="test")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("heatmap")
    n = SIZE // MASK_DOWNSAMPLE  # 256 mask px
    tissue = ellipse_mask(n, n, n * 0.5, n * 0.5, n * 0.38, n * 0.42)
    lesion = tissue & ellipse_mask(n, n, n * 0.36, n * 0.64, n * 0.1, n * 0.1)  # upper right, off the diagonal
    write_slide(root / "les.tiff", tissue, lesion, width=SIZE, height=SIZE, mpp=0.25, seed=3)
    pd.DataFrame({"slide_id": ["les"], "path": ["les.tiff"]}).to_csv(root / "slides.csv", index=False)
    run_tiles(read_manifest(root / "slides.csv"), root / "tiles", TilingConfig(grid=GridSpec(target_mpp=0.5, tile_size=64)), progress=False)
    with h5py.File(root / "tiles" / "les.h5") as f:
        coords, attrs = f["coords"][()], dict(f["coords"].attrs)  # (N, 2)
    frac = tissue_fraction(lesion, MASK_DOWNSAMPLE, coords, int(attrs["patch_size_level0"]))  # (N,) lesion share per tile
    rng = np.random.default_rng(0)
    feats = root / "features"
    feats.mkdir()
    X = rng.normal(0, 0.05, (len(coords), D))  # (N, D)
    X[:, 0] += frac
    write_bag(feats / "les.h5", X, "les", coords, attrs)
    rows = [{"slide_id": "les", "path": "x", "label": 1, "split": "test"}]
    for i in range(6):  # training bags: only there so that run_train writes a real run directory
        write_bag(feats / f"b{i}.h5", rng.normal(0, 0.05, (20, D)) + [[i % 2, 0, 0, 0]], f"b{i}")
        rows.append({"slide_id": f"b{i}", "path": "x", "label": i % 2, "split": "val" if i >= 4 else "train"})
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    slides = read_manifest(root / "train.csv", check_files=False)
    run_train(
        feats, slides, root / "run", TrainConfig(head_kwargs={"hidden_dim": 1, "attn_dim": 1}, epochs=1, standardize=False)
    )  # hand-set weights below act on raw features
    ckpt_path = root / "run" / "checkpoints" / "split.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    sd = {k: torch.zeros_like(v) for k, v in ckpt["state_dict"].items()}
    sd["project.0.weight"][0, 0] = 4.0  # h = relu(4 x_0)
    sd["pool.V.weight"][:] = 3.0  # attention logit 3 tanh(3 h): increasing in the lesion fraction
    sd["pool.w.weight"][:] = 3.0
    sd["classifier.weight"][:] = 2.0
    torch.save(ckpt | {"state_dict": sd}, ckpt_path)
    return {"root": root, "run": root / "run", "slides": root / "slides.csv", "tissue": tissue, "lesion": lesion, "frac": frac}


def check_hot_on_lesion(image: np.ndarray, lesion: np.ndarray) -> None:
    hot = image >= np.nanpercentile(image, 95)  # (h, w) the top 5 % of painted pixels (NaN compares False)
    assert hot.sum() > 50
    assert lesion[hot].mean() > 0.8
    assert lesion.T[hot].mean() < 0.2  # an x/y swap would put it elsewhere


def test_hottest_region_lies_on_the_lesion(case):
    from mil.evaluate.heatmap import MONTAGE_PX, compute_heatmap

    hm = compute_heatmap(case["run"], "les", case["slides"], thumbnail_size=256, top_k=4)
    assert hm.thumbnail.shape == (256, 256, 3) and hm.image.shape == case["lesion"].shape  # 16 level-0 px per pixel
    assert hm.score_name == "attention" and hm.fold == "split" and hm.held_out == "test" and not hm.note
    check_hot_on_lesion(hm.image, case["lesion"])
    painted = np.isfinite(hm.image)
    assert case["tissue"][painted].mean() > 0.9 and painted[~case["tissue"]].mean() < 0.1  # tiles lie on tissue only
    assert (case["frac"][hm.top] > 0.9).all() and len(hm.tiles) == 4 and hm.tiles[0].shape == (MONTAGE_PX, MONTAGE_PX, 3)
    assert np.nanmin(hm.image) == 0 and np.nanmax(hm.image) == 1
    # the first montage tile is read from the lesion: darker (dense nuclei) than the rest of the tissue
    assert hm.tiles[0].mean() < hm.thumbnail[case["tissue"] & ~case["lesion"]].mean()
    inst = compute_heatmap(case["run"], "les", case["slides"], thumbnail_size=256, top_k=0, score="instance")
    assert inst.score_name == "instance score" and not inst.note
    check_hot_on_lesion(inst.image, case["lesion"])


@pytest.mark.parametrize("flag", ["--manifest", "--slides"])  # --manifest, as on every command; --slides, its old name
def test_cli_writes_the_figure_with_no_temporary_left(case, flag):
    shutil.rmtree(case["run"] / "heatmaps", ignore_errors=True)
    r = invoke_mil("evaluate", "heatmap", case["run"], "--slide", "les", flag, case["slides"], "--thumbnail-size", "256", "--top-k", "3")
    assert r.returncode == 0, r.stderr
    out = case["run"] / "heatmaps" / "les.png"
    assert f"wrote {out}" in r.stdout
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 256 + 2 * 96 and im.size[1] > 256  # thumbnail, colour bar, montage
    assert sorted(p.name for p in out.parent.iterdir()) == ["les.csv", "les.geojson", "les.png"]  # tile scores beside it


def test_head_without_attention_paints_instance_scores(case, tmp_path):
    from mil.evaluate.heatmap import compute_heatmap

    run = shutil.copytree(case["run"], tmp_path / "run")
    ckpt_path = run / "checkpoints" / "split.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    sd = {k: torch.zeros_like(v) for k, v in mil.create_head("maxpool", in_dim=D, hidden_dim=1).state_dict().items()}
    sd["instance_mlp.0.0.weight"][0, 0] = 4.0
    sd["instance_mlp.1.weight"][:] = 1.0
    torch.save(ckpt | {"head": "maxpool", "head_kwargs": {"hidden_dim": 1}, "state_dict": sd}, ckpt_path)
    hm = compute_heatmap(run, "les", case["slides"], thumbnail_size=256, top_k=0)
    assert hm.score_name == "instance score" and "maxpool has no attention" in hm.note and hm.tiles == []
    check_hot_on_lesion(hm.image, case["lesion"])


def test_score_image_places_and_averages_tiles():
    from mil.evaluate.heatmap import score_image

    coords = np.array([[0, 0], [64, 0], [32, 0], [1000, 1000]])  # (4, 2) the third overlaps both; the last is off the grid
    img = score_image(coords, np.array([1.0, 3.0, 5.0, 9.0]), 64, (4, 8), (1 / 16, 1 / 16))  # 4 px per tile
    np.testing.assert_allclose(img[:, :2], 1.0)
    np.testing.assert_allclose(img[:, 2:4], 3.0)  # (1 + 5) / 2
    np.testing.assert_allclose(img[:, 4:6], 4.0)  # (3 + 5) / 2
    np.testing.assert_allclose(img[:, 6:8], 3.0)
    tiny = score_image(coords[:1], np.array([2.0]), 64, (3, 3), (1 / 1000, 1 / 1000))  # smaller than a pixel
    assert tiny[0, 0] == 2.0 and np.isnan(tiny).sum() == 8


def one_line_error(r, *needles):
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_refusals_are_one_line_and_write_nothing(case, tmp_path):
    def heatmap(run, *extra):
        return invoke_mil("evaluate", "heatmap", run, "--slides", case["slides"], "--out", tmp_path / "h.png", *extra)

    (tmp_path / "empty").mkdir()
    one_line_error(heatmap(tmp_path / "empty", "--slide", "les"), "config.json")
    run = shutil.copytree(case["run"], tmp_path / "run")
    one_line_error(heatmap(run, "--slide", "nope"), "expected a feature file", "'nope'")
    one_line_error(heatmap(run, "--slide", "les", "--fold", "7"), "'7'", "split")
    one_line_error(heatmap(run, "--slide", "les", "--score", "gradcam"), "'attention', 'instance'", "'gradcam'")
    one_line_error(heatmap(run, "--slide", "les", "--top-k", "100"), "--top-k")
    feats = shutil.copytree(case["root"] / "features", tmp_path / "features")
    with h5py.File(feats / "les.h5", "a") as f:
        f.attrs["encoder"] = "other"
    one_line_error(heatmap(run, "--slide", "les", "--features", feats), "encoder", "'other'")
    (feats / "les.h5").unlink()
    one_line_error(heatmap(run, "--slide", "les", "--features", feats), "expected a feature file", "'les'")
    (run / "checkpoints" / "split.pt").write_bytes(b"not a checkpoint")
    one_line_error(heatmap(run, "--slide", "les"), "split.pt")
    (run / "checkpoints" / "split.pt").unlink()
    one_line_error(heatmap(run, "--slide", "les"), "split.pt")
    assert not list(tmp_path.glob("*h.png*"))


def test_colour_bar_labels_stay_distinct_for_near_uniform_attention():
    from mil.evaluate.heatmap import _distinct_labels

    labels = _distinct_labels(1 / 132 + np.linspace(0, 1, 5) * 3e-7)
    assert len(set(labels)) == 5, labels
    assert _distinct_labels(np.linspace(0, 1, 5)) == ["0", "0.25", "0.5", "0.75", "1"]
