"""Needle MIL: multiple-instance learning for whole-slide images.

The core package imports torch, numpy and h5py only; it never imports a stage
(`mil.extract`, `mil.train`, `mil.evaluate`), the CLI, openslide, typer or matplotlib.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from mil.errors import ManifestError, MilError, OptionError, SettingsMismatchError, SlideError
from mil.bags import BagError, BagOutput, check_bag
from mil.bagnet import BagNet, create_bagnet, list_bagnets
from mil.features import Bag, FeatureFileError, check_finite, read_bag, read_bag_attrs
from mil.heads import create_head, list_heads
from mil.losses import create_loss, list_losses
from mil.pooling import create_pooling, list_poolings

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
