"""Image-set folders of the generators (`mil extract needles`, `mil extract crops`): options checked
against an existing set, a folder made ready for a fresh one, the version recorded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mil.atomic import remove_stale_temporaries
from mil.errors import OptionError
from mil.imagesets import META_NAME
from mil.rundir import read_settings, refuse_other_settings


def parse_ints(text: str | None, option: str, n: int | None = None) -> list[int] | None:
    """'64,128,256' → [64, 128, 256]; None stays None. `n` fixes how many values are expected."""
    if text is None:
        return None
    try:
        values = [int(v) for v in str(text).replace(" ", "").split(",") if v != ""]
    except ValueError:
        values = []
    if not values or (n is not None and len(values) != n) or min(values) < 0:
        want = f"{n} comma-separated integers >= 0" if n else "comma-separated integers >= 0"
        raise OptionError(f"expected {option} to be {want}, got {text!r} instead.")
    return values


def check_existing(folder: Path, options: dict[str, Any], overwrite: bool) -> bool:
    """True if `folder` already holds an image set made with exactly `options` (nothing to do).

    Raises `SettingsMismatchError` if it holds one made with other options and not `overwrite`.
    """
    meta_path = folder / META_NAME
    if not meta_path.is_file():
        return False
    if overwrite:
        return False
    old = read_settings(meta_path, "`mil extract needles` or `mil extract crops`", key="options")
    refuse_other_settings(folder, old, json.loads(json.dumps(options, default=str)), what="image set", ignore=())
    return True


def start_folder(folder: Path) -> None:
    """Make `folder` ready for a fresh image set: created, leftovers and the old marker removed."""
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)
    (folder / META_NAME).unlink(missing_ok=True)  # split files first, marker last


def mil_version() -> str:
    import mil

    return str(mil.__version__)
