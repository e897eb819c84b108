"""The `--device` option, one definition for every command that runs a model, and the mixed
precision of training and scoring MIL heads (`autocast_dtype`)."""

from __future__ import annotations

import torch

from mil.errors import OptionError


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` (CUDA when a GPU is visible, else CPU), ``cpu``, ``cuda`` or ``cuda:N``, checked to exist."""
    device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cpu" and device != "cuda" and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise OptionError(f"expected --device to be auto, cpu, cuda or cuda:N, got {device!r} instead.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError(f"expected --device to name an available device, got {device!r} but no CUDA GPU is visible; use --device cpu.")
    return torch.device(device)


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's parameters (CPU for a module without any)."""
    first = next(module.parameters(), None)
    return torch.device("cpu") if first is None else first.device


HEAD_PRECISIONS = ("auto", "fp32", "bf16")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a MIL-head step on `device`, or None for plain fp32.

    ``auto``: bf16 on a CUDA GPU that supports it, else fp32 (a head on CPU gains nothing from bf16
    and its numbers would differ from fp32's); ``bf16`` asks for it anywhere; ``fp32`` never.
    """
    if precision not in HEAD_PRECISIONS:
        raise OptionError(f"expected --precision to be one of {', '.join(HEAD_PRECISIONS)}, got {precision!r} instead.")
    if precision == "fp32":
        return None
    if precision == "auto":
        ok = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if ok else None
    return torch.bfloat16
