"""Pathology foundation models and Hugging Face hub encoders: `create_encoder("virchow2")`, `"hf-hub:ORG/REPO"`.

A registry of `HubEntry`s. Each knows its architecture (a timm name and kwargs, or a transformers or
CONCH model), input size, mean/std, output rule, feature dim and the precision its authors run it at,
and the hub repository of its weights. Weights come from the local Hugging Face cache (HF_HOME and
HF_HUB_CACHE honoured), else from the hub (never with HF_HUB_OFFLINE set), or from `--weights PATH`.
Importing this module imports neither torch nor timm: `mil extract encoders` lists the registry fast.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from mil.errors import MilError, OptionError

PREFIXES = ("hf-hub:", "hf_hub:")  # timm accepts both spellings
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
BIOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))  # H-optimus model cards
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))  # CONCH
OUTPUTS = {
    "cls": "class token",
    "cls+mean": "concat(class token, mean of patch tokens; register tokens excluded)",
    "pooled": "the timm model's own pooling (num_classes=0)",
    "conch": "encode_image(proj_contrast=False, normalize=False)",
}
SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}  # names: resolved to timm/torch classes at build
TINY = {"depth": 1, "embed_dim": 96, "num_heads": 2}  # tests: the same layer layout, < 1 M parameters
TINY_HF = {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 128}
BUILTIN = ("resnet18", "resnet50", "resnet50_trunc", "vit_small_patch16_224")  # encoders.py's registry


@dataclass(frozen=True)
class HubEntry:
    """One registered model. `kwargs` build it (timm `create_model` kwargs; transformers `from_pretrained`
    kwargs); `tiny` overrides them in tests for a small model of the same layout (never used otherwise)."""

    name: str
    repo: str  # Hugging Face repository of the weights
    backend: str  # 'timm', 'transformers' or 'conch'
    arch: str  # timm architecture, transformers model_type or CONCH model config
    kwargs: dict
    dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    output: str  # a key of OUTPUTS
    precision: str  # what the authors run it at (model card / TRIDENT); 'auto' when unknown
    files: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")  # weight files, first found wins
    tiny: dict = field(default_factory=lambda: dict(TINY))

    @property
    def source(self) -> str:
        return f"hf-hub:{self.repo}"


def _entries(*entries: HubEntry) -> dict[str, HubEntry]:
    return {e.name: e for e in entries}


_BIN = ("pytorch_model.bin",)
_GIANT_REG4, _GIANT_DINO = "vit_giant_patch14_reg4_dinov2", "vit_giant_patch14_dinov2"
_UNI = dict(img_size=224, patch_size=16, init_values=1e-5, dynamic_img_size=True)
_UNI2 = dict(img_size=224, patch_size=14, depth=24, num_heads=24, embed_dim=1536, mlp_ratio=2.66667 * 2, init_values=1e-5)
_UNI2 |= dict(no_embed_class=True, reg_tokens=8, dynamic_img_size=True, **SWIGLU)
_VIRCHOW = dict(img_size=224, init_values=1e-5, mlp_ratio=5.3375, global_pool="", dynamic_img_size=True, **SWIGLU)
_VIRCHOW2 = _VIRCHOW | dict(reg_tokens=4)
_HOPTIMUS = dict(img_size=224, init_values=1e-5, dynamic_img_size=False)
_NO_POOLER = dict(add_pooling_layer=False)  # transformers ViTModel: the CLS token, not its tanh pooler
_GIGAPATH = dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24, init_values=1e-5, mlp_ratio=5.33334)
# Values: the model cards and config.json files on the hub; precisions as TRIDENT (Mahmood lab) runs each model.
ENTRIES = _entries(
    HubEntry("uni", "MahmoodLab/UNI", "timm", "vit_large_patch16_224", _UNI, 1024, 224, *IMAGENET, "cls", "fp16", _BIN),
    HubEntry("uni2-h", "MahmoodLab/UNI2-h", "timm", "vit_giant_patch14_224", _UNI2, 1536, 224, *IMAGENET, "cls", "bf16", _BIN),
    HubEntry("virchow", "paige-ai/Virchow", "timm", "vit_huge_patch14_224", _VIRCHOW, 2560, 224, *IMAGENET, "cls+mean", "fp16"),
    HubEntry("virchow2", "paige-ai/Virchow2", "timm", "vit_huge_patch14_224", _VIRCHOW2, 2560, 224, *IMAGENET, "cls+mean", "fp16"),
    HubEntry("h-optimus-0", "bioptimus/H-optimus-0", "timm", _GIANT_REG4, _HOPTIMUS, 1536, 224, *BIOPTIMUS, "cls", "fp16"),
    HubEntry("h-optimus-1", "bioptimus/H-optimus-1", "timm", _GIANT_REG4, _HOPTIMUS, 1536, 224, *BIOPTIMUS, "cls", "fp16"),
    HubEntry("prov-gigapath", "prov-gigapath/prov-gigapath", "timm", _GIANT_DINO, _GIGAPATH, 1536, 224, *IMAGENET, "cls", "fp16", _BIN),
    HubEntry("phikon", "owkin/phikon", "transformers", "vit", _NO_POOLER, 768, 224, *IMAGENET, "cls", "fp32", tiny=TINY_HF),
    HubEntry("phikon-v2", "owkin/phikon-v2", "transformers", "dinov2", {}, 1024, 224, *IMAGENET, "cls", "fp32", tiny=TINY_HF),
    HubEntry("conch", "MahmoodLab/CONCH", "conch", "conch_ViT-B-16", {}, 512, 448, *OPENAI_CLIP, "conch", "fp32", _BIN, tiny={}),
)


def list_hub_encoders() -> list[str]:
    """The registered pathology model names, in registry order."""
    return list(ENTRIES)


def find_entry(name: str) -> HubEntry | None:
    """The entry named `name` (case-insensitive), or whose repo `name` is as `hf-hub:ORG/REPO`; else None."""
    key = name.lower()
    if key in ENTRIES:
        return ENTRIES[key]
    repo = _repo_of(name)
    return next((e for e in ENTRIES.values() if repo and e.repo.lower() == repo.lower()), None)


def is_hub_name(name: str) -> bool:
    """True for a registry name or any `hf-hub:ORG/REPO` (`hf_hub:` too)."""
    return find_entry(name) is not None or _repo_of(name) is not None


def close_names(name: str) -> list[str]:
    """Registry names that look like `name` (for "did you mean")."""
    return difflib.get_close_matches(name.lower(), list(ENTRIES), n=1)


def _repo_of(name: str) -> str | None:
    return name[len(PREFIXES[0]) :] if name.startswith(PREFIXES) else None


# ---- weights from the Hugging Face cache or hub --------------------------------------------------


def hf_cache_dir() -> Path:
    """The hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else huggingface_hub's default (read now, not at import)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path(constants.HF_HUB_CACHE)


def hf_offline() -> bool:
    """True when HF_HUB_OFFLINE is set (in the environment now, or when huggingface_hub was imported)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").upper() in constants.ENV_VARS_TRUE_VALUES or bool(constants.HF_HUB_OFFLINE)


def hub_file(repo: str, filenames: tuple[str, ...]) -> Path:
    """Local path of the first of `filenames` in `repo`: from the cache, else downloaded (unless offline).

    Raises:
        MilError: none cached and offline, or the download failed (gated, no network …), in one line.
    """
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError

    cache = hf_cache_dir()
    cached_repos = [repo] + [r for r in _cached_spellings(cache, repo) if r != repo]  # hub ids ignore case
    for r in cached_repos:
        for f in filenames:
            found = try_to_load_from_cache(r, f, cache_dir=cache)
            if isinstance(found, str):
                return Path(found)
    wanted = " or ".join(filenames)
    if hf_offline():
        raise MilError(
            f"expected {wanted} of hf-hub:{repo} in the Hugging Face cache {cache}, got none (HF_HUB_OFFLINE is set, so no download was tried); "
            + _how_to_get(repo)
        )
    for f in filenames:
        try:
            return Path(hf_hub_download(repo, f, cache_dir=cache, etag_timeout=10))
        except EntryNotFoundError:
            continue  # the next file name
        except Exception as e:  # gated (401/403), no such repo, no network …: one cause for the user
            raise MilError(f"cannot download {f} of hf-hub:{repo} into {cache} ({type(e).__name__}); " + _how_to_get(repo)) from None
    raise MilError(f"expected {wanted} in hf-hub:{repo}, got neither; pass --weights PATH to a local file.")


def _how_to_get(repo: str) -> str:
    return (
        f"the model may be gated: request access at https://huggingface.co/{repo}, then `huggingface-cli login` and "
        f"download (`huggingface-cli download {repo}`), or pass --weights PATH to a local pytorch_model.bin/.safetensors."
    )


def _cached_spellings(cache: Path, repo: str) -> list[str]:
    """Repo ids in `cache` equal to `repo` but for case (timm users write hf-hub:MahmoodLab/uni too)."""
    want = "models--" + repo.replace("/", "--").lower()
    try:
        return [d.name[len("models--") :].replace("--", "/", 1) for d in cache.iterdir() if d.name.lower() == want]
    except OSError:
        return []


def _weights_sha256(path: Path) -> str:
    """SHA-256 of a weight file; a cached LFS file's blob is named by it, which spares hashing gigabytes."""
    from mil.extract.wsi.encoders import sha256_file

    blob = path.resolve().name
    return blob if re.fullmatch(r"[0-9a-f]{64}", blob) else sha256_file(path)


# ---- building ------------------------------------------------------------------------------------


def _entry_from_config(name: str) -> HubEntry:
    """An entry for a timm model on the hub that is not registered, from its config.json (as timm reads it)."""
    repo = _repo_of(name)
    if not repo or not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise OptionError(f"expected --encoder hf-hub:ORG/REPO, got {name!r} instead.")
    cfg = json.loads(hub_file(repo, ("config.json",)).read_text())
    if "architecture" not in cfg:
        raise OptionError(
            f"expected hf-hub:{repo} to be a timm model (config.json with 'architecture'), got keys {sorted(cfg)[:5]} instead; use a registered name (`mil extract encoders`)."
        )
    pre = cfg.get("pretrained_cfg", {})
    mean, std = tuple(pre.get("mean", IMAGENET[0])), tuple(pre.get("std", IMAGENET[1]))
    size = int(pre.get("input_size", [3, 224, 224])[-1])
    dim = int(cfg.get("num_features", 0))
    return HubEntry(name, repo, "timm", cfg["architecture"], cfg.get("model_args", {}), dim, size, mean, std, "pooled", "auto")


def build_model(entry: HubEntry, overrides: dict | None = None):
    """The entry's model with random weights (transformers: the config.json of its repo, or `overrides`).

    `overrides` replace kwargs (tests: `entry.tiny`). The model's `forward(x (B, 3, S, S))` gives the
    entry's output `(B, D)` and `num_features` is D.
    """
    if entry.backend == "timm":
        import timm
        import torch

        layers = {"SwiGLUPacked": timm.layers.SwiGLUPacked, "SiLU": torch.nn.SiLU}
        kwargs = {k: layers.get(v, v) if isinstance(v, str) else v for k, v in (entry.kwargs | (overrides or {})).items()}
        model = timm.create_model(entry.arch, pretrained=False, num_classes=0, **kwargs)
        if entry.output == "cls+mean":
            model.pool = types.MethodType(_cls_patch_mean, model)  # replaces timm's pooling; keys unchanged
            model.num_features = model.head_hidden_size = 2 * model.embed_dim
        return model
    if entry.backend == "transformers":
        tf = _require("transformers", entry)
        if overrides:
            config = tf.AutoConfig.for_model(entry.arch, **overrides)
        else:
            config = tf.AutoConfig.from_pretrained(hub_file(entry.repo, ("config.json",)).parent, local_files_only=True)
        model = tf.AutoModel.from_config(config, **entry.kwargs)
        return _as_cls_encoder(model)
    _require("conch", entry)
    from conch.open_clip_custom import CoCa, factory

    cfg = json.loads((factory.CFG_DIR / f"{entry.arch}.json").read_text())
    cfg.pop("custom_text", None)
    model = CoCa(**cfg)
    model.forward = types.MethodType(_conch_image, model)
    model.num_features = entry.dim
    return model


def _cls_patch_mean(self, x, pool_type=None):
    """Virchow's output: tokens `(B, T, C)` after the final norm → concat(class token, mean of patch tokens) `(B, 2C)`."""
    import torch

    return torch.cat([x[:, 0], x[:, self.num_prefix_tokens :].mean(1)], dim=-1)  # registers sit in 1..prefix-1


def _hf_cls(self, x):
    """A transformers vision model's class token: `(B, 3, S, S)` → last_hidden_state[:, 0] `(B, C)`."""
    return type(self).forward(self, pixel_values=x).last_hidden_state[:, 0]


def _conch_image(self, x):
    """CONCH's image embedding as its model card extracts it: `(B, 3, 448, 448)` → `(B, 512)`."""
    return self.encode_image(x, proj_contrast=False, normalize=False)


def _as_cls_encoder(model):
    model.forward = types.MethodType(_hf_cls, model)
    model.num_features = model.config.hidden_size
    return model


def _require(package: str, entry: HubEntry):
    """Import an optional package, or one line saying how to install it."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        how = "transformers" if package == "transformers" else "git+https://github.com/mahmoodlab/CONCH.git"
        raise OptionError(f"expected the {package} package for --encoder {entry.name}, got none installed; pip install {how}") from None


def _load(entry: HubEntry, path: Path, overrides: dict | None, seed: int):
    """The entry's model with the weights of `path`: timm through `load_weights` (strict, names keys)."""
    if entry.backend != "timm":
        return _from_pretrained(entry, path)
    import torch

    from mil.extract.wsi.encoders import load_weights

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(entry, overrides)
    load_weights(model, path)
    return model


def _from_pretrained(entry: HubEntry, path: Path):
    """A transformers or CONCH model with the weights of `path` (transformers: its folder, with config.json)."""
    folder = path if path.is_dir() else path.parent
    try:
        if entry.backend == "transformers":
            tf = _require("transformers", entry)
            return _as_cls_encoder(tf.AutoModel.from_pretrained(folder, local_files_only=True, **entry.kwargs))
        _require("conch", entry)
        from conch.open_clip_custom import create_model_from_pretrained

        model = create_model_from_pretrained(entry.arch, checkpoint_path=str(path), return_transform=False)
    except (OSError, ValueError, RuntimeError, KeyError) as e:  # transformers/conch: missing config, bad file …
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise MilError(
            f"expected {path} to hold {entry.name} weights ({entry.backend}, config.json beside them), got an error: {why}"
        ) from None
    model.forward = types.MethodType(_conch_image, model)
    model.num_features = entry.dim
    return model


def resolve_hub_precision(precision: str, reference: str, device) -> str:
    """'auto' → the model's own precision where the device runs it natively: fp16 on CUDA, bf16 where
    `resolve_precision` finds it native, else fp32. Other values pass through (validated)."""
    import torch

    from mil.extract.wsi.encoders import resolve_precision

    native = resolve_precision(precision, device)  # validates; 'auto' → bf16 where native, else fp32
    if precision != "auto" or reference == "auto":
        return native
    if reference == "fp32":
        return "fp32"
    return "fp16" if reference == "fp16" and torch.device(device).type == "cuda" else native


def create_hub_encoder(
    name: str,
    weights: str = "hub",
    precision: str = "auto",
    *,
    device="cpu",
    input_size: int | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    seed: int = 0,
    overrides: dict | None = None,
    compile: bool = False,
):
    """Build a registered pathology model or an `hf-hub:ORG/REPO` timm model (see `create_encoder`).

    Args:
        weights: 'hub' or 'imagenet' (the model's published weights: HF cache first, then the hub unless
            HF_HUB_OFFLINE), 'none' (random, seeded) or a local file (state dict, .bin/.pth or .safetensors;
            transformers models: a folder or a file beside its config.json).
        precision: 'auto' picks the model's own precision where the device supports it (`resolve_hub_precision`).
        overrides: model kwargs replacing the entry's, for tests (`find_entry(name).tiny`).

    Raises:
        OptionError: bad option, or a needed package (transformers, conch) missing.
        MilError: weights not cached and not downloadable (gated, offline), or a file that does not fit.
    """
    import torch

    from mil.extract.wsi.encoders import Encoder, check_preprocessing

    entry = find_entry(name) or _entry_from_config(name)
    device = torch.device(device)
    precision = resolve_hub_precision(precision, entry.precision, device)
    check_preprocessing(input_size, mean, std)
    if entry.backend != "timm" and input_size not in (None, entry.input_size):
        raise OptionError(f"expected --input-size {entry.input_size} for {entry.name}, got {input_size} instead; only timm models resize.")
    local = None if weights in ("none", "hub", "imagenet") else Path(weights)
    if local is not None and not (local.is_file() or (local.is_dir() and entry.backend == "transformers")):
        raise OptionError(f"expected --weights to be hub, none or a file, got {weights!r}: no such file.")
    if weights == "none":
        with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's random state
            torch.manual_seed(seed)
            model = build_model(entry, overrides)
        warnings.warn(f"{entry.name}: random weights: features are only good for testing; pass --weights.", stacklevel=2)
        label, sha = "none", "none"
    else:
        path = local or hub_file(entry.repo, entry.files)
        if local is None and entry.backend == "transformers":
            hub_file(entry.repo, ("config.json",))  # from_pretrained needs it beside the weights
        model = _load(entry, path, overrides, seed)
        file = path if path.is_file() else next((path / f for f in entry.files if (path / f).is_file()), None)
        label = str(local) if local else f"{entry.source}@{path.parent.name}/{path.name}"
        sha = _weights_sha256(file) if file else "unknown"
    size = input_size or entry.input_size
    if size != entry.input_size and hasattr(model, "set_input_size"):
        model.set_input_size(img_size=size)  # ViTs: resample the position embedding to the new patch grid
    details = dict(source=entry.source, architecture=f"{entry.backend} {entry.arch}", output=OUTPUTS[entry.output])
    return Encoder(
        model,
        entry.name,
        input_size=size,
        mean=tuple(mean or entry.mean),
        std=tuple(std or entry.std),
        weights=label,
        weights_sha256=sha,
        seed=seed,
        precision=precision,
        device=device,
        details=details | {"reference_precision": entry.precision},
        compile=compile,
    )
