"""Slide manifests: the CSV that names a cohort's slides, labels and splits.

Columns (see docs/architecture.md):

=============  ========  =====================================================================
column         required  meaning
=============  ========  =====================================================================
slide_id       yes       unique, filename-safe id (``[A-Za-z0-9][A-Za-z0-9._-]*``)
path           yes       the slide file; relative paths resolve against the manifest's folder
label          no        0, 1 or empty (unlabelled)
split          no        train, val, test or empty
patient_id     no        one patient's slides must never sit in two splits
mpp            no        level-0 microns per pixel, overriding what the slide file says
=============  ========  =====================================================================

`read_manifest` validates everything before any work starts and returns a cleaned table;
every error names the file and the line.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from mil.errors import ManifestError

REQUIRED_COLUMNS = ("slide_id", "path")
OPTIONAL_COLUMNS = ("label", "split", "patient_id", "mpp")
SPLITS = ("train", "val", "test")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def check_slide_id(slide_id: str, *, where: str = "") -> str:
    """Return `slide_id` if it is safe to use as a file name, else raise `ManifestError`.

    Ids such as ``../x``, ``a/b`` or ``.hidden`` would write outside the output folder or
    collide with temporary files, so only letters, digits, ``.``, ``_`` and ``-`` are allowed,
    starting with a letter or digit.
    """
    if not isinstance(slide_id, str) or not _SAFE_ID.match(slide_id) or ".." in slide_id:
        raise ManifestError(
            f"{where}expected a filename-safe slide_id (letters, digits, '.', '_', '-', starting with a "
            f"letter or digit, no '..'), got {slide_id!r} instead; rename the slide id."
        )
    return slide_id


def _line(i: int) -> int:
    """CSV line number of data row `i` (the header is line 1)."""
    return i + 2


def read_manifest(
    path: str | Path, *, require_labels: bool = False, check_files: bool = True, slides_root: str | Path | None = None
) -> pd.DataFrame:
    """Read and validate a manifest CSV.

    Args:
        path: the CSV file.
        require_labels: refuse rows whose label is empty (training needs labels).
        check_files: refuse rows whose slide file does not exist.
        slides_root: folder that relative ``path`` values are resolved against (default: the
            manifest's own folder). Shipped manifests (``data_manifests/``) use it to point at a
            user's copy of the slides.

    Returns:
        A DataFrame with columns ``slide_id, path, label, split, patient_id, mpp``: ``path`` is an
        absolute path string, ``label`` a nullable integer, ``split``/``patient_id`` strings
        (empty string when not given) and ``mpp`` a float (NaN when not given).

    Raises:
        ManifestError: on the first problem, naming the manifest and its line.
    """
    path = Path(path)
    df = read_csv_table(path, "manifest")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(
            f"{path}: expected columns {', '.join(REQUIRED_COLUMNS)} (optional: {', '.join(OPTIONAL_COLUMNS)}), "
            f"missing {', '.join(missing)}; found columns {list(df.columns)}."
        )
    if require_labels and "label" not in df.columns:
        raise ManifestError(f"{path}: expected a 'label' column (0/1) for training, found none.")
    return validate_slides(df, path, require_labels=require_labels, check_files=check_files, slides_root=slides_root)


def read_csv_table(path: Path, what: str) -> pd.DataFrame:
    """A CSV file as strings (no NaN: empty cells are ""), header names stripped; `ManifestError` if unreadable."""
    if not path.is_file():
        raise ManifestError(f"expected a {what} CSV file, got {str(path)!r} which does not exist.")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: expected a CSV {what}, could not parse it: {str(e).strip()}") from None
    df.columns = [str(c).strip() for c in df.columns]
    return df


def validate_slides(
    df: pd.DataFrame,
    path: Path,
    *,
    require_labels: bool = False,
    check_files: bool = True,
    slides_root: str | Path | None = None,
    require_path: bool = True,
    n_classes: int = 2,
) -> pd.DataFrame:
    """`read_manifest`'s checks and cleaning of a table in the manifest's columns (`path` may be
    missing or empty when not `require_path`: training on features needs no slide file; labels
    are ``0..n_classes-1``)."""
    if len(df) == 0:
        raise ManifestError(f"{path}: expected at least one slide row, found none.")
    df = df.copy()
    for col in OPTIONAL_COLUMNS + (() if require_path else ("path",)):
        if col not in df.columns:
            df[col] = ""
    df = df[list(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)].apply(lambda s: s.str.strip())

    base = path.parent if slides_root is None else Path(slides_root).expanduser()
    if slides_root is not None and not base.is_dir():
        raise ManifestError(f"expected --slides-root to be a folder holding the slides, got {str(base)!r} which is not a folder.")
    seen: dict[str, int] = {}
    labels: list[float] = []
    paths: list[str] = []
    mpps: list[float] = []
    for i, row in enumerate(df.itertuples(index=False)):
        where = f"{path} line {_line(i)}: "
        sid = check_slide_id(row.slide_id, where=where)
        if sid in seen:
            raise ManifestError(f"{where}duplicate slide_id {sid!r} (first on line {_line(seen[sid])}); ids must be unique.")
        seen[sid] = i
        paths.append(_resolve_path(row.path, base, where, sid, require_path, check_files))
        labels.append(_parse_label(row.label, where, sid, require_labels, n_classes))
        if row.split and row.split not in SPLITS:
            raise ManifestError(f"{where}expected split to be one of {', '.join(SPLITS)} or empty, got {row.split!r} instead.")
        mpps.append(_parse_mpp(row.mpp, where))

    df["path"] = paths
    df["label"] = pd.array([None if np.isnan(v) else int(v) for v in labels], dtype="Int64")
    df["mpp"] = np.asarray(mpps, dtype=float)
    _check_patients(df, path)
    return df.reset_index(drop=True)


def _resolve_path(value: str, base: Path, where: str, sid: str, required: bool, check_file: bool) -> str:
    """The slide's absolute path ("" when none is given and none is `required`)."""
    if not value:
        if required:
            raise ManifestError(f"{where}expected a slide path for {sid!r}, got an empty 'path'.")
        return ""
    p = Path(value).expanduser()
    p = p if p.is_absolute() else base / p
    if check_file and not p.exists():
        raise ManifestError(f"{where}slide file {str(p)!r} for {sid!r} does not exist; fix its 'path'.")
    return str(p.resolve()) if p.exists() else str(p)


def _parse_label(value: str, where: str, sid: str, required: bool, n_classes: int = 2) -> float:
    names = "0 or 1" if n_classes == 2 else f"0..{n_classes - 1}"
    if value == "":
        if required:
            raise ManifestError(f"{where}expected a label {names} for {sid!r}, got an empty label; training needs labels.")
        return float("nan")
    if value in {str(k) for k in range(n_classes)} | {f"{k}.0" for k in range(n_classes)}:
        return float(value)
    raise ManifestError(f"{where}expected label {names.replace(' or', ',')} or empty, got {value!r} instead.")


def _parse_mpp(value: str, where: str) -> float:
    if value == "":
        return float("nan")
    try:
        mpp = float(value)
    except ValueError:
        mpp = float("nan")
    if not (np.isfinite(mpp) and 0 < mpp < 1000):
        raise ManifestError(f"{where}expected mpp to be a positive number of microns per pixel (e.g. 0.25), got {value!r} instead.")
    return mpp


def _check_patients(df: pd.DataFrame, path: Path) -> None:
    """Refuse a patient whose slides sit in two different splits (leakage)."""
    sub = df[(df["patient_id"] != "") & (df["split"] != "")]
    for patient, group in sub.groupby("patient_id", sort=False):
        splits = list(dict.fromkeys(group["split"]))
        if len(splits) > 1:
            second = group.index[group["split"] == splits[1]][0]
            raise ManifestError(
                f"{path} line {_line(int(second))}: patient {patient!r} appears in splits {' and '.join(splits)}; "
                "a patient's slides must all be in one split."
            )
