"""Needle MIL: multiple-instance learning for whole-slide images.

The core package imports torch, numpy and h5py only; it never imports a stage
(`mil.extract`, `mil.train`, `mil.evaluate`), the CLI, openslide, typer or matplotlib.
`import mil` itself imports none of them: each public name loads its module on first use.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

# Names load on first use (PEP 562), so `import mil` and `mil --help` never import torch.
_LAZY = {
    "mil.errors": ("ManifestError", "MilError", "OptionError", "SettingsMismatchError", "SlideError"),
    "mil.bags": ("BagError", "BagOutput", "check_bag"),
    "mil.bagnet": ("BagNet", "create_bagnet", "list_bagnets"),
    "mil.features": ("Bag", "FeatureFileError", "check_finite", "read_bag", "read_bag_attrs"),
    "mil.heads": ("create_head", "list_heads"),
    "mil.losses": ("create_loss", "list_losses"),
    "mil.pooling": ("create_pooling", "list_poolings"),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'mil' has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


try:
    __version__ = version("needle-mil")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "BagNet",
    "create_bagnet",
    "list_bagnets",
    "BagError",
    "BagOutput",
    "check_bag",
    "create_head",
    "create_loss",
    "create_pooling",
    "list_heads",
    "list_losses",
    "list_poolings",
    "Bag",
    "FeatureFileError",
    "check_finite",
    "read_bag",
    "read_bag_attrs",
    "ManifestError",
    "MilError",
    "OptionError",
    "SettingsMismatchError",
    "SlideError",
    "__version__",
]
