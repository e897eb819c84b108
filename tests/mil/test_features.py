"""Feature files: every accepted layout reads back exactly; every broken file is one clear error."""

from __future__ import annotations

import json
import pickle

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mil.errors import MilError, OptionError
from mil.features import FEATURE_SUFFIXES, Bag, FeatureFileError, check_finite, read_bag, read_bag_attrs

COORD_ATTRS = dict(
    patch_size=256,
    patch_size_level0=512,
    target_mpp=0.5,
    level0_mpp=0.25,
    level0_width=40000,
    level0_height=30000,
    overlap=0,
)
FILE_ATTRS = dict(
    slide_id="slide-01",
    encoder="resnet50_trunc",
    encoder_weights_sha256="ab" * 32,
    feature_dim=8,
    tissue_params=json.dumps({"threshold": 0.5}),
    mil_version="0.1.0",
)


def arrays(n: int = 7, d: int = 8, seed: int = 0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((n, d)).astype(dtype)  # (N, D)
    coords = rng.integers(0, 40000, size=(n, 2)).astype(np.int64)  # (N, 2)
    return features, coords


def write_ours(path, features, coords, *, chunks: bool = True):
    """The layout `mil extract features` writes."""
    with h5py.File(path, "w") as f:
        n, d = features.shape
        f.create_dataset("features", data=features, chunks=(max(1, n), d) if chunks and n else None)
        f["features"].attrs["encoder"] = FILE_ATTRS["encoder"]
        c = f.create_dataset("coords", data=coords.astype(np.int64))
        c.attrs.update(COORD_ATTRS)
        f.attrs.update(FILE_ATTRS | {"feature_dim": d})
    return path


def assert_one_line_naming(err: pytest.ExceptionInfo, path) -> str:
    msg = str(err.value)
    assert str(path) in msg
    assert "\n" not in msg
    assert isinstance(err.value, MilError) and isinstance(err.value, ValueError)
    return msg


# ---------------------------------------------------------------------------------------------
# layouts


def test_ours_round_trip(tmp_path):
    features, coords = arrays()
    bag = read_bag(write_ours(tmp_path / "x.h5", features, coords))
    assert isinstance(bag, Bag)
    np.testing.assert_array_equal(bag.features, features)
    np.testing.assert_array_equal(bag.coords, coords)
    assert bag.features.dtype == np.float32 and bag.coords.dtype == np.int64
    assert bag.attrs["format"] == "mil"
    for k, v in (COORD_ATTRS | FILE_ATTRS).items():
        assert bag.attrs[k] == v, k
    assert type(bag.attrs["patch_size"]) is int and type(bag.attrs["level0_mpp"]) is float  # plain Python values
    assert json.loads(bag.attrs["tissue_params"]) == {"threshold": 0.5}  # JSON left as str
    assert bag.slide_id == "slide-01"  # from attrs, not the file name
    assert len(bag) == 7 and bag.feature_dim == 8


def test_clam_int32_coords_no_attrs(tmp_path):
    features, coords = arrays(n=5, d=4)
    p = tmp_path / "TCGA-AB-1234.h5"
    with h5py.File(p, "w") as f:
        f["features"] = features
        f["coords"] = coords.astype(np.int32)
    bag = read_bag(p)
    assert bag.attrs == {"format": "clam"}
    assert bag.coords.dtype == np.int64
    np.testing.assert_array_equal(bag.coords, coords)
    np.testing.assert_array_equal(bag.features, features)
    assert bag.slide_id == "TCGA-AB-1234"  # the file stem


def test_trident_layout(tmp_path):
    features, coords = arrays(n=6, d=3)
    trident = dict(
        patch_size=256,
        patch_size_level0=512,
        level0_magnification=40,
        target_magnification=20,
        overlap=0,
        name="slide_7",
        savetodir="/job/20x_256px_0px_overlap",
        level0_width=50000,
        level0_height=40000,
    )
    p = tmp_path / "slide_7.hdf5"
    with h5py.File(p, "w") as f:
        f["features"] = features
        f["features"].attrs["encoder"] = "conch_v1"
        f["coords"] = coords
        f["coords"].attrs.update(trident)
    bag = read_bag(p)
    assert bag.attrs["format"] == "trident"
    assert bag.attrs["encoder"] == "conch_v1"
    for k, v in trident.items():
        assert bag.attrs[k] == v, k
    np.testing.assert_array_equal(bag.features, features)
    np.testing.assert_array_equal(bag.coords, coords)
    assert bag.slide_id == "slide_7"


def test_pt_tensor(tmp_path):
    features, _ = arrays(n=9, d=5)
    p = tmp_path / "s1.pt"
    torch.save(torch.from_numpy(features), p)
    for mmap in (False, True):
        bag = read_bag(p, mmap=mmap)
        np.testing.assert_array_equal(bag.features, features)
        np.testing.assert_array_equal(bag.coords, np.zeros((9, 2), dtype=np.int64))
        assert bag.coords.dtype == np.int64
        assert bag.attrs == {"format": "pt"} and bag.slide_id == "s1"


def test_pt_legacy_serialisation_with_mmap(tmp_path):
    """The pre-zip torch format cannot be memory-mapped; it is read normally instead."""
    features, _ = arrays(n=3, d=2)
    p = tmp_path / "old.pt"
    torch.save(torch.from_numpy(features), p, _use_new_zipfile_serialization=False)
    np.testing.assert_array_equal(read_bag(p, mmap=True).features, features)


def test_pt_dict_with_coords_and_metadata(tmp_path):
    features, coords = arrays(n=4, d=6)
    p = tmp_path / "s2.pt"
    torch.save({"features": torch.from_numpy(features), "coords": torch.from_numpy(coords.astype(np.int32)), "slide_id": "S-2"}, p)
    bag = read_bag(p)
    np.testing.assert_array_equal(bag.features, features)
    np.testing.assert_array_equal(bag.coords, coords)
    assert bag.coords.dtype == np.int64
    assert bag.attrs == {"format": "pt", "slide_id": "S-2"} and bag.slide_id == "S-2"


def test_pt_dict_without_coords_and_bfloat16(tmp_path):
    p = tmp_path / "s3.pt"
    torch.save({"features": torch.ones(3, 2, dtype=torch.bfloat16)}, p)
    bag = read_bag(p)
    assert bag.features.dtype == np.float32  # numpy has no bfloat16
    np.testing.assert_array_equal(bag.features, np.ones((3, 2), np.float32))
    np.testing.assert_array_equal(bag.coords, np.zeros((3, 2), np.int64))


def test_batch_axis_is_squeezed(tmp_path):
    features, coords = arrays(n=5, d=3)
    p = tmp_path / "b.h5"
    with h5py.File(p, "w") as f:
        f["features"] = features[None]  # (1, N, D)
        f["coords"] = coords[None]  # (1, N, 2)
    bag = read_bag(p)
    assert bag.features.shape == (5, 3)
    np.testing.assert_array_equal(bag.features, features)
    np.testing.assert_array_equal(bag.coords, coords)
    assert read_bag_attrs(p)["n_instances"] == 5
    q = tmp_path / "b.pt"
    torch.save(torch.from_numpy(features)[None], q)
    np.testing.assert_array_equal(read_bag(q).features, features)


def test_h5_without_coords_gets_zero_coords(tmp_path):
    features, _ = arrays(n=4, d=2)
    p = tmp_path / "nocoords.h5"
    with h5py.File(p, "w") as f:
        f["features"] = features
    bag = read_bag(p)
    np.testing.assert_array_equal(bag.coords, np.zeros((4, 2), np.int64))
    assert bag.attrs["format"] == "clam"


def test_float16_kept_and_dtype_cast(tmp_path):
    features, coords = arrays(dtype=np.float16)
    p = write_ours(tmp_path / "h.h5", features, coords)
    assert read_bag(p).features.dtype == np.float16
    cast = read_bag(p, dtype=np.float32).features
    assert cast.dtype == np.float32
    np.testing.assert_array_equal(cast, features.astype(np.float32))
    with pytest.raises(OptionError, match="floating-point"):
        read_bag(p, dtype=np.int32)


def test_integer_features_read_as_float32(tmp_path):
    p = tmp_path / "i.h5"
    with h5py.File(p, "w") as f:
        f["features"] = np.arange(6, dtype=np.int16).reshape(3, 2)
    bag = read_bag(p)
    assert bag.features.dtype == np.float32
    np.testing.assert_array_equal(bag.features, np.arange(6).reshape(3, 2))


@pytest.mark.parametrize("suffix", [".h5", ".pt"])
def test_empty_bag(tmp_path, suffix):
    p = tmp_path / f"empty{suffix}"
    if suffix == ".h5":
        write_ours(p, np.zeros((0, 8), np.float32), np.zeros((0, 2), np.int64))
    else:
        torch.save(torch.zeros(0, 8), p)
    bag = read_bag(p)
    assert bag.features.shape == (0, 8) and bag.coords.shape == (0, 2)
    assert bag.coords.dtype == np.int64 and len(bag) == 0
    attrs = read_bag_attrs(p)
    assert attrs["n_instances"] == 0 and attrs["feature_dim"] == 8
    check_finite(bag)  # nothing to complain about


def test_read_bag_attrs_is_metadata_only(tmp_path):
    """Features and coords stored in external raw files that do not exist: reading any value fails (read_bag), so
    read_bag_attrs answering proves it reads no feature or coords data, whatever the size of the bag."""
    p = tmp_path / "big.h5"
    n, d = 1_000_000, 768
    with h5py.File(p, "w") as f:
        for name, shape, dtype in (("features", (n, d), np.float32), ("coords", (n, 2), np.int64)):
            f.create_dataset(name, shape=shape, dtype=dtype, external=[(str(tmp_path / f"no_{name}.bin"), 0, h5py.h5f.UNLIMITED)])
        f["coords"].attrs.update(COORD_ATTRS)
        f.attrs.update(FILE_ATTRS | {"feature_dim": d})
    attrs = read_bag_attrs(p)
    assert attrs["n_instances"] == n and attrs["feature_dim"] == d
    assert attrs["format"] == "mil" and attrs["slide_id"] == "slide-01" and attrs["patch_size_level0"] == 512
    assert set(COORD_ATTRS) | set(FILE_ATTRS) <= set(attrs)
    with pytest.raises(FeatureFileError, match="unable to open external raw data file"):
        read_bag(p)


def test_read_bag_attrs_matches_read_bag(tmp_path):
    features, coords = arrays()
    p = write_ours(tmp_path / "x.h5", features, coords)
    assert read_bag_attrs(p) == read_bag(p).attrs | {"n_instances": 7, "feature_dim": 8}


def test_feature_suffixes():
    assert FEATURE_SUFFIXES == (".h5", ".hdf5", ".pt")


# ---------------------------------------------------------------------------------------------
# errors


def _h5(path, **datasets):
    with h5py.File(path, "w") as f:
        for name, data in datasets.items():
            f[name] = data
    return path


H5_ERRORS = [
    ("coords-only", dict(coords=np.zeros((3, 2), np.int64)), r"has coords but no features: run `mil extract features` first"),
    ("nothing", dict(other=np.zeros(3)), r"expected an \(N, D\) dataset named 'features', got datasets \['other'\]"),
    ("stamp", dict(feats=np.zeros((3, 2), np.float16)), r"looks like a STAMP file"),
    ("1d", dict(features=np.zeros(5, np.float32)), r"expected 'features' of shape \(N, D\).*got shape \(5,\)"),
    ("3d", dict(features=np.zeros((2, 3, 4), np.float32)), r"got shape \(2, 3, 4\)"),
    (
        "rows",
        dict(features=np.zeros((4, 3), np.float32), coords=np.zeros((5, 2), np.int64)),
        r"expected as many coords rows as features rows \(4\), got 5 instead",
    ),
    ("coords-3", dict(features=np.zeros((4, 3), np.float32), coords=np.zeros((4, 3), np.int64)), r"expected 'coords' of shape \(N, 2\)"),
    ("coords-1d", dict(features=np.zeros((4, 3), np.float32), coords=np.zeros(4, np.int64)), r"expected 'coords' of shape \(N, 2\)"),
    ("strings", dict(features=np.array([[b"a", b"b"]])), r"expected numeric 'features'.*got dtype \|S1"),
    ("bool", dict(features=np.zeros((2, 2), bool)), r"expected numeric 'features'"),
    (
        "um-coords",
        dict(features=np.zeros((2, 3), np.float32), coords=np.array([[0.5, 1.0], [2.0, 3.0]])),
        r"expected integer level-0 pixel 'coords'",
    ),
]


@pytest.mark.parametrize("name, datasets, match", H5_ERRORS, ids=[e[0] for e in H5_ERRORS])
def test_h5_layout_errors(tmp_path, name, datasets, match):
    p = _h5(tmp_path / f"{name}.h5", **datasets)
    with pytest.raises(FeatureFileError, match=match) as err:
        read_bag(p)
    assert_one_line_naming(err, p)


def test_integral_float_coords_are_accepted(tmp_path):
    p = _h5(tmp_path / "f.h5", features=np.zeros((2, 3), np.float32), coords=np.array([[0.0, 256.0], [512.0, 0.0]]))
    np.testing.assert_array_equal(read_bag(p).coords, [[0, 256], [512, 0]])


def test_read_bag_attrs_checks_layout(tmp_path):
    p = _h5(tmp_path / "rows.h5", features=np.zeros((4, 3), np.float32), coords=np.zeros((5, 2), np.int64))
    with pytest.raises(FeatureFileError, match="coords rows"):
        read_bag_attrs(p)


def test_missing_file(tmp_path):
    p = tmp_path / "nope.h5"
    for fn in (read_bag, read_bag_attrs):
        with pytest.raises(FeatureFileError, match=r"expected a feature file .*which does not exist; check the path") as err:
            fn(p)
        assert_one_line_naming(err, p)


def test_folder_is_refused(tmp_path):
    with pytest.raises(FeatureFileError, match="is a folder"):
        read_bag(tmp_path)


@pytest.mark.parametrize("content", [b"", b"not an hdf5 file at all\n" * 10])
def test_not_hdf5(tmp_path, content):
    p = tmp_path / "text.h5"
    p.write_bytes(content)
    with pytest.raises(FeatureFileError, match="expected an HDF5 feature file.*not HDF5") as err:
        read_bag(p)
    assert_one_line_naming(err, p)


def test_torch_file_named_h5_gets_a_hint(tmp_path):
    p = tmp_path / "x.h5"
    torch.save(torch.zeros(2, 2), p)
    with pytest.raises(FeatureFileError, match="rename it to .pt"):
        read_bag(p)


PT_ERRORS = [
    ("list", lambda: [torch.zeros(2, 2)], r"expected an \(N, D\) tensor or a dict with a 'features' tensor, got a list"),
    ("dict", lambda: {"feats": torch.zeros(2, 2)}, r"got a dict with keys \['feats'\]"),
    ("1d", lambda: torch.zeros(5), r"expected 'features' of shape \(N, D\)"),
    ("complex", lambda: torch.zeros(2, 2, dtype=torch.complex64), r"expected numeric 'features'"),
    ("coords-shape", lambda: {"features": torch.zeros(3, 2), "coords": torch.zeros(3, 3)}, r"expected 'coords' of shape \(N, 2\)"),
    ("coords-rows", lambda: {"features": torch.zeros(3, 2), "coords": torch.zeros(4, 2)}, r"coords rows as features rows \(3\), got 4"),
    ("coords-type", lambda: {"features": torch.zeros(3, 2), "coords": "none"}, r"expected 'coords' to be an \(N, 2\) tensor, got str"),
]


@pytest.mark.parametrize("name, make, match", PT_ERRORS, ids=[e[0] for e in PT_ERRORS])
def test_pt_layout_errors(tmp_path, name, make, match):
    p = tmp_path / f"{name}.pt"
    torch.save(make(), p)
    with pytest.raises(FeatureFileError, match=match) as err:
        read_bag(p)
    assert_one_line_naming(err, p)


class Payload:
    """Stands for any pickled object; weights_only loading must refuse to rebuild it."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_pt_pickled_object_is_refused(tmp_path, capsys):
    p = tmp_path / "evil.pt"
    torch.save({"features": torch.zeros(2, 2), "extra": Payload()}, p)
    with pytest.raises(FeatureFileError, match=r"pickled object of type [\w.]*print.*weights_only") as err:
        read_bag(p)
    assert_one_line_naming(err, p)
    assert "must never run" not in capsys.readouterr().out
    q = tmp_path / "numpy.pt"
    torch.save(np.zeros((2, 2)), q)  # numpy arrays are pickled objects too
    with pytest.raises(FeatureFileError, match="weights_only"):
        read_bag(q)


@pytest.mark.parametrize("content", [b"garbage", pickle.dumps("x", protocol=2)[:-2], b""])
def test_pt_corrupt(tmp_path, content):
    p = tmp_path / "bad.pt"
    p.write_bytes(content)
    with pytest.raises(FeatureFileError, match="expected a (complete )?torch feature file") as err:
        read_bag(p)
    assert_one_line_naming(err, p)


def test_pt_truncated(tmp_path):
    p = tmp_path / "cut.pt"
    torch.save(torch.zeros(100, 16), p)
    p.write_bytes(p.read_bytes()[:1000])
    for fn in (read_bag, read_bag_attrs):
        with pytest.raises(FeatureFileError, match="truncated or corrupt") as err:
            fn(p)
        assert_one_line_naming(err, p)


def test_check_finite(tmp_path):
    features, coords = arrays(n=5, d=4)
    features[2, 1] = np.nan
    features[4, 0] = np.inf
    p = write_ours(tmp_path / "nan.h5", features, coords)
    bag = read_bag(p)  # reading does not validate values
    with pytest.raises(FeatureFileError, match=r"got 2 NaN/Inf value\(s\) of 20 \(first in row 2\)") as err:
        check_finite(bag)
    assert_one_line_naming(err, p)
    check_finite(read_bag(write_ours(tmp_path / "ok.h5", *arrays())))


# ---------------------------------------------------------------------------------------------
# property


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(0, 50),
    d=st.integers(1, 16),
    dtype=st.sampled_from([np.float16, np.float32]),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_property(tmp_path, n, d, dtype, seed):
    rng = np.random.default_rng(seed)
    # Any bit pattern of finite values, including subnormals and extremes of the dtype.
    features = rng.standard_normal((n, d)).astype(dtype) * rng.choice([1e-6, 1.0, 1e3], size=(n, 1)).astype(dtype)  # (N, D)
    coords = rng.integers(0, 2**40, size=(n, 2), dtype=np.int64)  # (N, 2)
    p = write_ours(tmp_path / "prop.h5", features, coords)
    bag = read_bag(p)
    assert bag.features.dtype == dtype and bag.features.shape == (n, d)
    assert bag.features.tobytes() == features.tobytes()  # bit-exact
    np.testing.assert_array_equal(bag.coords, coords)
    assert read_bag_attrs(p)["n_instances"] == n
