"""Label tables as users have them → one validated slide table (the manifest's columns).

Three layouts are read, told apart by their columns:

* **ours** (`mil.manifest`): ``slide_id, [path], label, [split, patient_id, mpp]``;
* **CLAM** (``dataset_csv/*.csv``): ``case_id, slide_id, label``; ``case_id`` is the patient;
* **STAMP**: a clinical table ``PATIENT, <target column>, …`` and a slide table
  ``PATIENT, FILENAME`` (``slide_table``); a slide's id is its FILENAME without the slide or
  feature-file extension, its label the target of its patient.

``label_column`` names the target (default ``label``); ``patient_column`` the patient (default:
the first of ``patient_id``, ``case_id``, ``PATIENT`` present). Labels that are not 0/1 are mapped
by ``label_map`` (``{"tumor": 1, "normal": 0}``), or, for exactly two string classes, in sorted
order (the first 0, the second 1; the mapping is returned to be written beside the run). A value
the map does not name is an error naming the row. ``path`` is not required (training on feature
files needs no slide). Every column that is not used is returned in ``ignored``, for a warning.

Multi-class (``n_classes=C > 2``, `mil train features --n-classes C`): labels are the integers
``0..C-1``, or exactly ``C`` string classes mapped to ``0..C-1`` in sorted order, or names mapped by
``label_map`` to ``0..C-1``; a label outside is an error naming its row. The map and the class
names (``classes``, in label order) are recorded by `LabelTable.describe`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mil.errors import ManifestError, OptionError
from mil.manifest import read_csv_table, validate_slides

PATIENT_COLUMNS = ("patient_id", "case_id", "PATIENT")  # ours, CLAM's, STAMP's
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".bif", ".h5", ".pt")  # dropped from FILENAME


@dataclass
class LabelTable:
    """A validated slide table (`mil.manifest.read_manifest`'s columns) and how it was read."""

    slides: pd.DataFrame
    layout: str  # "ours" | "clam" | "stamp"
    label_column: str
    label_map: dict[str, int] = field(default_factory=dict)  # {} when the labels were integers already
    ignored: list[str] = field(default_factory=list)  # columns of the input that nothing reads
    n_classes: int = 2

    @property
    def classes(self) -> list[str]:
        """Class names in label order: the map's names, else the labels themselves ("0", "1", …)."""
        names = {v: k for k, v in self.label_map.items()}
        return [names.get(k, str(k)) for k in range(self.n_classes)]

    def describe(self) -> dict | None:
        """What config.json records about the labels; None for our own 0/1 ``label`` column (nothing to record).

        Multi-class tables always record themselves, with ``n_classes`` and ``classes``."""
        if self.n_classes > 2:
            return {
                "layout": self.layout,
                "label_column": self.label_column,
                "label_map": self.label_map,
                "n_classes": self.n_classes,
                "classes": self.classes,
            }
        if self.layout == "ours" and self.label_column == "label" and not self.label_map:
            return None
        return {"layout": self.layout, "label_column": self.label_column, "label_map": self.label_map}


def parse_label_map(text: str | None) -> dict[str, int] | None:
    """``"tumor=1,normal=0"`` → ``{"tumor": 1, "normal": 0}``; None stays None (multi-class: ``a=0,b=1,c=2``)."""
    if text is None or text.strip() == "":
        return None
    out: dict[str, int] = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip().isdigit():
            raise OptionError(
                f"expected --label-map like 'tumor=1,normal=0' (each class = 0 or 1; 0..C-1 with --n-classes C), "
                f"got {item.strip()!r} in {text!r} instead."
            )
        out[name.strip()] = int(value)
    return out


def read_label_table(
    path: str | Path,
    *,
    label_column: str = "label",
    label_map: dict[str, int] | None = None,
    patient_column: str | None = None,
    slide_table: str | Path | None = None,
    require_labels: bool = False,
    check_files: bool = False,
    n_classes: int = 2,
) -> LabelTable:
    """Read our manifest, a CLAM dataset CSV, or STAMP's clinical table + `slide_table` (see the module docstring).

    `n_classes`: 2 (binary, the default) or ``C > 2`` for labels ``0..C-1``.

    Raises:
        ManifestError: a missing column, an unmapped class or one beyond `n_classes`, and every check of `read_manifest`.
        OptionError: `n_classes` < 2.
    """
    if not isinstance(n_classes, int) or isinstance(n_classes, bool) or n_classes < 2:
        raise OptionError(f"expected --n-classes to be an integer >= 2, got {n_classes!r} instead.")
    path = Path(path)
    table = read_csv_table(path, "label table")
    if slide_table is not None:
        df, used, layout = _stamp(table, path, Path(slide_table), label_column, patient_column or "PATIENT")
    else:
        if "slide_id" not in table.columns:
            raise ManifestError(
                f"{path}: expected a 'slide_id' column (ours or CLAM's), got columns {list(table.columns)}; "
                "for STAMP's clinical table give its slide table with --slide-table."
            )
        df, used = table.copy(), {"slide_id", "path", "split", "mpp"}
        layout = "clam" if "case_id" in table.columns else "ours"
        patient = patient_column or next((c for c in PATIENT_COLUMNS if c in table.columns), None)
        _require(table, path, [c for c in (patient,) if c is not None], "--patient-column")
        df["patient_id"] = table[patient] if patient else ""
        used.add(patient)
        if label_column in table.columns:
            df["label"] = table[label_column]
            used.add(label_column)
        elif require_labels or label_column != "label":  # a column asked for by name must be there
            _require(table, path, [label_column], "--label-column")
    if "label" in df.columns and n_classes > 2:
        df["label"], mapping = _map_classes(df["label"], path, label_map, n_classes)  # "0".."C-1" or ""
    elif "label" in df.columns:
        df["label"], mapping = _map_labels(df["label"], path, label_map)
    else:
        mapping = {}
    slides = validate_slides(df, path, require_labels=require_labels, check_files=check_files, require_path=False, n_classes=n_classes)
    ignored = [c for c in table.columns if c not in used]
    return LabelTable(slides, layout, label_column, mapping, ignored, n_classes)


def _stamp(clini: pd.DataFrame, path: Path, slide_path: Path, label_column: str, patient: str) -> tuple[pd.DataFrame, set, str]:
    """STAMP's tables joined: one row per slide of the slide table, with its patient's target."""
    slides = read_csv_table(slide_path, "slide table")
    _require(slides, slide_path, [patient, "FILENAME"], "--patient-column")
    _require(clini, path, [patient, label_column], "--label-column")
    dup = clini[patient][clini[patient].duplicated()]
    if len(dup):
        raise ManifestError(f"{path}: expected one row per {patient}, got {dup.iloc[0]!r} twice; one patient, one target.")
    target = dict(zip(clini[patient], clini[label_column]))
    names = slides["FILENAME"].map(lambda f: Path(f).stem if Path(f).suffix.lower() in SLIDE_SUFFIXES else f)
    df = pd.DataFrame({"slide_id": names, "patient_id": slides[patient], "label": slides[patient].map(target).fillna("")})
    return df, {patient, label_column}, "stamp"


def _require(table: pd.DataFrame, path: Path, columns: list[str], option: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ManifestError(f"{path}: expected column {missing[0]!r}, got columns {list(table.columns)}; name the right one with {option}.")


def _map_labels(values: pd.Series, path: Path, label_map: dict[str, int] | None) -> tuple[pd.Series, dict[str, int]]:
    """Labels as "0"/"1"/"" strings, and the mapping applied ({} when they were 0/1 already)."""
    values = values.astype(str).str.strip()
    present = sorted(set(values) - {""})
    if label_map is None:
        if all(_is_number(v) for v in present):  # 0/1 as they are; another number is refused by its row
            return values, {}
        if len(present) < 2:
            raise ManifestError(f"{path}: expected two label classes, got only {present or ['none']}; a classifier needs both.")
        if len(present) > 2:
            raise ManifestError(
                f"{path}: expected two label classes to map to 0 and 1, got {len(present)}: {', '.join(map(repr, present[:10]))}; "
                "map them with --label-map, e.g. "
                f"--label-map {present[0]}=0,{','.join(f'{c}=1' for c in present[1:3])}, or train {len(present)} classes with "
                f"--n-classes {len(present)}."
            )
        label_map = {present[0]: 0, present[1]: 1}
    return _apply_map(values, present, path, label_map)


def _apply_map(values: pd.Series, present: list[str], path: Path, label_map: dict[str, int]) -> tuple[pd.Series, dict[str, int]]:
    """`values` through `label_map` ("" stays ""); a value the map does not name is an error naming its row."""
    unmapped = [v for v in present if v not in label_map]
    if unmapped:
        row = int(values[values == unmapped[0]].index[0]) + 2
        raise ManifestError(
            f"{path} line {row}: expected a label named in --label-map ({', '.join(label_map)}), got {unmapped[0]!r} instead; "
            "add it to the map or remove the row."
        )
    return values.map(lambda v: str(label_map[v]) if v else ""), dict(label_map)


def _map_classes(values: pd.Series, path: Path, label_map: dict[str, int] | None, n_classes: int) -> tuple[pd.Series, dict[str, int]]:
    """Multi-class labels as "0".."C-1"/"" strings, and the mapping applied ({} when they were integers already)."""
    values = values.astype(str).str.strip()
    present = sorted(set(values) - {""})
    if label_map is None and present and not all(_is_number(v) for v in present):
        if len(present) != n_classes:
            raise ManifestError(
                f"{path}: expected {n_classes} label classes for --n-classes {n_classes}, got {len(present)}: "
                f"{', '.join(map(repr, present[:10]))}; fix the labels, set --n-classes {len(present)} or give a --label-map."
            )
        label_map = {c: k for k, c in enumerate(present)}  # sorted order
    if label_map is not None:
        bad = {k: v for k, v in label_map.items() if not 0 <= v < n_classes}
        if bad:
            name = next(iter(bad))
            raise ManifestError(f"expected --label-map values 0..{n_classes - 1} for {n_classes} classes, got {name}={bad[name]} instead.")
        return _apply_map(values, present, path, label_map)
    out = []
    for i, v in values.items():
        k = _class_index(v)
        if v and not (k is not None and 0 <= k < n_classes):
            raise ManifestError(
                f"{path} line {int(i) + 2}: expected a label 0..{n_classes - 1} for {n_classes} classes (or empty), got {v!r} instead; "
                "fix the label or raise --n-classes."
            )
        out.append(str(k) if v else "")
    return pd.Series(out, index=values.index), {}


def _class_index(text: str) -> int | None:
    """``"2"`` or ``"2.0"`` → 2; anything else (``"2.5"``, ``"x"``, ``"inf"``) → None."""
    try:
        f = float(text)
        return int(f) if f == int(f) else None
    except (ValueError, OverflowError):
        return None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
