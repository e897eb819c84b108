"""Needle MIL: multiple-instance learning for whole-slide images.

The core package imports torch, numpy and h5py only; it never imports a stage
(`mil.extract`, `mil.train`, `mil.evaluate`), the CLI, openslide, typer or matplotlib.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from mil.errors import ManifestError, MilError, OptionError, SettingsMismatchError, SlideError
from mil.features import Bag, FeatureFileError, check_finite, read_bag, read_bag_attrs

try:
    __version__ = version("needle-mil")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
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
