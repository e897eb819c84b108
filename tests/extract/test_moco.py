"""MoCo v2 pretraining (`mil extract moco`): the method on toy tensors, augmentation, the training
run on tiny synthetic slides (outputs, reruns, resume, export), two processes with torchrun, CLI errors.

Small and fast: timm's `test_resnet` (0.37 M parameters, 96-d) on 32-px tiles at 1 µm/px.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import subprocess
import sys
import textwrap
import warnings

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import typer
from torch import nn

from mil.errors import MilError, OptionError, SettingsMismatchError
from mil.extract.moco.augment import Augment
from mil.extract.moco.builder import MoCo
from mil.extract.moco.cli import moco as moco_command
from mil.extract.moco.data import MocoTiles, sample_tiles
from mil.extract.moco.train import MocoConfig, build_moco, cosine_lr, run_moco
from mil.extract.wsi.grid import GridSpec
from mil.extract.wsi.tiles import TilingConfig
from mil.manifest import read_manifest

TILING = TilingConfig(grid=GridSpec(target_mpp=1.0, tile_size=32))
FAST = dict(arch="test_resnet", epochs=2, batch_size=16, queue=48, steps_per_epoch=3, tiling=TILING)
CLI_FAST = (
    "--arch test_resnet --target-mpp 1.0 --tile-size 32 --batch-size 16 --queue 48 --steps-per-epoch 3 "
    "--workers 0 --device cpu --precision fp32 --no-progress"
).split()


class Toy(nn.Module):
    """A backbone without BatchNorm: flatten + linear, `(N, 3, 4, 4)` → `(N, 8)`, classifier slot `fc`."""

    num_features = 8

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(48, 8)
        self.fc = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x.flatten(1)))  # (N, 8) or (N, dim) with the head


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these tiny models gain nothing from two, and lose much on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Two synthetic 2048² slides (one with a lesion): about 100 tissue tiles of 32 px each."""
    from mil.extract.generate.synthetic import make_cohort

    return make_cohort(tmp_path_factory.mktemp("moco_cohort"), n_slides=2, size=2048, seed=0)


@pytest.fixture(scope="module")
def slides(cohort):
    return read_manifest(cohort)


# ---- the method on toy tensors -------------------------------------------------------------------


def test_head_is_put_in_the_classifier_slot_and_the_key_encoder_is_a_frozen_copy():
    torch.manual_seed(0)
    model = MoCo(Toy(), dim=4, K=6)
    assert model.head_name == "fc" and isinstance(model.encoder_q.fc, nn.Sequential)
    assert [tuple(p.shape) for p in model.encoder_q.fc.parameters()] == [(8, 8), (8,), (4, 8), (4,)]
    for (n, p), (n_k, p_k) in zip(model.encoder_q.named_parameters(), model.encoder_k.named_parameters()):
        assert n == n_k and torch.equal(p, p_k) and p.requires_grad and not p_k.requires_grad
    assert model.queue.shape == (4, 6) and torch.allclose(model.queue.norm(dim=0), torch.ones(6))
    assert set(model.backbone_state_dict()) == {"body.weight", "body.bias"}


@pytest.mark.parametrize("arch, slot, size", [("test_vit", "head", 160), ("test_convnext", "head.fc", 64)])
def test_other_timm_families_take_the_head_in_their_classifier_slot_and_export(tmp_path, arch, slot, size):
    from mil.extract.wsi.encoders import create_encoder

    model, prep = build_moco(MocoConfig(arch=arch, batch_size=4, queue=8))
    assert model.head_name == slot
    logits, _ = model(torch.rand(4, 3, size, size), torch.rand(4, 3, size, size))
    assert logits.shape == (4, 9)
    torch.save(model.backbone_state_dict(), tmp_path / "encoder.pt")
    assert create_encoder(arch, weights=str(tmp_path / "encoder.pt"), precision="fp32").feature_dim == prep["feature_dim"]


def test_momentum_update():
    torch.manual_seed(0)
    model = MoCo(Toy(), dim=4, K=6, m=0.9)
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    q = [p.clone() for p in model.encoder_q.parameters()]
    k = [p.clone() for p in model.encoder_k.parameters()]
    model._momentum_update_key_encoder()
    for p_q, p_k0, p_k in zip(q, k, model.encoder_k.parameters()):
        assert torch.allclose(p_k, 0.9 * p_k0 + 0.1 * p_q)
    assert all(torch.equal(a, b) for a, b in zip(q, model.encoder_q.parameters()))  # the query side is untouched


def test_queue_dequeue_and_enqueue_wraps_around():
    model = MoCo(Toy(), dim=2, K=5)
    keys = torch.arange(16, dtype=torch.float32).view(8, 2)  # (8, 2)
    model._dequeue_and_enqueue(keys[:3])
    assert torch.equal(model.queue[:, :3], keys[:3].T) and int(model.queue_ptr) == 3
    model._dequeue_and_enqueue(keys[3:6])  # columns 3, 4, then 0
    assert torch.equal(model.queue, torch.cat([keys[5:6], keys[1:5]]).T) and int(model.queue_ptr) == 1
    with pytest.raises(ValueError, match="at most K=5"):
        model._dequeue_and_enqueue(keys[:6])


def test_logits_and_loss_equal_a_hand_computed_infonce():
    torch.manual_seed(0)
    model = MoCo(Toy(), dim=4, K=6, T=0.2)
    before = copy.deepcopy(model)
    im_q, im_k = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    logits, labels = model(im_q, im_k)
    assert logits.shape == (3, 7) and labels.tolist() == [0, 0, 0]

    with torch.no_grad():
        q = F.normalize(before.encoder_q(im_q), dim=1).double()  # (3, 4)
        k = F.normalize(before.encoder_k(im_k), dim=1).double()  # (3, 4); equal encoders: the momentum step changes nothing
    queue = before.queue.double()  # (4, 6)
    expected = []
    for i in range(3):
        pos = math.exp(float(q[i] @ k[i]) / 0.2)
        neg = sum(math.exp(float(q[i] @ queue[:, j]) / 0.2) for j in range(6))
        expected.append(-math.log(pos / (pos + neg)))
    assert F.cross_entropy(logits, labels).item() == pytest.approx(np.mean(expected), rel=1e-5)
    assert torch.allclose(model.queue[:, :3], k.T.float(), atol=1e-6) and int(model.queue_ptr) == 3  # keys enqueued
    assert torch.allclose(model.queue[:, 3:], before.queue[:, 3:])


def test_a_few_steps_reduce_the_loss_on_an_easy_set():
    torch.manual_seed(0)
    images = torch.rand(64, 3, 16, 16)  # 64 distinct noise images; a view = image + a little noise
    model, _ = build_moco(MocoConfig(arch="test_resnet", batch_size=16, queue=32, momentum=0.9, seed=0), bn_splits=2)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    losses = []
    for step in range(24):
        x = images[(step % 4) * 16 : (step % 4 + 1) * 16]  # (16, 3, 16, 16); the queue never holds this batch's keys
        logits, labels = model(x + 0.05 * torch.randn_like(x), x + 0.05 * torch.randn_like(x))
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = np.mean(losses[2:6]), np.mean(losses[-4:])  # after the queue holds real keys
    assert last < first - 0.5, losses


def test_cosine_schedule():
    assert cosine_lr(0.03, 0, 100) == 0.03 and cosine_lr(0.03, 50, 100) == pytest.approx(0.015)
    assert cosine_lr(0.03, 100, 100) == pytest.approx(0.0, abs=1e-12)


# ---- augmentation -------------------------------------------------------------------------------


def test_augment_shapes_range_and_per_tile_draws():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 32, 32)
    y = Augment()(x)
    assert y.shape == x.shape and y.dtype == torch.float32 and 0 <= y.min() and y.max() <= 1
    torch.manual_seed(1)
    same = Augment()(x[:1].expand(6, -1, -1, -1).contiguous())
    assert len({round(float(v.sum()), 4) for v in same}) == 6  # six different views of one tile


def test_augment_geometry_is_an_exact_flip_or_turn_when_the_crop_is_the_whole_tile():
    x = torch.rand(32, 3, 8, 8)
    y = Augment(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), p_jitter=0, p_gray=0, p_blur=0)(x)
    dihedral = [lambda t, k=k, f=f: torch.rot90(t.flip(-1) if f else t, k, (-2, -1)) for k in range(4) for f in (0, 1)]
    matched = [next(i for i, d in enumerate(dihedral) if torch.allclose(d(a), b, atol=1e-5)) for a, b in zip(x, y)]
    assert len(set(matched)) > 4  # all tiles matched one of the 8, and several different ones were drawn


def test_augment_grayscale_and_blur():
    x = torch.rand(4, 3, 32, 32)
    gray = Augment(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), dihedral=False, p_jitter=0, p_gray=1, p_blur=0)(x)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    blur = Augment(blur_sigma=(14.0, 14.0), p_blur=1)  # σ in px of a 224 px view: 2 px on these 32 px tiles
    assert blur.blur(x).std() < 0.3 * x.std()  # noise is smoothed
    flat = torch.full((2, 3, 32, 32), 0.3)
    assert torch.allclose(blur.blur(flat), flat, atol=1e-6)  # kernels sum to one


# ---- data ---------------------------------------------------------------------------------------


def test_tiles_per_slide_samples_n_coords_per_slide_seeded(tmp_path, slides):
    from mil.extract.moco.data import plan_tiling, tile_missing

    coords = tmp_path / "tiles"
    tile_missing(slides, plan_tiling(slides, coords, TILING), coords, TILING, progress=False)
    full = sample_tiles(slides, coords, None, seed=0)
    a, b, c = (sample_tiles(slides, coords, 10, seed=s) for s in (0, 0, 1))
    assert [len(s) for s in a] == [10, 10] and all(len(s) > 10 for s in full)
    assert all(np.array_equal(x.coords, y.coords) for x, y in zip(a, b))
    assert not all(np.array_equal(x.coords, y.coords) for x, y in zip(a, c))
    ds = MocoTiles(a)
    assert len(ds) == 20 and ds[0].shape == (32, 32, 3) and ds[15].dtype == np.uint8
    assert np.array_equal(ds[12], a[1][2])


# ---- training runs ------------------------------------------------------------------------------


def _cli_app() -> typer.Typer:
    """`moco` mounted as `mil extract` will mount it (a group, so the command name is needed)."""
    app = typer.Typer(pretty_exceptions_enable=False)
    app.command()(moco_command)
    app.callback()(lambda: None)
    return app


def invoke(*args) -> subprocess.CompletedProcess:
    """Run the command in-process as `mil.cli.main` does (`run_app`): a user mistake is one line and exit 2."""
    from mil.cli_runner import run_app

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("always")
        try:
            run_app(_cli_app(), ["moco", *map(str, args)])
            rc = 0
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 0
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


def test_cli_run_writes_every_output_and_the_encoder_loads_in_extract_features(tmp_path, cohort, slides):
    from mil.extract.wsi.encoders import create_encoder, sha256_file
    from mil.extract.wsi.features import FeatureConfig, run_features

    out = tmp_path / "enc"
    r = invoke(cohort, "--out", out, "--epochs", "2", "--seed", "3", *CLI_FAST)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "--encoder test_resnet" in r.stdout
    assert {p.name for p in out.iterdir()} == {"encoder.pt", "checkpoint.pt", "metrics.csv", "config.json", "tiles"}

    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics.columns) == ["epoch", "loss", "pretext_acc", "lr", "images_per_s", "seconds"]
    assert metrics["epoch"].tolist() == [1, 2] and (metrics["images_per_s"] > 0).all() and metrics["loss"].notna().all()
    assert metrics["lr"].iloc[0] > metrics["lr"].iloc[1] > 0  # cosine
    cfg = json.loads((out / "config.json").read_text())
    s = cfg["settings"]
    assert (s["arch"], s["batch_size"], s["queue"], s["momentum"], s["temperature"], s["lr"], s["seed"]) == (
        "test_resnet",
        16,
        48,
        0.999,
        0.2,
        0.03,
        3,
    )
    assert s["tiling"]["grid"]["tile_size"] == 32 and s["augmentation"]["p_gray"] == 0.2
    assert cfg["runtime"]["world_size"] == 1 and cfg["n_tiles"] > 16

    # checkpoint.pt: facebookresearch/moco's layout, loadable with weights_only=True
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["arch"] == "test_resnet" and "optimizer" in ckpt
    keys = set(ckpt["state_dict"])
    assert {
        "module.queue",
        "module.queue_ptr",
        "module.encoder_q.fc.0.weight",
        "module.encoder_q.fc.2.weight",
        "module.encoder_k.bn1.running_mean",
    } <= keys
    assert ckpt["state_dict"]["module.queue"].shape == (128, 48)

    # encoder.pt = the query encoder without its head; both files load in `extract features`
    state = torch.load(out / "encoder.pt", weights_only=True)
    assert not any(k.startswith("fc.") for k in state)
    assert all(torch.equal(v, ckpt["state_dict"][f"module.encoder_q.{k}"]) for k, v in state.items())
    tiles = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    a, b = (create_encoder("test_resnet", weights=str(out / w), precision="fp32", input_size=32) for w in ("encoder.pt", "checkpoint.pt"))
    assert a.weights_sha256 == sha256_file(out / "encoder.pt") and b.weights_sha256 == sha256_file(out / "checkpoint.pt")
    assert torch.equal(a.encode(tiles), b.encode(tiles))

    # the weights' sha256 is recorded in the feature files made with them
    enc = create_encoder("test_resnet", weights=str(out / "encoder.pt"), precision="fp32", input_size=32)
    run_features(
        slides.iloc[:1], tmp_path / "feats", enc, FeatureConfig(tiling=TILING, workers=0), coords_dir=out / "tiles", progress=False
    )
    with h5py.File(tmp_path / "feats" / f"{slides['slide_id'][0]}.h5") as f:
        assert f.attrs["encoder_weights_sha256"] == sha256_file(out / "encoder.pt")

    # rerun: same settings → nothing to do; other settings → refused; --overwrite → trained again
    stamp = (out / "encoder.pt").stat().st_mtime_ns
    r = invoke(cohort, "--out", out, "--epochs", "2", "--seed", "3", *CLI_FAST)
    assert r.returncode == 0 and "nothing to do" in r.stdout and (out / "encoder.pt").stat().st_mtime_ns == stamp
    r = invoke(cohort, "--out", out, "--epochs", "2", "--seed", "3", "--temperature", "0.1", *CLI_FAST)
    assert r.returncode == 2 and "temperature=0.2" in r.stderr and "--overwrite" in r.stderr and "Traceback" not in r.stderr
    r = invoke(cohort, "--out", out, "--epochs", "1", "--seed", "3", "--temperature", "0.1", "--overwrite", *CLI_FAST)
    assert r.returncode == 0, r.stderr
    assert pd.read_csv(out / "metrics.csv")["epoch"].tolist() == [1]


def test_resume_continues_exactly_where_the_run_stopped(tmp_path, slides, monkeypatch):
    import mil.extract.moco.train as moco_module

    config = MocoConfig(**FAST | {"epochs": 3})
    whole = run_moco(slides, tmp_path / "whole", config, workers=1, precision="fp32", progress=False, coords_dir=tmp_path / "tiles")
    assert whole.status == "trained" and whole.epochs_run == 3

    save = moco_module.save_checkpoint

    def crash_after_first_epoch(path, model, optimizer, epoch, *args):
        save(path, model, optimizer, epoch, *args)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(moco_module, "save_checkpoint", crash_after_first_epoch)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        run_moco(slides, out, config, workers=1, precision="fp32", progress=False, coords_dir=tmp_path / "tiles")
    monkeypatch.setattr(moco_module, "save_checkpoint", save)
    assert not (out / "encoder.pt").exists() and torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    with pytest.raises(OptionError, match="--resume"):
        run_moco(slides, out, config, workers=1, precision="fp32", progress=False, coords_dir=tmp_path / "tiles")

    resumed = run_moco(slides, out, config, workers=1, precision="fp32", progress=False, coords_dir=tmp_path / "tiles", resume=True)
    assert resumed.status == "resumed" and resumed.epochs_run == 2
    a, b = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True), torch.load(out / "checkpoint.pt", weights_only=True)
    for k, v in a["state_dict"].items():
        assert torch.allclose(v.float(), b["state_dict"][k].float(), atol=1e-6), k
    m_a, m_b = pd.read_csv(tmp_path / "whole" / "metrics.csv"), pd.read_csv(out / "metrics.csv")
    assert m_b["epoch"].tolist() == [1, 2, 3] and np.allclose(m_a["loss"], m_b["loss"], atol=1e-5)


def test_exported_encoder_gives_the_trained_backbones_features(tmp_path, slides):
    from mil.extract.wsi.encoders import create_encoder

    result = run_moco(slides, tmp_path / "o", MocoConfig(**FAST | {"epochs": 1}), workers=0, precision="fp32", progress=False)
    backbone = copy.deepcopy(result.model.encoder_q).eval()  # in memory, as trained
    backbone.fc = nn.Identity()  # without the projection head
    enc = create_encoder("test_resnet", weights=str(result.encoder_path), precision="fp32", input_size=32)
    tiles = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)  # (4, T, T, 3)
    with torch.no_grad():
        ref = backbone((tiles.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5)  # (4, 96); test_resnet: mean = std = 0.5
    assert torch.allclose(enc.encode(tiles), ref, atol=1e-5) and ref.std() > 0


def test_settings_mismatch_is_refused_before_any_work(tmp_path, slides):
    run_moco(slides, tmp_path / "o", MocoConfig(**FAST | {"epochs": 1}), workers=0, precision="fp32", progress=False)
    stamp = (tmp_path / "o" / "encoder.pt").stat().st_mtime_ns
    for change in ({"queue": 64}, {"tiles_per_slide": 20}, {"epochs": 2}):
        with pytest.raises(SettingsMismatchError, match=next(iter(change))):
            run_moco(slides, tmp_path / "o", MocoConfig(**FAST | {"epochs": 1} | change), workers=0, progress=False)
    assert run_moco(slides.iloc[::-1], tmp_path / "o2", MocoConfig(**FAST | {"epochs": 1}), workers=0, progress=False).status == "trained"
    with pytest.raises(SettingsMismatchError, match="slides_sha256"):  # another slide list
        run_moco(slides.iloc[:1], tmp_path / "o", MocoConfig(**FAST | {"epochs": 1}), workers=0, progress=False)
    assert (tmp_path / "o" / "encoder.pt").stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    "args, message",
    [
        (["--queue", "8"], "expected --queue >= --batch-size (16), got 8"),
        (["--momentum", "1.0"], "expected --momentum in [0, 1)"),
        (["--temperature", "0"], "expected --temperature > 0"),
        (["--tiles-per-slide", "0"], "expected --tiles-per-slide >= 1"),
        (["--epochs", "0"], "expected --epochs >= 1"),
        (["--bn-splits", "9"], "expected --bn-splits <= 8"),
        (["--precision", "fp16"], "expected --precision to be one of 'auto', 'fp32', 'bf16', got 'fp16' instead"),
        (["--arch", "resnet18x"], "did you mean"),
        (["--tile-size", "4"], "expected --tile-size of at least 8 px"),
    ],
)
def test_bad_options_exit_2_with_one_line(tmp_path, cohort, args, message):
    r = invoke(cohort, "--out", tmp_path / "o", *CLI_FAST, *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_bad_input_and_usage_errors_exit_2(tmp_path):
    r = invoke(tmp_path / "missing.csv", "--out", tmp_path / "o", *CLI_FAST)
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = invoke(tmp_path, "--out", tmp_path / "o", "--epochs", "many")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_too_few_tiles_for_one_batch(tmp_path, slides):
    with pytest.raises(MilError, match="expected at least --batch-size=64 tiles, got 20"):
        run_moco(
            slides, tmp_path / "o", MocoConfig(**FAST | {"batch_size": 64, "queue": 64, "tiles_per_slide": 10}), workers=0, progress=False
        )


# ---- which manifest splits are trained on ------------------------------------------------------


@pytest.fixture(scope="module")
def split_cohort(cohort, tmp_path_factory):
    """The two-slide cohort's manifest with its second slide moved to the test split."""
    table = read_manifest(cohort)[["slide_id", "path", "label", "split", "patient_id"]]
    table.loc[1, "split"] = "test"
    path = tmp_path_factory.mktemp("moco_splits") / "manifest.csv"
    table.to_csv(path, index=False)
    return path, table.loc[0, "slide_id"], table.loc[1, "slide_id"]


def test_default_leaves_the_test_split_out_of_pretraining(tmp_path, split_cohort):
    manifest, train_id, test_id = split_cohort
    out = tmp_path / "enc"
    r = invoke(manifest, "--out", out, "--epochs", "1", *CLI_FAST)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["n_slides"] == 1 and cfg["settings"]["splits"] == "all but test"
    assert cfg["slide_ids"] == [train_id]
    assert {p.stem for p in (out / "tiles").glob("*.h5")} == {train_id}  # the test slide was not even tiled
    assert "warning" not in r.stderr
    # other splits are other settings: refused on a rerun, like any other setting
    r = invoke(manifest, "--out", out, "--epochs", "1", "--splits", "train,val,test", *CLI_FAST)
    assert r.returncode == 2 and "splits='all but test'" in r.stderr and "--overwrite" in r.stderr, r.stderr


def test_splits_with_test_warn_that_evaluation_is_not_independent(tmp_path, split_cohort):
    manifest, train_id, test_id = split_cohort
    out = tmp_path / "enc"
    r = invoke(manifest, "--out", out, "--epochs", "1", "--splits", "train,val,test", *CLI_FAST)
    assert r.returncode == 0, r.stderr
    assert "warning: --splits includes test" in r.stderr and "not independent" in r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["settings"]["splits"] == ["train", "val", "test"] and sorted(cfg["slide_ids"]) == sorted([train_id, test_id])
    assert MocoConfig(splits="test, train,train").splits == ("train", "test")  # canonical order, as recorded


def test_slides_without_a_split_are_kept_by_default():
    from mil.extract.moco.data import select_splits

    table = pd.DataFrame({"slide_id": ["a", "b", "c", "d"], "split": ["train", "", "test", "val"]})
    assert select_splits(table, None)["slide_id"].tolist() == ["a", "b", "d"]
    assert select_splits(table, ("train",))["slide_id"].tolist() == ["a"]
    assert select_splits(table.drop(columns="split"), None)["slide_id"].tolist() == ["a", "b", "c", "d"]  # a folder of slides


@pytest.mark.parametrize(
    "value, message",
    [
        ("train,tset", "expected --splits to be a comma-separated list of train, val, test, got 'train,tset' instead"),
        ("", "expected --splits to be a comma-separated list of train, val, test, got '' instead"),
        ("val", "expected --splits val to select at least one slide, got none"),  # the cohort has no val slide
    ],
)
def test_bad_splits_exit_2_with_one_line_and_write_nothing(tmp_path, split_cohort, value, message):
    r = invoke(split_cohort[0], "--out", tmp_path / "o", "--splits", value, *CLI_FAST)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


# ---- two processes --------------------------------------------------------------------------------

DDP_SCRIPT = """
import sys, torch
import torch.distributed as dist
from mil.extract.wsi.grid import GridSpec
from mil.extract.moco.train import MocoConfig, run_moco
from mil.extract.wsi.tiles import TilingConfig
from mil.manifest import read_manifest

manifest, out, dump = sys.argv[1:4]
config = MocoConfig(arch="test_resnet", epochs=2, batch_size=16, queue=48, steps_per_epoch=3,
                    tiling=TilingConfig(grid=GridSpec(target_mpp=1.0, tile_size=32)))
dist.init_process_group("gloo")  # from torchrun's environment, as run_moco would; kept open for the check below
rank = dist.get_rank()
result = run_moco(read_manifest(manifest), out, config, workers=1, precision="fp32", progress=False)
x = torch.arange(8.0).view(4, 2) + 100 * rank  # (4, 2) different on each rank
shuffled, idx = result.model._batch_shuffle(x)
back = result.model._batch_unshuffle(shuffled, idx)
torch.save({"state": result.model.state_dict(), "unshuffled": back, "x": x, "shuffled": shuffled,
            "metrics": result.metrics.to_dict("list")}, f"{dump}/rank{rank}.pt")
dist.destroy_process_group()
"""


def test_two_processes_with_torchrun_agree(tmp_path, cohort):
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        str(script),
        str(cohort),
        str(tmp_path / "enc"),
        str(tmp_path),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    params = [k for k in r0["state"] if "running_" not in k and "num_batches" not in k]  # BN statistics are per process
    assert any(k.startswith("encoder_q.") for k in params) and "queue" in params
    for k in params:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    for k in ("epoch", "loss", "pretext_acc", "lr"):  # averaged over both processes
        assert r0["metrics"][k] == r1["metrics"][k]
    for r in (r0, r1):  # the shuffle of builder.py crosses processes and is undone exactly
        assert torch.equal(r["unshuffled"], r["x"])
    assert not torch.equal(torch.cat([r0["shuffled"], r1["shuffled"]]), torch.cat([r0["x"], r1["x"]]))
    ckpt = torch.load(tmp_path / "enc" / "checkpoint.pt", weights_only=True)
    assert torch.equal(ckpt["state_dict"]["module.queue"], r0["state"]["queue"])
    assert json.loads((tmp_path / "enc" / "config.json").read_text())["runtime"]["world_size"] == 2


def test_moco_is_mounted_on_the_mil_cli(tmp_path):
    """`mil extract moco` reaches the command through mil.cli (as torchrun -m mil.cli does)."""
    from tests.conftest import invoke_mil

    result = invoke_mil("extract", "moco", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "enc"))
    assert result.returncode == 2 and "missing.csv" in result.stderr + result.stdout
    assert not (tmp_path / "enc").exists()
