"""Stage 1: slides → tiles → features (imported as `mil.extract`).

`create_encoder`, `list_encoders` and `register_encoder` are loaded on first use, so that
commands which need no encoder (`mil extract tiles`) do not pay for importing timm.
"""

from __future__ import annotations

_LAZY = {"create_encoder", "list_encoders", "register_encoder", "Encoder"}


def __getattr__(name: str):
    if name in _LAZY:
        from mil.extract.wsi import encoders

        return getattr(encoders, name)
    raise AttributeError(f"module 'mil.extract' has no attribute {name!r}")


__all__ = sorted(_LAZY)
