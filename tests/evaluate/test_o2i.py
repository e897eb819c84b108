"""`mil evaluate o2i`: per-run metrics on the test split, localisation AP, points grouped over seeds, the plot."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score

from mil.evaluate.o2i import POINT_COLUMNS, cell_extents, localisation_ap, o2i_points, score_run
from mil.train.bagnet import BagNetTrainConfig, run_bagnet
from tests.conftest import invoke_mil
from tests.train.test_bagnet_train import toy_imageset

QUICK = dict(rf=9, width=0.0625, epochs=1, batch_size=16, lr=1e-3, max_train=16)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Four one-epoch runs: max pooling seeds 0 and 1 and mean pooling on set A (O2I 3.5 %), max pooling on set B (1.6 %)."""
    root = tmp_path_factory.mktemp("o2i")
    a = toy_imageset(root / "A", n_train=16, n_val=16, n_test=16, size=32)
    b = toy_imageset(root / "B", n_train=16, n_val=16, n_test=16, size=48, seed=1)
    out = {}
    for name, data, pooling, seed in (
        ("a_max_0", a, "max", 0),
        ("a_max_1", a, "max", 1),
        ("a_mean_0", a, "mean", 0),
        ("b_max_0", b, "max", 0),
    ):
        out[name] = root / name
        run_bagnet(data, out[name], BagNetTrainConfig(pooling=pooling, seed=seed, **QUICK), device="cpu")
    return out


def test_command_writes_metrics_points_and_plot(runs, tmp_path):
    png = tmp_path / "plots" / "o2i.png"
    r = invoke_mil("evaluate", "o2i", *runs.values(), "--out", png, "--device", "cpu", "--n-boot", 50)
    assert r.returncode == 0, r.stderr
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = pd.read_csv(png.with_suffix(".csv"))
    assert list(points.columns) == POINT_COLUMNS
    assert points[["group", "n_runs"]].values.tolist() == [["pooling=max", 1], ["pooling=max", 2], ["pooling=mean", 1]]
    assert points["o2i"].tolist() == pytest.approx([36 / 48**2, 36 / 32**2, 36 / 32**2])
    for name, run in runs.items():
        doc = json.loads((run / "eval" / "test" / "metrics.json").read_text())
        assert doc["n"] == 16 and doc["n_positive"] == 8 and doc["split"] == "test" and doc["threshold"] == 0.5
        assert 0 <= doc["accuracy"] <= 1 and 0 <= doc["auc"]["auc"] <= 1 and doc["auc"]["n_boot"] == 50
        assert 0 < doc["loc_ap"] <= 1 and doc["loc_ap_n"] == 8
        assert doc["o2i"] == pytest.approx(36 / (48 if name.startswith("b") else 32) ** 2)
        pred = pd.read_csv(run / "eval" / "test" / "predictions.csv")
        assert list(pred.columns) == ["index", "label", "probability", "o2i"] and len(pred) == 16
        assert pred["probability"].between(0, 1).all() and doc["accuracy"] == ((pred["probability"] >= 0.5) == pred["label"]).mean()
    seeds = [json.loads((runs[n] / "eval" / "test" / "metrics.json").read_text()) for n in ("a_max_0", "a_max_1")]
    two = points[points["n_runs"] == 2].iloc[0]
    accs = [d["accuracy"] for d in seeds]
    assert two["acc_mean"] == pytest.approx(np.mean(accs)) and two["acc_sd"] == pytest.approx(np.std(accs, ddof=1))
    assert two["auc_sd"] == pytest.approx(np.std([d["auc"]["auc"] for d in seeds], ddof=1))
    assert two["loc_ap_mean"] == pytest.approx(np.mean([d["loc_ap"] for d in seeds]))
    assert (points.loc[points["n_runs"] == 1, ["acc_sd", "auc_sd"]] == 0).all().all()
    assert "pooling=max" in r.stdout and "wrote" in r.stdout and "loc AP" in r.stdout


def test_grouping_by_rf_averages_every_run_of_an_image_set(runs):
    docs = [score_run(r, device="cpu", n_boot=10) for r in runs.values()]
    with pytest.warns(UserWarning, match="differ in pooling"):
        points = o2i_points(docs, "rf")
    assert points["group"].tolist() == ["rf=9", "rf=9"] and points["n_runs"].tolist() == [1, 3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        by_pool = o2i_points(docs, "auto")
    assert set(by_pool["group"]) == {"pooling=max", "pooling=mean"}
    by_width = o2i_points([d for d in docs if d["pooling"] == "max"], "width")
    assert by_width["group"].tolist() == ["width=0.0625", "width=0.0625"]


def test_other_split_and_data_override(runs, tmp_path):
    doc = score_run(runs["a_max_0"], split="val", device="cpu", n_boot=10)
    assert doc["split"] == "val" and (runs["a_max_0"] / "eval" / "val" / "metrics.json").exists()
    other = json.loads((runs["b_max_0"] / "config.json").read_text())["data"]
    doc = score_run(runs["a_max_0"], data=other, split="test", device="cpu", n_boot=10)
    assert doc["data"] == other and doc["o2i"] == pytest.approx(36 / 48**2)


def _pixel_ap(S: np.ndarray, bbox, H: int, W: int) -> float:
    """Brute force: paint each pixel with its cell's score (nearest centre 8i + 1, clipped), AP over pixels."""
    rows = np.clip((np.arange(H) + 3) // 8, 0, S.shape[0] - 1)  # (H,)
    cols = np.clip((np.arange(W) + 3) // 8, 0, S.shape[1] - 1)  # (W,)
    scores = S[rows][:, cols]  # (H, W)
    mask = np.zeros((H, W), bool)
    x0, y0, x1, y1 = bbox
    mask[y0:y1, x0:x1] = True
    return float(average_precision_score(mask.ravel(), scores.ravel()))


def test_cells_tile_the_image():
    starts, ends = cell_extents(4, 32)
    assert starts.tolist() == [0, 5, 13, 21] and ends.tolist() == [5, 13, 21, 32]
    starts, ends = cell_extents(6, 48)  # h = ceil((48 - 2) / 8) = 6
    assert starts[0] == 0 and ends[-1] == 48 and (starts[1:] == ends[:-1]).all()


def test_localisation_ap_on_hand_built_saliency():
    box = (5, 13, 21, 21)  # x0, y0, x1, y1: exactly cells (2, 1) and (2, 2) of a 32 × 32 image
    S = np.zeros((4, 4))
    S[2, 1:3] = 5.0
    assert localisation_ap(S, box, (32, 32)) == pytest.approx(1.0)
    elsewhere = np.zeros((4, 4))
    elsewhere[0, 3] = 5.0
    assert localisation_ap(elsewhere, box, (32, 32)) < 0.5
    assert localisation_ap(np.ones((4, 4)), box, (32, 32)) == pytest.approx(128 / 1024)  # uninformative: the box's share
    half = np.zeros((4, 4))
    half[2, 1] = 5.0
    assert 0.5 < localisation_ap(half, box, (32, 32)) < 1.0
    assert np.isnan(localisation_ap(S, (-1, -1, -1, -1), (32, 32)))
    rng = np.random.default_rng(0)
    for _ in range(20):  # weighted per-cell AP == per-pixel AP, also for boxes that cut cells
        H = int(rng.integers(16, 60))
        h = -(-(H - 2) // 8)
        S = rng.normal(size=(h, h)).round(1)  # (h, h) with ties
        x0, y0 = rng.integers(0, H - 4, 2)
        box = (int(x0), int(y0), int(x0 + rng.integers(1, 5)), int(y0 + rng.integers(1, 5)))
        assert localisation_ap(S, box, (H, H)) == pytest.approx(_pixel_ap(S, box, H, H))


def test_bad_run_directories_exit_2(runs, tmp_path):
    png = tmp_path / "o2i.png"
    r = invoke_mil("evaluate", "o2i", tmp_path / "nowhere", "--out", png, "--device", "cpu")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "config.json" in r.stderr, r.stderr
    fake = tmp_path / "features_run"
    fake.mkdir()
    (fake / "config.json").write_text(json.dumps({"stage": "train"}))
    (fake / "checkpoint.pt").write_bytes(b"x")
    r = invoke_mil("evaluate", "o2i", runs["a_max_0"], fake, "--out", png, "--device", "cpu")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "mil evaluate run" in r.stderr, r.stderr
    assert not png.exists()
    r = invoke_mil("evaluate", "o2i", runs["a_max_0"], "--out", tmp_path / "o2i.svg", "--device", "cpu")
    assert r.returncode == 2 and ".png" in r.stderr
    r = invoke_mil("evaluate", "o2i", runs["a_max_0"], "--out", png, "--group-by", "colour", "--device", "cpu")
    assert r.returncode == 2 and "--group-by" in r.stderr


def test_training_accuracy_is_reported_and_unfitted_runs_counted(runs, tmp_path):
    """Each run's best training accuracy comes from its metrics.csv; below --fit-threshold it is a failure."""
    docs = [score_run(r, device="cpu", n_boot=10) for r in runs.values()]
    for d, run in zip(docs, runs.values()):
        log = pd.read_csv(run / "metrics.csv")
        assert d["train_acc"] == log["train_acc"].max() and d["train_acc_last"] == log["train_acc"].iloc[-1]
        assert d["fitted"] == (d["train_acc"] >= 0.99) and d["norm"] == "in_aff"
    best = max(d["train_acc"] for d in docs)
    loose = [score_run(r, device="cpu", n_boot=10, fit_threshold=best) for r in runs.values()]
    points = o2i_points(loose, "pooling,norm")
    assert set(points["group"]) == {"pooling=max, norm=in_aff", "pooling=mean, norm=in_aff"}
    for d, run in zip(loose, runs.values()):  # the first epoch that reached the threshold
        acc = pd.read_csv(run / "metrics.csv")["train_acc"].tolist()
        first = next((e + 1 for e, v in enumerate(acc) if v >= best), None)
        assert d["epochs_to_fit"] == first and d["fitted"] == (first is not None)
    expected = sum(d["train_acc"] < best for d in loose)
    assert points["n_failed"].sum() == expected and expected < len(loose)  # the best run fitted at its own accuracy
    png = tmp_path / "o2i.png"
    r = invoke_mil("evaluate", "o2i", *runs.values(), "--out", png, "--device", "cpu", "--n-boot", 10, "--fit-threshold", 1.5)
    assert r.returncode == 2 and "--fit-threshold" in r.stderr and not png.exists()
