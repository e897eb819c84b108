"""Checkpoints: the files training writes and evaluation reads, loaded in one place.

* `load_head(path)`: a MIL head from a ``checkpoints/<fold>.pt`` of `mil train features`.
* `load_bagnet(path, device)`: a BagNet from the ``checkpoint.pt`` of `mil train bagnet`.

Both load with ``weights_only=True`` (a pickle that would run code is refused, never retried
unsafely) and turn every failure into one `RunError` line naming the file.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from mil.bagnet import BagNet, create_bagnet
from mil.errors import MilError, RunError
from mil.features import pickle_reason
from mil.heads import Standardized, create_head

FEATURES_RUN = "`mil train features`"
BAGNET_RUN = "`mil train bagnet`"


def _safe_load(path: str | Path, writer: str) -> dict:
    """``torch.load(weights_only=True)`` of a dict, any failure one `RunError` naming the file and its writer."""
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols before refusing them
            warnings.simplefilter("ignore", UserWarning)
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused it: never suggest weights_only=False
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        reason = f"it holds a pickled {m.group(1)}, which weights_only loading refuses because it could run code" if m else pickle_reason(e)
        raise RunError(
            f"{path}: expected a checkpoint written by {writer}, got a file that cannot be loaded "
            f"safely ({reason[:200]}); retrain, or use a checkpoint from a source you trust."
        ) from None
    except Exception as e:  # torch raises many types for a corrupt or foreign file
        raise RunError(f"{path}: expected a checkpoint written by {writer}, got an unreadable file ({_reason(e)}).") from None
    if not isinstance(ckpt, dict):
        raise RunError(f"{path}: expected a checkpoint written by {writer}, got a {type(ckpt).__name__} instead; retrain.")
    return ckpt


def _reason(e: BaseException) -> str:
    return ((str(e).strip().splitlines() or [type(e).__name__])[0])[:200]


def _build(path: str | Path, writer: str, build) -> Any:
    """`build()` with a missing key or mismatched weights reported as one `RunError` line."""
    try:
        return build()
    except MilError:
        raise
    except KeyError as e:
        raise RunError(f"{path}: expected a checkpoint written by {writer}, got one without the key {e}; retrain.") from None
    except Exception as e:  # noqa: BLE001 - wrong shapes, unknown head options …
        raise RunError(f"{path}: expected a checkpoint written by {writer}, got one that does not fit its model ({_reason(e)}).") from None


def load_head(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """The head of a ``checkpoints/<fold>.pt`` written by `mil train features`, in eval mode, and the checkpoint dict.

    The dict holds ``head``, ``head_kwargs``, ``in_dim``, ``standardize``, ``feature_spec``,
    ``threshold`` (Youden's J on validation), ``best_epoch``, ``fold``, ``mil_version`` and ``state_dict``.
    """
    ckpt = _safe_load(path, FEATURES_RUN)

    def build() -> torch.nn.Module:
        model = create_head(ckpt["head"], in_dim=ckpt["in_dim"], **ckpt["head_kwargs"])
        if ckpt.get("standardize", False):  # mean/std buffers are filled by load_state_dict
            model = Standardized(model, torch.zeros(ckpt["in_dim"]), torch.ones(ckpt["in_dim"]))
        model.load_state_dict(ckpt["state_dict"])
        return model.eval()

    return _build(path, FEATURES_RUN, build), ckpt


def load_bagnet(path: str | Path, device: str | torch.device = "cpu") -> tuple[BagNet, dict]:
    """The selected BagNet of a ``checkpoint.pt`` written by `mil train bagnet`, on `device` in eval mode, and the dict."""
    ckpt = _safe_load(path, BAGNET_RUN)
    if ckpt.get("kind") != "bagnet":
        raise RunError(f"{path}: expected a checkpoint of {BAGNET_RUN}, got kind {ckpt.get('kind')!r} instead.")

    def build() -> BagNet:
        net = create_bagnet(**ckpt["bagnet"])
        net.load_state_dict(ckpt["state_dict"])
        return net.to(device).eval()

    return _build(path, BAGNET_RUN, build), ckpt
