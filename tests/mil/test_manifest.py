"""Manifest validation: every bad row is refused before any work, naming the file and line."""

from __future__ import annotations

import pytest

from mil.errors import ManifestError
from mil.manifest import check_slide_id, read_manifest


def write(tmp_path, text: str, files=("a.svs", "b.svs", "c.svs")):
    for f in files:
        (tmp_path / f).write_bytes(b"x")
    p = tmp_path / "m.csv"
    p.write_text(text)
    return p


def test_valid_manifest_is_cleaned(tmp_path):
    p = write(tmp_path, "slide_id,path,label,split,patient_id,mpp\na,a.svs,1,train,p1,0.25\nb,b.svs,,test,p2,\n")
    df = read_manifest(p)
    assert list(df["slide_id"]) == ["a", "b"]
    assert df["path"][0] == str((tmp_path / "a.svs").resolve())  # relative to the manifest's folder
    assert df["label"][0] == 1 and df["label"].isna()[1]
    assert df["mpp"][0] == 0.25 and df["mpp"].isna()[1]


def test_optional_columns_default(tmp_path):
    df = read_manifest(write(tmp_path, "slide_id,path\na,a.svs\n"))
    assert set(df.columns) >= {"label", "split", "patient_id", "mpp"}
    assert df["label"].isna().all()


@pytest.mark.parametrize(
    "text, match",
    [
        ("slide_id,label\na,1\n", "missing path"),
        ("slide_id,path\na,a.svs\na,b.svs\n", r"line 3: duplicate slide_id 'a' \(first on line 2\)"),
        ("slide_id,path\n../x,a.svs\n", r"line 2: expected a filename-safe slide_id.*'\.\./x'"),
        ("slide_id,path\na/b,a.svs\n", "filename-safe"),
        ("slide_id,path\n.hidden,a.svs\n", "filename-safe"),
        ("slide_id,path\na,missing.svs\n", r"line 2: slide file .*missing\.svs.* does not exist"),
        ("slide_id,path,label\na,a.svs,2\n", r"line 2: expected label 0, 1 or empty, got '2'"),
        ("slide_id,path,label\na,a.svs,yes\n", "expected label"),
        ("slide_id,path,split\na,a.svs,training\n", "expected split"),
        ("slide_id,path,mpp\na,a.svs,-1\n", "expected mpp"),
        ("slide_id,path,split,patient_id\na,a.svs,train,p\nb,b.svs,test,p\n", r"line 3: patient 'p' appears in splits train and test"),
        ("slide_id,path\n", "at least one slide"),
    ],
)
def test_bad_manifests_name_the_row(tmp_path, text, match):
    p = write(tmp_path, text)
    with pytest.raises(ManifestError, match=match) as e:
        read_manifest(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_labels_required_for_training(tmp_path):
    p = write(tmp_path, "slide_id,path,label\na,a.svs,\n")
    read_manifest(p)  # fine for extraction
    with pytest.raises(ManifestError, match="training needs labels"):
        read_manifest(p, require_labels=True)


def test_same_patient_same_split_is_fine(tmp_path):
    df = read_manifest(write(tmp_path, "slide_id,path,split,patient_id\na,a.svs,train,p\nb,b.svs,train,p\n"))
    assert len(df) == 2


def test_missing_manifest_file(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "nope.csv")


@pytest.mark.parametrize("sid", ["a", "TCGA-A1-0001.01", "slide_01"])
def test_safe_ids_pass(sid):
    assert check_slide_id(sid) == sid


def test_slides_root_resolves_relative_paths(tmp_path):
    from mil.errors import ManifestError
    from mil.manifest import read_manifest

    root = tmp_path / "copy" / "training"
    root.mkdir(parents=True)
    (root / "a.tif").write_bytes(b"x")
    m = tmp_path / "shipped.csv"
    m.write_text("slide_id,path,label\na,training/a.tif,1\n")
    df = read_manifest(m, slides_root=tmp_path / "copy")
    assert df["path"][0] == str((root / "a.tif").resolve())
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(m)  # relative to the manifest's folder: not there
    with pytest.raises(ManifestError, match="--slides-root"):
        read_manifest(m, slides_root=tmp_path / "nope")


def test_shipped_camelyon16_manifest_is_valid():
    from pathlib import Path

    from mil.manifest import read_manifest

    df = read_manifest(Path(__file__).resolve().parents[2] / "data_manifests" / "camelyon16.csv", check_files=False, require_labels=True)
    assert len(df) == 400 and df.groupby("split")["label"].sum().to_dict() == {"test": 49, "train": 111}
    assert (df["split"] == "test").sum() == 129


def test_shipped_demo_manifest_is_what_the_demo_cohort_writes(tmp_path):
    """data_manifests/demo_synthetic.csv = `make demo`'s cohort (40 slides, seed 0); labels and splits do not depend on slide size."""
    from pathlib import Path

    import pandas as pd

    from mil.extract.generate.synthetic import make_cohort

    shipped = read_manifest(Path(__file__).resolve().parents[2] / "data_manifests" / "demo_synthetic.csv", check_files=False)
    made = pd.read_csv(make_cohort(tmp_path, n_slides=40, size=1024, seed=0, lesion_fraction=0.01))
    assert len(shipped) == 40 and int(shipped["label"].sum()) == 20
    assert [Path(p).name for p in shipped["path"]] == made["path"].tolist()  # read_manifest resolves paths
    for col in ("slide_id", "label", "split"):
        assert shipped[col].astype(str).tolist() == made[col].astype(str).tolist(), col
