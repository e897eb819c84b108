"""Property-based tests (hypothesis) of the feature-file readers and of bag collation.

Whatever a feature file holds (any shape, dtype, empty bags, NaN/Inf, garbage bytes, a
truncated file) and whatever tensors reach `check_bag` / `collate_bags`, the project either
returns a well-formed result or raises one of its own errors (`MilError`): never another
exception, never NaN out of finite input.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import mil
from mil.data import BagDataset, collate_bags
from mil.errors import MilError

SETTINGS = settings(
    max_examples=int(__import__("os").environ.get("MIL_HYPOTHESIS_EXAMPLES", 50)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

FEATURE_DTYPES = st.sampled_from(["float16", "float32", "float64", "int8", "int32", "uint8", "bool", "complex64", "S3"])
shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6)


def _values(dtype: str, shape) -> st.SearchStrategy:
    dt = np.dtype(dtype)
    if dt.kind == "f":
        elements = st.floats(width=dt.itemsize * 8, allow_nan=True, allow_infinity=True)
    elif dt.kind == "c":
        elements = st.complex_numbers(width=dt.itemsize * 8, allow_nan=True, allow_infinity=True)
    else:
        elements = None
    return hnp.arrays(dt, shape, elements=elements)


@st.composite
def feature_arrays(draw):
    dtype = draw(FEATURE_DTYPES)
    return draw(_values(dtype, draw(shapes)))


@st.composite
def coords_arrays(draw, n_hint: int):
    kind = draw(st.sampled_from(["none", "match", "other"]))
    if kind == "none":
        return None
    dtype = draw(st.sampled_from(["int32", "int64", "float32", "float64", "S2"]))
    shape = (n_hint, 2) if kind == "match" else draw(shapes)
    return draw(_values(dtype, shape))


def _tmpdir():
    """A temporary folder for one example, removed after it (``with _tmpdir() as folder``)."""
    return tempfile.TemporaryDirectory(prefix="mil_prop_")


def _valid_coords(coords, n: int) -> bool:
    """Coords the readers must accept for N instances: (N, 2) or (1, N, 2), numeric, whole level-0 pixels."""
    if coords is None:
        return True
    shape = coords.shape[1:] if coords.ndim == 3 and coords.shape[0] == 1 else coords.shape
    if len(shape) != 2 or shape != (n, 2) or coords.dtype.kind not in "iuf":
        return False
    if coords.dtype.kind == "f":
        return bool(np.isfinite(coords).all() and (coords == np.round(coords)).all() and (np.abs(coords) < 2.0**62).all())
    return True


def _valid_features(features) -> bool | None:
    """True: numeric (N, D) or (1, N, D) features the readers must accept; False: must refuse; None: D = 0 (either)."""
    shape = features.shape[1:] if features.ndim == 3 and features.shape[0] == 1 else features.shape
    if features.dtype.kind not in "fiu" or len(shape) != 2:
        return False
    return None if shape[1] == 0 else True


def _check_bag_result(bag: mil.Bag) -> None:
    """What `read_bag` promises when it returns."""
    assert bag.features.ndim == 2 and bag.features.dtype.kind == "f"
    assert bag.coords.shape == (bag.features.shape[0], 2) and bag.coords.dtype == np.int64
    attrs = mil.read_bag_attrs(bag.path)
    assert (attrs["n_instances"], attrs["feature_dim"]) == bag.features.shape
    try:
        mil.check_finite(bag)
        assert np.isfinite(bag.features).all()
    except mil.FeatureFileError:
        assert not np.isfinite(bag.features).all()


@SETTINGS
@given(features=feature_arrays(), data=st.data(), with_attrs=st.booleans())
def test_read_bag_on_arbitrary_hdf5(features, data, with_attrs):
    n_hint = features.shape[0] if features.ndim >= 1 else 0
    coords = data.draw(coords_arrays(n_hint))
    n = (features.shape[1] if features.ndim == 3 and features.shape[0] == 1 else features.shape[0]) if features.ndim else 0
    valid = _valid_features(features)
    valid = valid and _valid_coords(coords, n) if valid is not False else False
    with _tmpdir() as folder:
        path = Path(folder) / "bag.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("features", data=features)
            if coords is not None:
                f.create_dataset("coords", data=coords)
            if with_attrs:
                f.attrs.update(slide_id="x", encoder="toy", mil_version="test", feature_dim=3)
        if valid is False:  # refused; the metadata reader refuses too, or accepts (coords integrality needs the values)
            with pytest.raises(MilError):
                mil.read_bag(path)
            with contextlib.suppress(MilError):
                mil.read_bag_attrs(path)
            return
        try:
            bag = mil.read_bag(path)
        except MilError:
            assert valid is None, "a valid feature file was refused"
            return
        _check_bag_result(bag)
        cast = mil.read_bag(path, dtype=np.float32)
        assert cast.features.dtype == np.float32 and cast.features.shape == bag.features.shape


@SETTINGS
@given(features=feature_arrays(), as_dict=st.booleans(), data=st.data())
def test_read_bag_on_arbitrary_pt(features, as_dict, data):
    assume(features.dtype.kind in "fiub")  # torch has no string tensors
    t = torch.from_numpy(np.ascontiguousarray(features).astype(features.dtype.newbyteorder("=")))
    n = (features.shape[1] if features.ndim == 3 and features.shape[0] == 1 else features.shape[0]) if features.ndim else 0
    coords = None
    with _tmpdir() as folder:
        path = Path(folder) / "bag.pt"
        if as_dict:
            coords = data.draw(coords_arrays(features.shape[0] if features.ndim >= 1 else 0))
            coords = None if coords is not None and coords.dtype.kind == "S" else coords  # not stored
            obj = {"features": t, "slide_id": "x"}
            if coords is not None:
                obj["coords"] = torch.from_numpy(np.ascontiguousarray(coords))
            torch.save(obj, path)
        else:
            torch.save(t, path)
        valid = _valid_features(features)
        valid = valid and _valid_coords(coords, n) if valid is not False else False
        if valid is False:
            with pytest.raises(MilError):
                mil.read_bag(path)
            return
        try:
            bag = mil.read_bag(path)
        except MilError:
            assert valid is None, "a valid feature file was refused"
            return
        _check_bag_result(bag)


@SETTINGS
@given(payload=st.binary(max_size=2048), suffix=st.sampled_from([".h5", ".pt", ".hdf5"]), cut=st.floats(0, 1))
def test_read_bag_on_garbage_and_truncated_files(payload, suffix, cut):
    """Random bytes, and valid files cut short, are refused with a FeatureFileError."""
    with _tmpdir() as tmp:
        folder = Path(tmp)
        garbage = folder / f"g{suffix}"
        garbage.write_bytes(payload)
        with pytest.raises(MilError):
            mil.read_bag(garbage)
        valid = folder / f"v{suffix}"
        X = np.arange(60, dtype=np.float32).reshape(20, 3)
        if suffix == ".pt":
            torch.save(torch.from_numpy(X), valid)
        else:
            with h5py.File(valid, "w") as f:
                f.create_dataset("features", data=X)
        np.testing.assert_array_equal(mil.read_bag(valid).features, X)  # whole, it reads back
        data = valid.read_bytes()
        valid.write_bytes(data[: int(cut * (len(data) - 1))])  # strictly shorter than the whole file
        with pytest.raises(MilError):
            mil.read_bag(valid)


@SETTINGS
@given(
    sizes=st.lists(st.integers(0, 5), min_size=1, max_size=4),
    d=st.integers(1, 4),
    cache=st.sampled_from(["ram", "stream"]),
    poison=st.sampled_from([None, np.nan, np.inf, -np.inf, 1e6]),
    dtype=st.sampled_from(["float16", "float32", "float64"]),
)
def test_bag_dataset_yields_finite_float32_or_refuses(sizes, d, cache, poison, dtype):
    with _tmpdir() as tmp:
        files = []
        rng = np.random.default_rng(0)
        finite, in_f16 = True, True
        for i, n in enumerate(sizes):
            X = rng.normal(size=(n, d)).astype(dtype)
            if poison is not None and n and i == len(sizes) - 1:
                with np.errstate(over="ignore"):
                    X[n // 2, 0] = poison
            finite = finite and bool(np.isfinite(X.astype(np.float32)).all())  # 1e6 overflows float16
            in_f16 = in_f16 and bool((np.abs(X.astype(np.float64)) <= 65504).all())
            p = Path(tmp) / f"b{i}.h5"
            with h5py.File(p, "w") as f:
                f.create_dataset("features", data=X)
            files.append(p)
        # finite values, at least one non-empty bag, and values float16 can hold where bags are kept in RAM as float16
        valid = finite and any(sizes) and (in_f16 or cache == "stream")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # empty bags are left out with a warning
            try:
                ds = BagDataset(files, [i % 2 for i in range(len(files))], cache=cache)
                items = [ds[i] for i in range(len(ds))]
            except MilError:
                assert not valid, "valid bags were refused"
                return
    assert valid, "non-finite values or no instance at all were accepted"
    assert len(items) == sum(n > 0 for n in sizes)
    for X, _, sid in items:
        assert X.dtype == torch.float32 and X.ndim == 2 and X.shape[0] > 0 and X.shape[1] == d
        assert torch.isfinite(X).all(), sid
    X, mask, labels, ids = collate_bags(items)
    assert torch.isfinite(X).all() and mask.sum() == sum(n for n in sizes if n)


TENSOR_DTYPES = st.sampled_from([torch.float16, torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.bool, torch.complex64])


@st.composite
def tensors(draw, max_dims=4):
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=0, max_side=5))
    dtype = draw(TENSOR_DTYPES)
    x = draw(hnp.arrays(np.float32, shape, elements=st.floats(width=32, allow_nan=True, allow_infinity=True)))
    return torch.from_numpy(x).to(dtype) if dtype != torch.complex64 else torch.from_numpy(x).to(torch.complex64)


@st.composite
def masks(draw, like: torch.Tensor):
    kind = draw(st.sampled_from(["none", "match", "random", "numpy", "list", "float"]))
    if kind == "none":
        return None
    lead = tuple(like.shape[:2]) if like.ndim >= 2 else tuple(like.shape)
    shape = lead if kind in ("match", "numpy", "list", "float") else draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
    m = draw(hnp.arrays(np.bool_, shape))
    if kind == "numpy":
        return m
    if kind == "list":
        return m.tolist()
    t = torch.from_numpy(m)
    return t.float() if kind == "float" else t


def _valid_check_bag_input(X, mask) -> bool | None:
    """True: a floating (B, N, D) or (N, D) tensor with a bool mask of its (B, N) (or (N,)) shape, or none, and a real
    instance in every bag; False: anything else; None: a float 0/1 mask (documented as bool; accepted as such)."""
    if X.ndim not in (2, 3) or not X.is_floating_point():
        return False
    B, N = (1, X.shape[0]) if X.ndim == 2 else tuple(X.shape[:2])
    if mask is None:
        return B == 0 or N > 0
    if not isinstance(mask, torch.Tensor):
        return False
    m = mask.reshape(1, -1) if X.ndim == 2 and mask.ndim == 1 else mask
    if tuple(m.shape) != (B, N):
        return False
    ok = B == 0 or (N > 0 and bool(m.bool().any(dim=1).all()))
    return ok if mask.dtype == torch.bool else (None if ok else False)


@SETTINGS
@given(data=st.data())
def test_check_bag_returns_a_valid_pair_or_a_bag_error(data):
    X = data.draw(tensors())
    mask = data.draw(masks(X))
    valid = _valid_check_bag_input(X, mask)
    try:
        Xc, m = mil.check_bag(X, mask)
    except mil.BagError:
        assert valid is not True, "a valid batch was refused"
        return
    assert valid is not False, "an invalid batch was accepted"
    assert Xc.ndim == 3 and Xc.is_floating_point() and m.dtype == torch.bool and tuple(m.shape) == tuple(Xc.shape[:2])
    assert Xc.shape[0] == 0 or bool(m.any(dim=1).all())  # every bag has a real instance


@SETTINGS
@given(data=st.data(), n_bags=st.integers(0, 4))
def test_collate_pads_with_zeros_and_masks_or_raises_a_bag_error(data, n_bags):
    batch = [(data.draw(tensors(max_dims=3)), data.draw(st.integers(0, 1)), f"s{i}") for i in range(n_bags)]
    valid = n_bags > 0 and all(x.ndim == 2 and not x.is_complex() and x.shape[1] == batch[0][0].shape[1] for x, _, _ in batch)
    try:
        X, mask, labels, ids = collate_bags(batch)
    except mil.BagError:
        assert not valid, "valid bags were refused"
        return
    assert valid, "invalid bags were collated"
    assert X.dtype == torch.float32 and X.shape[:2] == mask.shape and ids == [s for _, _, s in batch]
    assert labels.tolist() == [float(y) for _, y, _ in batch]
    for i, (x, _, _) in enumerate(batch):
        n = x.shape[0]
        assert mask[i, :n].all() and not mask[i, n:].any()
        assert (X[i, n:] == 0).all()  # padding is zeros, never NaN
        src = x.float()
        assert torch.equal(torch.isfinite(X[i, :n]), torch.isfinite(src))  # NaN/Inf only where the input had them
