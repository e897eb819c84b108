"""The `--device` option, one definition for every command that runs a model."""

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
