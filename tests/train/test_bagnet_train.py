"""`mil train bagnet` on tiny image sets: learns, accumulates exactly, resumes bit-identically, never reads test."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mil import create_bagnet
from mil.checkpoint import load_bagnet
from mil.errors import OptionError, SettingsMismatchError
from mil.imagesets import ImageSetDataset, check_split, write_meta, write_split
from mil.train.bagnet import (
    BagNetTrainConfig,
    balanced_subset,
    build_optimizer,
    make_loader,
    run_bagnet,
    scaled_milestones,
    train_epoch,
)
from tests.conftest import invoke_mil

SQUARE = 6
TINY = dict(rf=9, width=0.0625, batch_size=16, lr=1e-3, seed=0)  # 93k parameters: plumbing tests
LEARN = dict(rf=9, width=0.125, batch_size=8, lr=1e-3, seed=0)  # 368k parameters, ~0.3 s per epoch of 64 images on 2 idle cores


def toy_split(n: int, size: int = 32, square: int = SQUARE, seed: int = 0, positive_share: float = 0.5, noise: int = 10):
    """``n`` grey ``size × size`` images of dim noise (uniform 0…`noise`); positives hold one bright ``square²`` block (255).

    BagNet's InstanceNorm removes brightness and contrast, so what the net sees is the block's
    height in noise standard deviations: ~85 σ at noise 10 (learnt in a few epochs), ~9 σ at noise 80
    (dozens of epochs on 64 images).
    """
    rng = np.random.default_rng(seed)
    images = rng.integers(0, noise + 1, size=(n, 1, size, size), dtype=np.uint8)  # (n, 1, H, W)
    labels = (np.arange(n) < round(n * positive_share)).astype(np.int8)  # (n,)
    rng.shuffle(labels)
    bbox = np.full((n, 4), -1, np.int32)  # (n, 4)
    o2i = np.zeros(n, np.float32)  # (n,)
    for i in np.flatnonzero(labels):
        x0, y0 = rng.integers(0, size - square + 1, size=2)
        images[i, :, y0 : y0 + square, x0 : x0 + square] = 255
        bbox[i] = (x0, y0, x0 + square, y0 + square)
        o2i[i] = square * square / (size * size)
    return check_split(images, labels, o2i, bbox)


def toy_imageset(
    folder: Path,
    n_train: int = 64,
    n_val: int = 32,
    n_test: int = 32,
    size: int = 32,
    square: int = SQUARE,
    seed: int = 0,
    positive_share: float = 0.5,
) -> Path:
    """An image-set folder of `toy_split`s (train, val, test) with its imageset.json."""
    for k, (split, n) in enumerate((("train", n_train), ("val", n_val), ("test", n_test))):
        share = positive_share if split == "train" else 0.5
        write_split(folder / f"{split}.h5", toy_split(n, size, square, seed=seed * 10 + k, positive_share=share))
    write_meta(
        folder,
        {
            "generator": "toy",
            "size": size,
            "square": square,
            "seed": seed,
            "o2i": square * square / size**2,
            "n": {"train": n_train, "val": n_val, "test": n_test},
        },
    )
    return folder


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return toy_imageset(tmp_path_factory.mktemp("toy") / "set")


def test_milestones_scale_with_the_number_of_epochs():
    assert scaled_milestones(200) == [80, 120, 160]
    assert scaled_milestones(20) == [8, 12, 16]
    assert scaled_milestones(50) == [20, 30, 40]
    assert scaled_milestones(1) == [1, 1, 1]
    net = create_bagnet(rf=9, width=0.0625)
    opt, sched = build_optimizer(net, BagNetTrainConfig(epochs=20, lr=1.0))
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()  # no gradients: changes nothing, keeps the step order torch expects
        sched.step()
    assert lrs[:8] == [1.0] * 8 and lrs[8:12] == pytest.approx([0.1] * 4) and lrs[12:16] == pytest.approx([0.01] * 4)
    assert lrs[16:] == pytest.approx([0.001] * 4)
    assert opt.defaults["eps"] == 1e-5 and opt.defaults["weight_decay"] == 0.0


def test_learns_the_toy_task_and_writes_the_run_directory(toy, tmp_path):
    """Learns on each of 3 seeds (image set, initialisation and batch order; 3 epochs each, 8 full-lr steps):
    every seed's validation accuracy must pass 0.75 (untrained: ~0.5). The run directory is checked on seed 0."""
    (tmp_path / "set").symlink_to(toy, target_is_directory=True)
    seen = []
    summary = run_bagnet(tmp_path / "set", tmp_path / "run", BagNetTrainConfig(epochs=3, **LEARN), device="cpu", on_epoch=seen.append)
    run = tmp_path / "run"
    acc = {0: summary["val_acc"][0]}
    for seed in (1, 2):
        other = toy_imageset(tmp_path / f"set{seed}", n_test=8, seed=seed)
        acc[seed] = run_bagnet(other, tmp_path / f"run{seed}", BagNetTrainConfig(epochs=3, **{**LEARN, "seed": seed}), device="cpu")[
            "val_acc"
        ][0]
    assert all(a > 0.75 for a in acc.values()), (acc, pd.read_csv(run / "metrics.csv"))
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.json", "metrics.csv", "predictions.csv", "summary.csv"]
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics.columns) == [
        "epoch",
        "lr",
        "train_loss",
        "train_acc",
        "val_loss",
        "val_acc",
        "val_auc",
        "train_images_per_s",
        "seconds",
    ]
    assert metrics["epoch"].tolist() == [1, 2, 3] and (metrics["train_images_per_s"] > 0).all()
    assert len(seen) == 3 and seen[-1]["epochs"] == 3
    best = int(summary["best_epoch"][0])
    top = metrics["val_acc"].max()
    assert metrics["val_acc"][best - 1] == top
    assert metrics.loc[metrics["val_acc"] == top, "val_loss"].min() == metrics["val_loss"][best - 1]  # ties → lower loss
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"] == {
        "rf": 9,
        "pooling": "max",
        "width": 0.125,
        "epochs": 3,
        "batch_size": 8,
        "accumulate": 1,
        "lr": 1e-3,
        "max_train": None,
        "seed": 0,
        "norm": "in_aff",
    }
    assert cfg["imageset"]["generator"] == "toy" and cfg["milestones"] == [1, 2, 2] and cfg["n_train"] == 64
    assert cfg["runtime"] == {"device": "cpu", "workers": 0}
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["kind"] == "bagnet" and ckpt["best_epoch"] == best and ckpt["threshold"] == 0.5
    assert ckpt["imageset"]["generator"] == "toy" and ckpt["bagnet"]["rf"] == 9
    net, _ = load_bagnet(run / "checkpoint.pt")
    preds = pd.read_csv(run / "predictions.csv")
    assert list(preds.columns) == ["index", "label", "probability", "o2i"] and len(preds) == 32
    ds = ImageSetDataset(toy, "val")
    with torch.no_grad():
        p = torch.sigmoid(net(torch.stack([ds[i][0] for i in range(len(ds))]))).numpy()  # (32,)
    np.testing.assert_allclose(p, preds["probability"], atol=1e-5)
    assert ((preds["probability"] >= 0.5) == (preds["label"] == 1)).mean() == pytest.approx(summary["val_acc"][0])
    np.testing.assert_allclose(preds.loc[preds["label"] == 1, "o2i"], 36 / 1024, rtol=1e-6)


def _one_step(ds, batch_size: int, accumulate: int) -> dict:
    torch.manual_seed(0)
    net = create_bagnet(rf=9, width=0.0625)
    opt, _ = build_optimizer(net, BagNetTrainConfig(lr=1e-3))
    loader = make_loader(ds, np.arange(8), batch_size, seed=3)  # 8 balanced images: one permutation, any batch size
    train_epoch(net, loader, opt, accumulate, torch.device("cpu"))
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_gradient_accumulation_equals_the_large_batch(toy):
    ds = ImageSetDataset(toy, "train")
    labels = ds.split.labels[:8]
    assert labels.sum() == 4, labels  # balanced → a plain permutation, the same for every batch size
    big, small = _one_step(ds, 8, 1), _one_step(ds, 4, 2)
    changed = 0
    for k in big:
        torch.testing.assert_close(small[k], big[k], atol=1e-5, rtol=0)
    torch.manual_seed(0)
    init = create_bagnet(rf=9, width=0.0625).state_dict()
    changed = sum(not torch.equal(init[k], big[k]) for k in big)
    assert changed > len(big) // 2  # one optimizer step happened
    uneven = _one_step(ds, 3, 3)  # micro-batches 3 + 3 + 2, one step, weighted by images
    for k in big:
        torch.testing.assert_close(uneven[k], big[k], atol=1e-5, rtol=0)


def test_balanced_subset_and_unbalanced_sampler(tmp_path):
    labels = np.array([1] * 10 + [0] * 30, np.int8)
    idx = balanced_subset(labels, 12, seed=1)
    assert len(idx) == 12 and labels[idx].sum() == 6 and np.array_equal(idx, balanced_subset(labels, 12, seed=1))
    assert not np.array_equal(idx, balanced_subset(labels, 12, seed=2))
    with pytest.raises(OptionError, match="expected --max-train <= 20"):
        balanced_subset(labels, 24, seed=1)
    folder = toy_imageset(tmp_path / "unbalanced", n_train=40, positive_share=0.25)
    ds = ImageSetDataset(folder, "train")
    drawn = np.concatenate([ds.split.labels[rows.numpy()] for e in range(20) for _, _, rows in make_loader(ds, np.arange(40), 40, seed=e)])
    assert ds.split.labels.mean() == 0.25 and 0.4 < drawn.mean() < 0.6  # the sampler balances the classes


def _strip(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=["train_images_per_s", "seconds"])


@pytest.mark.parametrize("norm", ["in_aff", "bn"])
def test_resume_after_a_kill_ends_identical_to_a_straight_run(toy, tmp_path, norm):
    cfg = BagNetTrainConfig(epochs=4, max_train=32, norm=norm, **TINY)
    run_bagnet(toy, tmp_path / "straight", cfg, device="cpu")

    class Killed(Exception):
        pass

    def kill_after_two(row):
        if row["epoch"] == 2:
            raise Killed

    with pytest.raises(Killed):
        run_bagnet(toy, tmp_path / "resumed", cfg, device="cpu", on_epoch=kill_after_two)
    assert (tmp_path / "resumed" / "last.pt").exists() and not (tmp_path / "resumed" / "summary.csv").exists()
    assert len(pd.read_csv(tmp_path / "resumed" / "metrics.csv")) == 2
    starts = []
    run_bagnet(toy, tmp_path / "resumed", cfg, device="cpu", on_epoch=lambda r: starts.append(r["resumed_from"]))
    assert starts == [2, 2]  # epochs 3 and 4 only
    a, b = (pd.read_csv(tmp_path / d / "metrics.csv") for d in ("straight", "resumed"))
    pd.testing.assert_frame_equal(_strip(a), _strip(b))
    sa, sb = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("straight", "resumed"))
    assert sa["best_epoch"] == sb["best_epoch"]
    for k in sa["state_dict"]:
        assert torch.equal(sa["state_dict"][k], sb["state_dict"][k]), k
    pd.testing.assert_frame_equal(*(pd.read_csv(tmp_path / d / "predictions.csv") for d in ("straight", "resumed")))
    assert not (tmp_path / "resumed" / "last.pt").exists()


def test_rerun_skips_and_other_settings_are_refused(toy, tmp_path):
    cfg = BagNetTrainConfig(epochs=1, max_train=16, **TINY)
    run_bagnet(toy, tmp_path / "run", cfg, device="cpu")
    stamp = (tmp_path / "run" / "checkpoint.pt").stat().st_mtime_ns
    again = run_bagnet(toy, tmp_path / "run", cfg, device="cpu", workers=0)
    assert again.attrs.get("skipped") and (tmp_path / "run" / "checkpoint.pt").stat().st_mtime_ns == stamp
    other = BagNetTrainConfig(epochs=1, max_train=16, **{**TINY, "seed": 1})
    with pytest.raises(SettingsMismatchError, match="'train'"):
        run_bagnet(toy, tmp_path / "run", other, device="cpu")
    run_bagnet(toy, tmp_path / "run", other, device="cpu", overwrite=True)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["seed"] == 1
    r = invoke_mil(
        "train",
        "bagnet",
        toy,
        "--out",
        tmp_path / "run",
        "--rf",
        9,
        "--width",
        0.0625,
        "--epochs",
        1,
        "--batch-size",
        16,
        "--lr",
        1e-3,
        "--max-train",
        16,
        "--seed",
        1,
        "--device",
        "cpu",
        "--no-progress",
    )
    assert r.returncode == 0 and "already trained" in r.stdout, r.stderr
    r = invoke_mil(
        "train", "bagnet", toy, "--out", tmp_path / "run", "--rf", 33, "--width", 0.0625, "--epochs", 1, "--device", "cpu", "--no-progress"
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--overwrite" in r.stderr


def test_overwrite_that_fails_keeps_the_old_run(toy, tmp_path):
    """--overwrite trains beside the old run: one that stops in its first epoch leaves the old run as it was."""
    run_bagnet(toy, tmp_path / "runs" / "r", BagNetTrainConfig(epochs=1, max_train=16, **TINY), device="cpu")
    before = {p.name: p.read_bytes() for p in (tmp_path / "runs" / "r").iterdir()}

    def stop(row):
        raise RuntimeError("stopped")

    other = BagNetTrainConfig(epochs=2, max_train=16, **{**TINY, "seed": 1})
    with pytest.raises(RuntimeError, match="stopped"):
        run_bagnet(toy, tmp_path / "runs" / "r", other, device="cpu", overwrite=True, on_epoch=stop)
    assert {p.name: p.read_bytes() for p in (tmp_path / "runs" / "r").iterdir()} == before
    assert os.listdir(tmp_path / "runs") == ["r"]  # no temporary folder left


def test_norm_option_builds_batchnorm_and_is_recorded(toy, tmp_path):
    r = invoke_mil(
        "train",
        "bagnet",
        toy,
        "--out",
        tmp_path / "run",
        "--rf",
        9,
        "--width",
        0.0625,
        "--epochs",
        1,
        "--batch-size",
        16,
        "--max-train",
        16,
        "--norm",
        "bn",
        "--device",
        "cpu",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "run" / "config.json").read_text())
    assert doc["train"]["norm"] == "bn" and doc["bagnet"]["norm"] == "bn"
    net, _ = load_bagnet(tmp_path / "run" / "checkpoint.pt")
    kinds = {type(m).__name__ for m in net.modules()}
    assert "BatchNorm2d" in kinds and "InstanceNorm2d" not in kinds
    net.eval()
    x = torch.rand(3, 1, 32, 32)  # (B, 1, H, W)
    assert torch.isfinite(net(x)).all() and torch.allclose(net(x[:1]), net(x)[:1], atol=1e-5)  # eval mode: running statistics, per-image


def test_the_test_split_is_never_read(toy, tmp_path):
    data = tmp_path / "set"
    shutil.copytree(toy, data)
    (data / "test.h5").write_bytes(b"corrupt: training must not open this file")
    r = invoke_mil(
        "train",
        "bagnet",
        data,
        "--out",
        tmp_path / "run",
        "--rf",
        9,
        "--width",
        0.0625,
        "--epochs",
        1,
        "--batch-size",
        16,
        "--max-train",
        16,
        "--seed",
        0,
        "--device",
        "cpu",
    )
    assert r.returncode == 0, r.stderr
    assert "images/s" in r.stdout and (tmp_path / "run" / "summary.csv").exists()
    assert "epoch" in r.stderr and "val acc" in r.stderr  # the progress bar
    (data / "test.h5").unlink()
    assert run_bagnet(data, tmp_path / "run2", BagNetTrainConfig(epochs=1, max_train=16, **TINY), device="cpu")["epochs"][0] == 1


@pytest.mark.parametrize(
    "setup, args, needle",
    [
        ("empty", [], "imageset.json"),
        ("no_val", [], "val.h5"),
        ("ok", ["--accumulate", "0"], "--accumulate >= 1"),
        ("ok", ["--rf", "5"], "rf"),
        ("ok", ["--max-train", "1000"], "--max-train <="),
        ("ok", ["--pooling", "median"], "pooling"),
        ("ok", ["--norm", "layer"], "norm"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(toy, tmp_path, setup, args, needle):
    data = tmp_path / "set"
    data.mkdir()
    if setup != "empty":
        shutil.copytree(toy, data, dirs_exist_ok=True)
    if setup == "no_val":
        (data / "val.h5").unlink()
    r = invoke_mil("train", "bagnet", data, "--out", tmp_path / "run", "--device", "cpu", "--no-progress", "--width", "0.0625", *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()  # nothing half-written
