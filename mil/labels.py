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
    label_map: dict[str, int] = field(default_factory=dict)  # {} when the labels were 0/1 already
    ignored: list[str] = field(default_factory=list)  # columns of the input that nothing reads

    def describe(self) -> dict | None:
        """What config.json records about the labels; None for our own 0/1 ``label`` column (nothing to record)."""
        if self.layout == "ours" and self.label_column == "label" and not self.label_map:
            return None
        return {"layout": self.layout, "label_column": self.label_column, "label_map": self.label_map}


def parse_label_map(text: str | None) -> dict[str, int] | None:
    """``"tumor=1,normal=0"`` → ``{"tumor": 1, "normal": 0}``; None stays None."""
    if text is None or text.strip() == "":
        return None
    out: dict[str, int] = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or value.strip() not in ("0", "1"):
            raise OptionError(
                f"expected --label-map like 'tumor=1,normal=0' (each class = 0 or 1), got {item.strip()!r} in {text!r} instead."
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
) -> LabelTable:
    """Read our manifest, a CLAM dataset CSV, or STAMP's clinical table + `slide_table` (see the module docstring).

    Raises:
        ManifestError: a missing column, an unmapped or third class, and every check of `read_manifest`.
    """
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
        elif require_labels:
            _require(table, path, [label_column], "--label-column")
    if "label" in df.columns:
        df["label"], mapping = _map_labels(df["label"], path, label_map)
    else:
        mapping = {}
    slides = validate_slides(df, path, require_labels=require_labels, check_files=check_files, require_path=False)
    ignored = [c for c in table.columns if c not in used]
    return LabelTable(slides, layout, label_column, mapping, ignored)


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
                "every head is a binary classifier, so map them with --label-map, e.g. "
                f"--label-map {present[0]}=0,{','.join(f'{c}=1' for c in present[1:3])}."
            )
        label_map = {present[0]: 0, present[1]: 1}
    unmapped = [v for v in present if v not in label_map]
    if unmapped:
        row = int(values[values == unmapped[0]].index[0]) + 2
        raise ManifestError(
            f"{path} line {row}: expected a label named in --label-map ({', '.join(label_map)}), got {unmapped[0]!r} instead; "
            "add it to the map or remove the row."
        )
    return values.map(lambda v: str(label_map[v]) if v else ""), dict(label_map)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
