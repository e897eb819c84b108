"""Label tables as users have them (ours, CLAM's, STAMP's) → one validated slide table; `mil train features` on them."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from mil.errors import ManifestError, OptionError
from mil.labels import parse_label_map, read_label_table
from tests.conftest import invoke_mil
from tests.train.test_run import needle_cohort


def _csv(path, rows):
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_clam_csv_keeps_case_id_as_patient_and_maps_two_string_classes(tmp_path):
    rows = [{"case_id": f"c{i // 2}", "slide_id": f"s{i}", "label": ["normal_tissue", "tumor_tissue"][i % 2]} for i in range(6)]
    t = read_label_table(_csv(tmp_path / "clam.csv", rows))
    assert t.layout == "clam" and t.ignored == []
    assert t.label_map == {"normal_tissue": 0, "tumor_tissue": 1}
    assert t.slides["patient_id"].tolist() == ["c0", "c0", "c1", "c1", "c2", "c2"]
    assert t.slides["label"].tolist() == [0, 1, 0, 1, 0, 1] and (t.slides["path"] == "").all()


def test_label_map_and_its_errors(tmp_path):
    rows = [{"slide_id": "a", "dx": "tumor"}, {"slide_id": "b", "dx": "normal"}, {"slide_id": "c", "dx": "necrosis"}]
    p = _csv(tmp_path / "m.csv", rows)
    with pytest.raises(ManifestError, match=r"line 4: .*'necrosis'"):
        read_label_table(p, label_column="dx", label_map=parse_label_map("tumor=1,normal=0"))
    t = read_label_table(p, label_column="dx", label_map=parse_label_map("tumor=1,normal=0,necrosis=0"))
    assert t.slides["label"].tolist() == [1, 0, 0] and t.describe()["label_column"] == "dx"
    with pytest.raises(ManifestError, match="two label classes.*--label-map"):
        read_label_table(p, label_column="dx")
    with pytest.raises(OptionError, match="--label-map like"):
        parse_label_map("tumor:1")
    with pytest.raises(ManifestError, match="'diagnosis'.*--label-column"):
        read_label_table(p, label_column="diagnosis")  # named, so required even where labels are optional


def test_stamp_clinical_and_slide_tables(tmp_path):
    clini = _csv(
        tmp_path / "clini.csv", [{"PATIENT": "P1", "isMSIH": "MSIH", "AGE": 60}, {"PATIENT": "P2", "isMSIH": "nonMSIH", "AGE": 70}]
    )
    slides = _csv(
        tmp_path / "slide.csv",
        [{"PATIENT": "P1", "FILENAME": "TCGA-1.svs"}, {"PATIENT": "P1", "FILENAME": "TCGA-2.svs"}, {"PATIENT": "P2", "FILENAME": "TCGA-3"}],
    )
    t = read_label_table(clini, label_column="isMSIH", label_map={"MSIH": 1, "nonMSIH": 0}, slide_table=slides)
    assert t.layout == "stamp" and t.ignored == ["AGE"]
    assert t.slides[["slide_id", "patient_id", "label"]].values.tolist() == [["TCGA-1", "P1", 1], ["TCGA-2", "P1", 1], ["TCGA-3", "P2", 0]]


def test_ours_with_an_extra_column_names_it(tmp_path):
    t = read_label_table(
        _csv(tmp_path / "m.csv", [{"slide_id": "a", "label": 1, "notes": "x"}, {"slide_id": "b", "label": 0, "notes": ""}])
    )
    assert t.layout == "ours" and t.ignored == ["notes"] and t.describe() is None


def test_train_on_a_clam_csv_groups_by_case_and_records_the_map(tmp_path):
    m = pd.read_csv(needle_cohort(tmp_path, n=40, split=False))
    clam = pd.DataFrame(
        {
            "case_id": [f"case{i // 4}_{i % 2}" for i in range(len(m))],  # two slides per case, of one label
            "slide_id": m["slide_id"],
            "label": m["label"].map({0: "normal", 1: "tumor"}),
            "site": "x",
        }
    )
    p = _csv(tmp_path / "clam.csv", clam)
    r = invoke_mil(
        "train", "features", tmp_path, "--manifest", p, "--out", tmp_path / "run", "--folds", "2", "--epochs", "1", "--no-progress"
    )
    assert r.returncode == 0, r.stderr
    assert "ignoring column(s) 'site'" in r.stderr and "normal=0, tumor=1" in r.stderr
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["labels"] == {"layout": "clam", "label_column": "label", "label_map": {"normal": 0, "tumor": 1}}
    splits = pd.read_csv(tmp_path / "run" / "splits.csv").merge(clam[["slide_id", "case_id"]], on="slide_id")
    assert (splits.groupby(["fold", "case_id"])["set"].nunique() == 1).all()  # a case never straddles sets
    r = invoke_mil("train", "features", tmp_path, "--manifest", p, "--out", tmp_path / "r2", "--label-map", "tumor=1", "--epochs", "1")
    assert r.returncode == 2 and "'normal'" in r.stderr and len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "r2").exists()
