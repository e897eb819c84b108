"""Tile encoders for feature extraction, created by name (`create_encoder("resnet50_trunc")`).

A timm-style registry: `@register_encoder` entrypoints build a timm backbone without its classifier,
`create_encoder` adds weights (random, timm's ImageNet or a local checkpoint: state dict, timm or
MoCo v2) and wraps it in an `Encoder` that turns uint8 tiles `(B, H, W, 3)` into float32 features
`(B, D)`. Pathology foundation models (`uni`, `virchow2` …) and `hf-hub:ORG/REPO` names are
delegated to `mil.extract.wsi.hub`. Nothing here touches the network on import; only pretrained
weights may download.
"""

from __future__ import annotations

import difflib
import hashlib
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from mil.errors import MilError, OptionError
from mil.extract.wsi import hub

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_HEADS = ("fc.", "head.", "classifier.")  # classifier modules of timm models; absent when num_classes=0
_MOCO_PREFIX = "encoder_q."  # MoCo v1/v2 query encoder (facebookresearch/moco), after 'module.' is stripped
_ENCODERS: dict[str, tuple[Callable[[bool], nn.Module], tuple[str, ...]]] = {}


def register_encoder(fn: Callable | None = None, *, removed: tuple[str, ...] = ()) -> Callable:
    """Register `fn(pretrained: bool) -> nn.Module` under its function name.

    Args:
        removed: key prefixes of modules the entrypoint cut out; checkpoints may hold them (ignored).
    """

    def add(fn: Callable) -> Callable:
        _ENCODERS[fn.__name__] = (fn, removed)
        return fn

    return add if fn is None else add(fn)


@register_encoder(removed=("layer4.",))
def resnet50_trunc(pretrained: bool = False) -> nn.Module:
    """ResNet-50 up to layer3 + global average pool, 1024-d: the CLAM/TRIDENT baseline (torchvision weights)."""
    model = timm.create_model("resnet50.tv_in1k", pretrained=pretrained, num_classes=0)
    model.layer4 = nn.Identity()  # keeps every other module name, so full ResNet-50 checkpoints still load
    model.num_features = model.head_hidden_size = 1024
    return model


@register_encoder
def resnet50(pretrained: bool = False) -> nn.Module:
    """ResNet-50, 2048-d (timm's default ImageNet weights)."""
    return timm.create_model("resnet50", pretrained=pretrained, num_classes=0)


@register_encoder
def resnet18(pretrained: bool = False) -> nn.Module:
    """ResNet-18, 512-d."""
    return timm.create_model("resnet18", pretrained=pretrained, num_classes=0)


@register_encoder
def vit_small_patch16_224(pretrained: bool = False) -> nn.Module:
    """ViT-S/16, 384-d class token."""
    return timm.create_model("vit_small_patch16_224", pretrained=pretrained, num_classes=0)


def list_encoders() -> list[str]:
    """The registered encoder names, sorted (any other timm model name is accepted too)."""
    return sorted(_ENCODERS)


class Encoder(nn.Module):
    """A frozen backbone plus its preprocessing: uint8 tiles `(B, H, W, 3)` → float32 features `(B, D)`.

    Built by `create_encoder`; the model is in eval mode, channels_last, on `device`. To change the
    device or precision, create a new encoder.
    """

    def __init__(
        self,
        model: nn.Module,
        name: str,
        *,
        input_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        weights: str,
        weights_sha256: str,
        seed: int,
        precision: str,
        device: torch.device,
        details: dict | None = None,
        compile: bool = False,
    ) -> None:
        """`details`: more JSON-ready facts for `describe()` (hub models: source, architecture, output rule).

        `compile`: run the model through `torch.compile` (see `compile_model`); the first batch
        compiles it (`compile_seconds`), later batches of any slide reuse the compiled code.
        """
        super().__init__()
        self.model = model.eval().to(device, memory_format=torch.channels_last)
        self._compiled = compile_model(self.model, device) if compile else None  # a function: not a submodule
        self.compile_seconds, self._batch = None, 0  # first compiled batch's time; the one compiled batch size
        self.name, self.weights, self.weights_sha256, self.seed = name, weights, weights_sha256, seed
        self.feature_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
        self.input_size, self.mean, self.std = input_size, tuple(mean), tuple(std)
        self.precision, self.device, self.details = precision, device, dict(details or {})
        # uint8 x -> (x / 255 - mean) / std  ==  x * scale + shift
        std255 = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255  # (1, 3, 1, 1)
        self.register_buffer("_scale", 1.0 / std255, persistent=False)  # (1, 3, 1, 1)
        self.register_buffer("_shift", -torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255 / std255, persistent=False)

    @property
    def compiled(self) -> bool:
        """Whether the model runs through `torch.compile`."""
        return self._compiled is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features of normalised images `x` `(B, 3, S, S)` → `(B, D)` float32, at `self.precision`."""
        x = x.contiguous(memory_format=torch.channels_last)  # (B, 3, S, S)
        if self.compiled and len(x) != self._batch:
            return self._forward_static(x)
        dtype = _DTYPES.get(self.precision)
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            return (self._compiled or self.model)(x).float()  # (B, D)

    def _forward_static(self, x: torch.Tensor) -> torch.Tensor:
        """Compiled model: the first batch compiles it (timed); a smaller batch (a slide's last) is
        padded with zeros to that size, so every slide reuses one compiled graph instead of compiling
        one per remainder."""
        b = len(x)
        if b > self._batch:  # the first batch, or a larger one: compile for this size
            t0, self._batch = time.perf_counter(), b
            z = self(x)  # (B, D)
            self.compile_seconds = (self.compile_seconds or 0.0) + time.perf_counter() - t0
            return z
        pad = x.new_zeros((self._batch - b, *x.shape[1:])).contiguous(memory_format=torch.channels_last)  # (P, 3, S, S)
        return self(torch.cat([x, pad]))[:b]  # (B, D)

    @torch.inference_mode()
    def encode(self, tiles: torch.Tensor) -> torch.Tensor:
        """Features of RGB tiles.

        Args:
            tiles: `(B, H, W, 3)` uint8 on any device; resized to `input_size` when H or W differ.

        Returns:
            `(B, D)` float32 on `self.device`.
        """
        if tiles.dtype != torch.uint8 or tiles.ndim != 4 or tiles.shape[-1] != 3:
            raise ValueError(f"expected uint8 tiles (B, H, W, 3), got {tiles.dtype} {tuple(tiles.shape)} instead")
        # (B, H, W, 3) permuted is already channels_last in memory; one fused multiply-add
        # computes (x / 255 - mean) / std without temporaries (3x faster than the plain expression).
        x = tiles.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()  # (B, 3, H, W) channels_last
        x = torch.addcmul(self._shift, x, self._scale)  # (B, 3, H, W), normalised
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size,) * 2, mode="bilinear", antialias=True)  # (B, 3, S, S)
        return self(x)

    def describe(self) -> dict:
        """JSON-ready settings (lists, not tuples, so they survive a JSON round trip unchanged)."""
        return {
            "name": self.name,
            "feature_dim": self.feature_dim,
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "seed": self.seed,
            "precision": self.precision,
        } | self.details


def compile_model(model: nn.Module, device: torch.device) -> Callable:
    """`torch.compile` for inference at fixed shapes; on a CPU with freezing, which folds batch norm
    into the convolutions and pre-packs the weights for oneDNN (weights must not change afterwards)."""
    options = {"freezing": True} if device.type == "cpu" else None
    return torch.compile(model.forward, dynamic=False, options=options)


def create_encoder(
    name: str,
    weights: str = "none",
    precision: str = "auto",
    *,
    device: str | torch.device = "cpu",
    input_size: int | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    seed: int = 0,
    compile: bool = False,
) -> Encoder:
    """Build an encoder by name.

    Args:
        name: a registered name (`list_encoders()`), a pathology model (`hub.list_hub_encoders()`),
            `hf-hub:ORG/REPO` or any timm model name (created with num_classes=0). Pathology models and
            hf-hub names are built by `hub.create_hub_encoder`, where 'imagenet' means their own weights.
        weights: 'none' (random, seeded: for tests only), 'imagenet' (timm's pretrained weights, downloaded
            or from timm's cache) or the path of a local checkpoint (see `load_weights`).
        precision: 'auto', 'fp32', 'bf16' or 'fp16'; see `resolve_precision`.
        input_size: square side in px that tiles are resized to (default: the weights' own, usually 224).
        mean, std: per-channel normalisation (default: the weights' own).
        seed: seeds the random initialisation (recorded even when weights replace it).
        compile: `torch.compile` the model (`compile_model`): slower first batch, faster after.

    Raises:
        OptionError: unknown name, precision or weights value.
        MilError: ImageNet weights unavailable, or a checkpoint that cannot be read or does not fit.
    """
    if name not in _ENCODERS and hub.is_hub_name(name):
        return hub.create_hub_encoder(
            name, weights, precision, device=device, input_size=input_size, mean=mean, std=std, seed=seed, compile=compile
        )
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    if name in _ENCODERS:
        build, removed = _ENCODERS[name]
    elif timm.is_model(name):
        build, removed = (lambda pretrained: timm.create_model(name, pretrained=pretrained, num_classes=0)), ()
    else:
        close = hub.close_names(name) or difflib.get_close_matches(name, list_encoders() + timm.list_models(), n=1)
        raise OptionError(
            f"expected --encoder to be one of {', '.join(list_encoders() + hub.list_hub_encoders())} (`mil extract encoders`), "
            f"hf-hub:ORG/REPO or a timm model name, got {name!r} instead" + (f"; did you mean {close[0]!r}?" if close else ".")
        )
    if weights not in ("none", "imagenet") and not Path(weights).is_file():
        raise OptionError(f"expected --weights to be imagenet, none or a file, got {weights!r}: no such file.")
    check_preprocessing(input_size, mean, std)
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's random state
        torch.manual_seed(seed)
        model = _build_pretrained(name, build) if weights == "imagenet" else build(False)
    if weights == "none":
        warnings.warn(f"{name}: random weights: features are only good for testing; pass --weights.", stacklevel=2)
        sha = "none"
    elif weights == "imagenet":
        cfg = model.pretrained_cfg
        sha = f"timm:{cfg['architecture']}.{cfg['tag']}:{_state_dict_sha256(model)}"
    else:
        load_weights(model, weights, removed_prefixes=removed)
        sha = sha256_file(weights)
    data = timm.data.resolve_data_config({}, model=model)
    size = input_size or int(data["input_size"][-1])
    if size != data["input_size"][-1] and hasattr(model, "set_input_size"):
        model.set_input_size(img_size=size)  # ViTs: resample the position embedding to the new patch grid
    return Encoder(
        model,
        name,
        input_size=size,
        mean=tuple(mean or data["mean"]),
        std=tuple(std or data["std"]),
        weights=str(weights),
        weights_sha256=sha,
        seed=seed,
        precision=precision,
        device=device,
        compile=compile,
    )


def check_preprocessing(input_size: int | None, mean: tuple | None, std: tuple | None) -> None:
    """Refuse a non-positive input size, or mean/std that are not 3 numbers (stds > 0)."""
    if input_size is not None and input_size <= 0:
        raise OptionError(f"expected --input-size to be a positive number of pixels, got {input_size} instead.")
    if (mean is not None and len(mean) != 3) or (std is not None and (len(std) != 3 or min(std) <= 0)):
        raise OptionError(f"expected 3 channel means and 3 positive stds, got mean={mean}, std={std} instead.")


def _build_pretrained(name: str, build: Callable[[bool], nn.Module]) -> nn.Module:
    """`build(True)` with one-line errors where timm has no weights or cannot fetch them."""
    try:
        model = build(True)
    except Exception as e:  # timm/huggingface_hub raise many types (OSError, HTTP, hub errors) for one cause
        raise MilError(
            f"cannot load ImageNet weights for {name}: no network and no cached copy found ({type(e).__name__}); "
            "pass --weights PATH to a local file, or run once online to fill the cache."
        ) from e
    cfg = model.pretrained_cfg
    if not (cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file")):  # timm then silently keeps random init
        raise OptionError(f"expected a timm model with ImageNet weights, got {name!r}: it has none; use --weights.")
    return model


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """'auto' → 'bf16' where the device computes bf16 natively, else 'fp32'; other values pass through."""
    if precision not in PRECISIONS:
        raise OptionError(f"expected --precision to be auto, fp32, bf16 or fp16, got {precision!r} instead.")
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and _cpu_has_native_bf16() else "fp32"


def _cpu_has_native_bf16() -> bool:
    """True where the CPU has bf16 instructions (x86 AVX512-BF16 or AMX; Arm BF16).

    oneDNN's own check also accepts plain AVX-512, where bf16 is emulated and slower than fp32.
    """
    try:
        if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return False
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):  # older torch without these probes: stay on the safe side
        return False
    if caps.get("architecture", "x86_64") in ("x86_64", "x86", "i686"):
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    return True  # Arm: oneDNN's check already asks for the BF16 extension


@dataclass
class LoadReport:
    """Keys of a checkpoint load: `missing` (tolerated, e.g. BatchNorm counters), `unexpected`, `ignored`."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def load_weights(model: nn.Module, path: str | Path, *, removed_prefixes: tuple[str, ...] = ()) -> LoadReport:
    """Load a local checkpoint into `model`, strictly: every needed key present, shapes equal.

    Accepts a plain state dict, one wrapped under 'state_dict', 'model', 'state_dict_ema' or 'model_ema'
    (first found wins), 'module.' (DDP) and '_orig_mod.' (torch.compile) prefixes, and MoCo v1/v2
    checkpoints ('[module.]encoder_q.*': the query encoder is kept, its projection head 'fc.*' dropped).
    Keys of `removed_prefixes` and of classifier heads (when the model has num_classes=0) are ignored.

    Raises:
        MilError: the file is missing, not a checkpoint, holds pickled objects (refused by
            weights_only=True), or does not fit the model.
    """
    path = Path(path)
    state, ignored = _clean_state_dict(_read_checkpoint(path), path)
    expected = model.state_dict()
    skip = removed_prefixes + (_HEADS if getattr(model, "num_classes", None) == 0 else ())
    ignored += [k for k in state if k not in expected and k.startswith(skip)]
    unexpected = [k for k in state if k not in expected and not k.startswith(skip)]
    missing = [k for k in expected if k not in state]
    needed = [k for k in missing if not k.endswith("num_batches_tracked")]  # absent in old files; unused in eval
    shapes = [f"{k} {tuple(state[k].shape)}≠{tuple(v.shape)}" for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = [
        f"{len(keys)} {what} {keys[:3]}"
        for what, keys in (("missing keys", needed), ("unexpected keys", unexpected), ("shape mismatches", shapes))
        if keys
    ]
    if problems:
        arch = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        raise MilError(
            f"expected {path} to hold weights for {arch}, got {', '.join(problems)} instead; "
            "is this a checkpoint of a different architecture? Pass the matching --encoder."
        )
    model.load_state_dict({k: state[k] for k in expected if k in state}, strict=False)
    return LoadReport(missing, unexpected, ignored)


def _read_checkpoint(path: Path) -> object:
    """`torch.load(path, weights_only=True)` (or safetensors' loader) with one-line errors naming the file."""
    if not path.is_file():
        raise MilError(f"expected a checkpoint file, got {path} which does not exist; check --weights.")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise MilError(f"expected a safetensors file, got {path}: it cannot be read ({type(e).__name__}).") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary code
    except Exception as e:  # torch.load raises UnpicklingError, RuntimeError, KeyError … for bad files
        forbidden = re.search(r"GLOBAL (\S+) was not an allowed global", str(e))
        if forbidden:
            raise MilError(
                f"{path} holds a pickled Python object ({forbidden[1]}) that safe loading refuses; "
                "save only tensors, e.g. torch.save(model.state_dict(), PATH), and pass that file."
            ) from None
        why = type(e).__name__
        raise MilError(f"expected a PyTorch checkpoint, got {path}: torch.load cannot read it ({why}).") from None


def _clean_state_dict(ckpt: object, path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Unwrap and rename a checkpoint's state dict → (state dict, keys dropped on the way)."""
    if isinstance(ckpt, dict):
        ckpt = next((ckpt[k] for k in ("state_dict", "model", "state_dict_ema", "model_ema") if k in ckpt), ckpt)
    if not isinstance(ckpt, dict) or not ckpt or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise MilError(f"expected {path} to hold a state dict (names → tensors), got {type(ckpt).__name__} instead.")
    state = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in ckpt.items()}
    if not any(k.startswith(_MOCO_PREFIX) for k in state):
        return state, []
    keep = {k[len(_MOCO_PREFIX) :]: v for k, v in state.items() if k.startswith(_MOCO_PREFIX)}
    dropped = [k for k in state if not k.startswith(_MOCO_PREFIX)]  # key encoder, queue, queue_ptr
    dropped += [_MOCO_PREFIX + k for k in keep if k.startswith("fc.")]  # the MLP projection head
    return {k: v for k, v in keep.items() if not k.startswith("fc.")}, dropped


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _state_dict_sha256(model: nn.Module) -> str:
    """Hex SHA-256 over a model's state dict: sorted names and raw tensor bytes (any dtype)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
