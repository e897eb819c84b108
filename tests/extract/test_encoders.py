"""Encoder registry, weight loading (state dicts, timm and MoCo checkpoints) and preprocessing, on CPU.

Weights are random (no network): checkpoints are built in the tests from seeded timm models.
"""

from __future__ import annotations

import argparse
import hashlib
import json

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from mil.errors import MilError, OptionError
from mil.extract.wsi import encoders
from mil.extract.wsi.encoders import create_encoder, list_encoders, load_weights, resolve_precision, sha256_file

pytestmark = pytest.mark.filterwarnings("ignore:.*random weights")
DIMS = {"resnet50_trunc": 1024, "resnet50": 2048, "resnet18": 512, "vit_small_patch16_224": 384}


def make(name: str = "resnet18", weights: str = "none", **kw) -> encoders.Encoder:
    """A small fp32 encoder (64 px inputs) for fast CPU tests."""
    return create_encoder(name, weights, kw.pop("precision", "fp32"), input_size=kw.pop("input_size", 64), **kw)


def tiles(n: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Random RGB tiles `(n, size, size, 3)` uint8."""
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def normalised(enc: encoders.Encoder, t: torch.Tensor) -> torch.Tensor:
    """The preprocessing `encode` should apply, written out: `(B, H, W, 3)` uint8 → `(B, 3, H, W)`."""
    mean, std = torch.tensor(enc.mean), torch.tensor(enc.std)
    return ((t.float() / 255 - mean) / std).permute(0, 3, 1, 2)


def layer3_pooled(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A full timm ResNet-50 run by hand up to layer3, then global average pool: `(B, 1024)`."""
    x = m.maxpool(m.act1(m.bn1(m.conv1(x))))
    return m.layer3(m.layer2(m.layer1(x))).mean((2, 3))


def seeded(arch: str, seed: int = 1, **kw) -> nn.Module:
    """A timm model with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    return timm.create_model(arch, **kw).eval()


def moco_checkpoint(backbone: nn.Module, prefix: str = "module.") -> dict:
    """A MoCo v2 checkpoint laid out as facebookresearch/moco's main_moco.py saves it."""
    q = {f"{prefix}encoder_q.{k}": v for k, v in backbone.state_dict().items()}
    k = {f"{prefix}encoder_k.{k}": v + 1 for k, v in backbone.state_dict().items()}
    d = backbone.num_features
    head = {"fc.0.weight": (d, d), "fc.0.bias": (d,), "fc.2.weight": (128, d), "fc.2.bias": (128,)}  # MLP 2-layer head
    head = {f"{prefix}encoder_q.{k}": torch.randn(shape) for k, shape in head.items()}
    queue = {f"{prefix}queue": torch.randn(128, 16), f"{prefix}queue_ptr": torch.zeros(1, dtype=torch.long)}
    optimizer = {"state": {}, "param_groups": [{"lr": 0.03, "momentum": 0.9, "weight_decay": 1e-4, "params": [0, 1]}]}
    return {"epoch": 200, "arch": "resnet50", "state_dict": q | head | k | queue, "optimizer": optimizer}


@pytest.mark.parametrize("name", list_encoders())
def test_every_encoder_gives_finite_features_reproducible_by_seed(name):
    a, b, c = make(name), make(name), make(name, seed=1)
    za = a.encode(tiles())  # (2, D)
    assert za.shape == (2, DIMS[name]) == (2, a.feature_dim) and za.dtype == torch.float32 and za.isfinite().all()
    assert torch.equal(za, b.encode(tiles()))
    assert not torch.allclose(za, c.encode(tiles()))
    assert not a.model.training and a.seed == 0 and a.weights_sha256 == "none"


def test_resnet50_trunc_is_layer3_of_resnet50_avg_pooled():
    enc = make("resnet50_trunc")
    assert isinstance(enc.model.layer4, nn.Identity)
    assert not any(k.startswith("layer4.") for k in enc.model.state_dict())
    full = seeded("resnet50", num_classes=0)
    full.load_state_dict(enc.model.state_dict(), strict=False)  # layer4 keeps its random weights, unused here
    x = normalised(enc, tiles())
    with torch.inference_mode():
        torch.testing.assert_close(enc(x), layer3_pooled(full, x), rtol=1e-5, atol=1e-5)


def test_encode_normalises_and_resizes_tiles_like_the_written_out_recipe():
    enc = make(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    assert enc.describe()["mean"] == [0.5, 0.4, 0.3] and enc.input_size == 64
    with torch.inference_mode():
        torch.testing.assert_close(enc.encode(tiles(size=64)), enc(normalised(enc, tiles(size=64))))
        resized = F.interpolate(normalised(enc, tiles(size=80)), size=(64, 64), mode="bilinear", antialias=True)
        torch.testing.assert_close(enc.encode(tiles(size=80)), enc(resized))
    with pytest.raises(ValueError, match="uint8"):
        enc.encode(tiles().float())


WRAPS = ["plain", "state_dict", "model", "state_dict_ema", "module.", "_orig_mod.", "module._orig_mod."]


@pytest.mark.parametrize("wrap", WRAPS)
def test_state_dict_checkpoints_load_and_reproduce_features(tmp_path, wrap):
    src = make(seed=7)
    sd = src.model.state_dict()
    if wrap.endswith("."):
        sd = {wrap + k: v for k, v in sd.items()}
    path = tmp_path / "w.pth"
    torch.save(sd if wrap.endswith(".") or wrap == "plain" else {wrap: sd, "epoch": 3, "arch": "resnet18"}, path)
    enc = make(weights=str(path))
    assert torch.equal(enc.encode(tiles()), src.encode(tiles()))
    assert enc.weights == str(path) and enc.weights_sha256 == sha256_file(path)


def test_classifier_head_is_ignored_and_features_match_the_source_model(tmp_path):
    src = seeded("resnet18")  # with its 1000-class fc
    torch.save(src.state_dict(), tmp_path / "full.pth")
    model = make().model
    report = load_weights(model, tmp_path / "full.pth")
    assert sorted(report.ignored) == ["fc.bias", "fc.weight"] and report.missing == report.unexpected == []
    enc = make(weights=str(tmp_path / "full.pth"))
    x = normalised(enc, tiles())
    with torch.inference_mode():
        expected = src.forward_head(src.forward_features(x), pre_logits=True)  # (2, 512) pooled, before fc
        torch.testing.assert_close(enc(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prefix", ["module.", ""])
def test_moco_checkpoint_loads_the_query_backbone_without_its_head(tmp_path, prefix):
    backbone = seeded("resnet18", num_classes=0)
    torch.save(moco_checkpoint(backbone, prefix), tmp_path / "moco.pth.tar")
    report = load_weights(make().model, tmp_path / "moco.pth.tar")
    dropped = {"encoder_q.fc.0.weight", "encoder_q.fc.2.bias", "queue", "queue_ptr", "encoder_k.conv1.weight"}
    assert dropped <= set(report.ignored)
    enc = make(weights=str(tmp_path / "moco.pth.tar"))
    x = normalised(enc, tiles())
    with torch.inference_mode():
        torch.testing.assert_close(enc(x), backbone(x), rtol=1e-4, atol=1e-5)


def test_resnet50_trunc_loads_a_full_resnet50_moco_checkpoint(tmp_path):
    backbone = seeded("resnet50", num_classes=0)
    torch.save(moco_checkpoint(backbone), tmp_path / "moco50.pth.tar")
    enc = make("resnet50_trunc", weights=str(tmp_path / "moco50.pth.tar"))
    report = load_weights(enc.model, tmp_path / "moco50.pth.tar", removed_prefixes=("layer4.",))
    assert "layer4.0.conv1.weight" in report.ignored and not report.unexpected
    x = normalised(enc, tiles())
    with torch.inference_mode():
        torch.testing.assert_close(enc(x), layer3_pooled(backbone, x), rtol=1e-4, atol=1e-5)


def test_checkpoint_of_another_architecture_is_refused_naming_file_and_keys(tmp_path):
    torch.save(make().model.state_dict(), tmp_path / "r18.pth")
    with pytest.raises(MilError, match=r"r18\.pth.*missing keys.*layer1\.0\.conv3\.weight.*different arch") as e:
        make("resnet50", weights=str(tmp_path / "r18.pth"))
    assert "\n" not in str(e.value)


def test_checkpoint_with_wrong_shapes_is_refused(tmp_path):
    sd = make().model.state_dict()
    sd["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(MilError, match=r"bad\.pth.*1 shape mismatches.*conv1\.weight"):
        make(weights=str(tmp_path / "bad.pth"))


def test_unreadable_files_are_refused_naming_the_file(tmp_path):
    (tmp_path / "noise.pth").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(MilError, match=r"noise\.pth.*cannot read"):
        load_weights(make().model, tmp_path / "noise.pth")
    torch.save({"state_dict": make().model.state_dict(), "args": argparse.Namespace(lr=0.1)}, tmp_path / "pickled.pth")
    with pytest.raises(MilError, match=r"pickled\.pth.*argparse\.Namespace"):
        make(weights=str(tmp_path / "pickled.pth"))
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "nostate.pth")
    with pytest.raises(MilError, match=r"nostate\.pth.*state dict"):
        make(weights=str(tmp_path / "nostate.pth"))
    with pytest.raises(MilError, match=r"missing\.pth"):
        make(weights=str(tmp_path / "missing.pth"))
    with pytest.raises(MilError, match=r"missing\.pth.*does not exist"):
        load_weights(make().model, tmp_path / "missing.pth")


def test_random_weights_warn():
    with pytest.warns(UserWarning, match="random weights"):
        make()


def test_imagenet_without_network_or_cache_is_one_line_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    for var in ("HF_HOME", "TORCH_HOME", "HF_HUB_CACHE"):
        monkeypatch.setenv(var, str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)  # huggingface_hub reads its environment once, at import
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(MilError, match=r"resnet18.*no cached copy.*--weights PATH") as e:
        create_encoder("resnet18", weights="imagenet")
    assert "\n" not in str(e.value)


def test_bad_names_and_options_are_option_errors():
    with pytest.raises(OptionError, match=r"expected --encoder to be one of resnet18, .* got 'resnet5' instead"):
        create_encoder("resnet5")
    with pytest.raises(OptionError, match="--precision"):
        create_encoder("resnet18", precision="fp8")
    with pytest.raises(OptionError, match="--weights"):
        create_encoder("resnet18", weights="imagenett")


def test_any_timm_model_passes_through():
    enc = make("resnet10t", input_size=32)
    assert enc.encode(tiles(size=32)).shape == (2, 512) and enc.name == "resnet10t"


def test_bf16_features_agree_with_fp32():
    fp32, bf16 = make(precision="fp32"), make(precision="bf16")
    a, b = fp32.encode(tiles(4)), bf16.encode(tiles(4))  # (4, 512) each
    assert b.dtype == torch.float32 and bf16.describe()["precision"] == "bf16"
    assert F.cosine_similarity(a, b).min() >= 0.99


def test_compiled_encoder_pads_a_smaller_batch_and_compiles_once(monkeypatch):
    """A slide's last, smaller batch is padded to the first batch's size: one compiled graph for
    every slide, the same features as the eager encoder, and no compiled submodule in the state dict."""
    calls = []

    def fake_compile(model, device):  # what torch.compile(dynamic=False) would see: every input shape
        return lambda x: calls.append(tuple(x.shape)) or model(x)

    monkeypatch.setattr(encoders, "compile_model", fake_compile)
    enc, eager = make(compile=True), make()
    t = tiles(7)
    z = torch.cat([enc.encode(t[:4]), enc.encode(t[4:])])  # (7, 512): batches of 4 and 3
    assert calls == [(4, 3, 64, 64), (4, 3, 64, 64)] and enc.compile_seconds is not None
    torch.testing.assert_close(z, eager.encode(t), rtol=1e-4, atol=1e-4)
    assert list(enc.state_dict()) == list(eager.state_dict())


@pytest.mark.slow
def test_torch_compile_matches_eager():
    """The real torch.compile (inductor, freezing on a CPU): same features as eager, on timm's tiny test_resnet."""
    enc, eager = create_encoder("test_resnet", precision="fp32", compile=True), create_encoder("test_resnet", precision="fp32")
    t = tiles(3, size=enc.input_size)
    torch.testing.assert_close(torch.cat([enc.encode(t[:2]), enc.encode(t[2:])]), eager.encode(t), rtol=1e-3, atol=1e-3)


def test_resolve_precision(monkeypatch):
    assert [resolve_precision(p, "cpu") for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(encoders, "_cpu_has_native_bf16", lambda native=native: native)
        assert resolve_precision("auto", "cpu") == resolve_precision("auto", torch.device("cpu")) == expected
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision("auto", "cuda") == "fp32"
    with pytest.raises(OptionError, match="expected --precision to be auto, fp32, bf16 or fp16, got 'half' instead"):
        resolve_precision("half", "cpu")


def test_sha256_and_describe(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"needle" * 100_000)
    assert sha256_file(tmp_path / "f.bin") == hashlib.sha256(b"needle" * 100_000).hexdigest()
    d = make("resnet50_trunc").describe()
    assert json.loads(json.dumps(d)) == d  # survives the HDF5-attr / config round trip unchanged
    assert d["name"] == "resnet50_trunc" and d["feature_dim"] == 1024 and d["weights"] == "none"
