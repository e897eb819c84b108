"""The project's errors.

Every user mistake (a bad manifest row, a slide without mpp, an option out of range) raises a
`MilError` subclass whose message says what was expected, what was found, and how to fix it.
The CLI prints that one line and exits with status 2, without a traceback. Every error class of
the project is defined here, one hierarchy under `MilError`; the modules that raise them
re-export them under their old names (`mil.features.FeatureFileError` is this module's).

    MilError
    ├── ManifestError          a manifest CSV or label table
    ├── SlideError             a slide file
    ├── SettingsMismatchError  outputs made with other settings
    ├── OptionError            an option or argument out of range
    ├── BagError               a bag tensor or mask
    ├── FeatureFileError       a feature file (HDF5 or .pt)
    ├── ImageSetError          an image-set folder (O2I)
    ├── IdxError               an IDX (MNIST-format) file
    └── RunError               a run directory or its checkpoint
"""

from __future__ import annotations


class MilError(Exception):
    """Base class of every error caused by user input rather than by a bug."""


class ManifestError(MilError, ValueError):
    """A manifest (CSV) is malformed: missing column, duplicate id, bad label, missing file …"""


class SlideError(MilError):
    """A slide cannot be opened or lacks what tiling needs (for example its mpp)."""


class SettingsMismatchError(MilError):
    """Existing outputs were made with other settings; rerun with `--overwrite` to replace them."""


class OptionError(MilError, ValueError):
    """A command-line option or function argument is out of its allowed range."""


class BagError(MilError, ValueError):
    """A bag tensor or mask has the wrong shape or dtype, or a bag has no real instance."""


class FeatureFileError(MilError, ValueError):
    """A feature file is missing, unreadable, or not laid out as a bag of (N, D) features."""


class ImageSetError(MilError, ValueError):
    """An image-set folder or split file is missing or not laid out as `mil.imagesets` describes."""


class IdxError(MilError, ValueError):
    """An IDX file (MNIST format) is missing, truncated or not IDX at all."""


class RunError(MilError):
    """A run directory (of `mil train features` or `mil train bagnet`) that is unfinished, missing
    files or holds an unreadable checkpoint."""
