"""Pathology foundation models and hf-hub encoders (mil.extract.wsi.hub), offline and on CPU.

No weights are downloaded and no full-size ViT-g is materialised: each registered architecture is
built with random weights and the same layer layout at tiny sizes (`entry.tiny`), and full sizes
only on the meta device (shapes without memory). A Hugging Face cache is laid out by hand in tmp.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import timm
import torch
from safetensors.torch import save_file

from mil.errors import MilError, OptionError
from mil.extract.wsi import hub
from mil.extract.wsi.encoders import create_encoder, list_encoders, sha256_file
from mil.extract.wsi.hub import ENTRIES, create_hub_encoder, find_entry, resolve_hub_precision
from tests.conftest import invoke_mil

pytestmark = pytest.mark.filterwarnings("ignore:.*random weights")
TIMM = [n for n, e in ENTRIES.items() if e.backend == "timm"]
PARAMS_M = {"uni": 303, "uni2-h": 681, "virchow": 632, "virchow2": 632, "h-optimus-0": 1100, "h-optimus-1": 1100, "prov-gigapath": 1100}


def tiny(name: str, weights: str = "none", seed: int = 0, **kw):
    """A registered model at tiny size (same layers), fp32 on CPU."""
    return create_hub_encoder(name, weights, kw.pop("precision", "fp32"), overrides=ENTRIES[name].tiny, seed=seed, **kw)


def tiles(n: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Random RGB tiles `(n, size, size, 3)` uint8."""
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def normalised(t: torch.Tensor, mean, std, size: int = 224) -> torch.Tensor:
    """The preprocessing written out: uint8 `(B, H, W, 3)` → `(B, 3, size, size)` float."""
    x = ((t.float() / 255 - torch.tensor(mean)) / torch.tensor(std)).permute(0, 3, 1, 2)
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)


def fake_cache(root, repo: str, files: dict[str, bytes], commit: str = "c0ffee" * 6 + "abcd") -> None:
    """Lay out `files` in a Hugging Face hub cache at `root` as `hf download` does (blobs named by sha256)."""
    import hashlib

    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "blobs").mkdir()
    for name, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (folder / "snapshots" / commit / name).symlink_to(blob)


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """An empty Hugging Face home (HF_HOME) in tmp, offline; returns its hub cache folder."""
    import huggingface_hub.constants as hf

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)  # huggingface_hub reads its environment once, at import
    (tmp_path / "hf" / "hub").mkdir(parents=True)
    return tmp_path / "hf" / "hub"


@pytest.mark.parametrize("name", TIMM)
def test_each_timm_entry_gives_its_output_rule_at_tiny_and_full_size(name):
    e = ENTRIES[name]
    enc = tiny(name)
    width = e.tiny["embed_dim"] * (2 if e.output == "cls+mean" else 1)
    z = enc.encode(tiles())  # (2, D)
    assert z.shape == (2, width) == (2, enc.feature_dim) and z.isfinite().all()
    with torch.device("meta"):  # full size: shapes only, no memory
        full = hub.build_model(e)
    assert full(torch.empty(1, 3, e.input_size, e.input_size, device="meta")).shape == (1, e.dim)
    assert abs(sum(p.numel() for p in full.parameters()) / 1e6 / PARAMS_M[name] - 1) < 0.05  # published size
    d = enc.describe()
    assert d["source"] == f"hf-hub:{e.repo}" and d["output"] == hub.OUTPUTS[e.output] and d["reference_precision"] == e.precision
    assert (d["name"], d["input_size"], d["mean"], d["std"]) == (name, e.input_size, list(e.mean), list(e.std))


def test_virchow2_is_class_token_and_mean_of_patch_tokens_without_registers():
    enc = tiny("virchow2")
    model = enc.model
    assert model.num_prefix_tokens == 5  # class token + 4 registers
    x = normalised(tiles(), *hub.IMAGENET)
    with torch.inference_mode():
        tokens = model.forward_features(x)  # (2, 5 + 256, 96)
        expected = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1)  # the model card's recipe
        torch.testing.assert_close(enc(x), expected)
        torch.testing.assert_close(enc.encode(tiles()), expected, rtol=1e-4, atol=1e-5)


def test_h_optimus_preprocessing_uses_its_own_mean_and_std():
    enc = tiny("h-optimus-0")
    assert (enc.mean, enc.std) == hub.BIOPTIMUS and enc.input_size == 224
    with torch.inference_mode():
        z = enc.encode(tiles())
        torch.testing.assert_close(z, enc(normalised(tiles(), *hub.BIOPTIMUS)), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(z, enc(normalised(tiles(), *hub.IMAGENET)), atol=1e-3)


@pytest.mark.parametrize(("name", "suffix"), [("virchow2", ".bin"), ("uni2-h", ".safetensors"), ("prov-gigapath", ".pth")])
def test_saved_state_dict_round_trips_through_weights(tmp_path, name, suffix):
    src = tiny(name, seed=7)
    path = tmp_path / f"w{suffix}"
    sd = {k: v.contiguous() for k, v in src.model.state_dict().items()}
    save_file(sd, path) if suffix == ".safetensors" else torch.save(sd, path)
    enc = create_hub_encoder(name, str(path), "fp32", overrides=ENTRIES[name].tiny)  # seed 0: other random init
    assert torch.equal(enc.encode(tiles()), src.encode(tiles()))
    assert enc.weights == str(path) and enc.weights_sha256 == sha256_file(path)


def test_uni_layout_checkpoint_with_layerscale_loads(tmp_path):
    torch.manual_seed(3)  # built as UNI's model card does, independently of the registry
    ref = timm.create_model("vit_large_patch16_224", init_values=1e-5, dynamic_img_size=True, num_classes=0, **ENTRIES["uni"].tiny).eval()
    assert "blocks.0.ls1.gamma" in ref.state_dict() and "blocks.0.ls2.gamma" in ref.state_dict()
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    enc = tiny("uni", str(tmp_path / "pytorch_model.bin"))
    x = normalised(tiles(), *hub.IMAGENET)
    with torch.inference_mode():
        torch.testing.assert_close(enc(x), ref(x))
    with pytest.raises(MilError, match=r"pytorch_model\.bin.*(missing|unexpected) keys.*--encoder") as e:
        tiny("virchow2", str(tmp_path / "pytorch_model.bin"))
    assert "\n" not in str(e.value)


def test_missing_cache_entry_offline_is_one_line_naming_the_repo_quickly(hf_home):
    start = time.monotonic()
    with pytest.raises(MilError) as e:
        create_encoder("virchow2", weights="imagenet")  # the CLI's default: for hub models, their own weights
    assert time.monotonic() - start < 5
    msg = str(e.value)
    assert "\n" not in msg and "hf-hub:paige-ai/Virchow2" in msg and str(hf_home) in msg and "HF_HUB_OFFLINE" in msg
    assert "https://huggingface.co/paige-ai/Virchow2" in msg and "huggingface-cli login" in msg and "--weights PATH" in msg


def test_online_download_failure_is_one_line_and_a_missing_file_tries_the_next(hf_home, monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants as hf
    from huggingface_hub.errors import EntryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", False)
    asked = []

    def download(repo, filename, **kw):  # stands in for the hub: no network in tests
        asked.append(filename)
        if filename == "model.safetensors":
            raise EntryNotFoundError("404")
        raise OSError("401 Client Error: access to model paige-ai/Virchow2 is restricted\nmore lines")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    with pytest.raises(MilError, match=r"pytorch_model\.bin of hf-hub:paige-ai/Virchow2 .*\(OSError\); the model may be gated") as e:
        create_encoder("virchow2", weights="imagenet")
    assert asked == ["model.safetensors", "pytorch_model.bin"] and "\n" not in str(e.value)


def test_unreadable_safetensors_is_one_line(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MilError, match=r"expected a safetensors file, got .*w\.safetensors"):
        tiny("uni", str(tmp_path / "w.safetensors"))


@pytest.mark.parametrize(("name", "cached_as"), [("hf-hub:paige-ai/Virchow2", "paige-ai/Virchow2"), ("uni", "MahmoodLab/uni")])
def test_weights_come_from_the_hf_cache_under_hf_home(hf_home, tmp_path, name, cached_as):
    e = find_entry(name)
    src = tiny(e.name, seed=5)
    path = tmp_path / e.files[0]
    sd = {k: v.contiguous() for k, v in src.model.state_dict().items()}
    save_file(sd, path) if path.suffix == ".safetensors" else torch.save(sd, path)
    fake_cache(hf_home, cached_as, {e.files[0]: path.read_bytes()})  # UNI: a timm user's lower-case spelling
    enc = create_hub_encoder(name, "imagenet", "fp32", overrides=e.tiny)
    assert torch.equal(enc.encode(tiles()), src.encode(tiles()))
    assert enc.weights.startswith(f"hf-hub:{e.repo}@") and enc.weights.endswith(e.files[0])
    assert enc.weights_sha256 == sha256_file(path) and enc.name == e.name


def test_unregistered_hf_hub_timm_model_is_built_from_its_cached_config(hf_home, tmp_path):
    args = dict(depth=1, embed_dim=96, num_heads=2)
    torch.manual_seed(0)
    ref = timm.create_model("vit_small_patch16_224", num_classes=0, **args).eval()
    path = tmp_path / "model.safetensors"
    save_file(ref.state_dict(), path)
    cfg = {"architecture": "vit_small_patch16_224", "model_args": args, "pretrained_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    fake_cache(hf_home, "someone/tiny-vit", {"config.json": hub.json.dumps(cfg).encode(), "model.safetensors": path.read_bytes()})
    enc = create_encoder("hf-hub:someone/tiny-vit", precision="fp32")
    assert enc.mean == (0.5,) * 3 and enc.describe()["source"] == "hf-hub:someone/tiny-vit"
    with torch.inference_mode():
        torch.testing.assert_close(enc.encode(tiles()), ref(normalised(tiles(), (0.5,) * 3, (0.25,) * 3)), rtol=1e-4, atol=1e-5)


def test_precision_auto_follows_the_model_where_the_device_supports_it(monkeypatch):
    from mil.extract.wsi import encoders

    monkeypatch.setattr(encoders, "_cpu_has_native_bf16", lambda: True)
    assert resolve_hub_precision("auto", "fp16", "cuda") == "fp16"  # Virchow2 on a GPU, as its card runs it
    assert resolve_hub_precision("auto", "fp16", "cpu") == "bf16"  # CPUs: bf16 where native, never fp16
    assert resolve_hub_precision("auto", "fp32", "cpu") == "fp32" and resolve_hub_precision("fp32", "fp16", "cuda") == "fp32"
    monkeypatch.setattr(encoders, "_cpu_has_native_bf16", lambda: False)
    assert resolve_hub_precision("auto", "bf16", "cpu") == "fp32"
    with pytest.raises(OptionError, match="--precision"):
        resolve_hub_precision("fp8", "fp16", "cpu")


@pytest.mark.parametrize(("name", "package"), [("phikon-v2", "transformers"), ("conch", "conch")])
def test_optional_packages_missing_is_one_line_how_to_install(monkeypatch, name, package):
    monkeypatch.setitem(sys.modules, package, None)  # import fails, installed or not
    with pytest.raises(OptionError, match=rf"^expected the {package} package for --encoder {name}.*pip install \S+$"):
        create_encoder(name, weights="none")


def test_mil_extract_encoders_lists_every_entry_without_importing_torch():
    r = invoke_mil("extract", "encoders")
    assert r.returncode == 0, r.stderr
    for e in ENTRIES.values():
        row = next(line for line in r.stdout.splitlines() if line.split()[:1] == [e.name])
        assert [str(e.dim), str(e.input_size), e.precision, e.output] == row.split()[1:5] and e.repo.startswith(row.split()[5])
    assert list(hub.BUILTIN) == list_encoders() and all(n in r.stdout for n in hub.BUILTIN)
    code = "import sys\nfrom mil.cli import main\nmain(['extract', 'encoders'])"
    code += "\nprint(sorted(m for m in ('torch', 'timm', 'huggingface_hub') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "[]"


def test_unknown_encoder_is_exit_2_with_a_did_you_mean(tmp_path):
    (tmp_path / "s1.tiff").write_bytes(b"not read: the encoder is checked first")
    (tmp_path / "m.csv").write_text("slide_id,path,label\ns1,s1.tiff,0\n")
    r = invoke_mil("extract", "features", "--manifest", tmp_path / "m.csv", "--out", tmp_path / "out", "--encoder", "virchow-2")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "expected --encoder to be one of" in lines[0] and "uni2-h" in lines[0] and "did you mean 'virchow2'?" in lines[0]
    assert not (tmp_path / "out").exists()
