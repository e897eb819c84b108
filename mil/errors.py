"""The project's errors.

Every user mistake (a bad manifest row, a slide without mpp, an option out of range) raises a
`MilError` subclass whose message says what was expected, what was found, and how to fix it.
The CLI prints that one line and exits with status 2, without a traceback.
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
