"""Training data: feature files resolve with one clear error, bags load identically cached or streamed, padding is inert."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from mil import create_head
from mil.data import BagDataset, FeatureSpec, collate_bags, resolve_feature_files
from mil.errors import MilError
from mil.features import FeatureFileError, read_bag

D = 8
COORD_ATTRS = dict(patch_size=256, patch_size_level0=512, target_mpp=0.5, level0_mpp=0.25, overlap=0)
FILE_ATTRS = dict(
    encoder="resnet50_trunc",
    encoder_weights_sha256="ab" * 32,
    tissue_params=json.dumps({"threshold": 0.5}),
    mil_version="0.1.0",
)


def write_bag(folder, slide_id, n=5, d=D, seed=0, features=None, coord_attrs=None, file_attrs=None):
    """Write a feature file in the layout `mil extract features` writes; return its path."""
    rng = np.random.default_rng(seed)
    if features is None:
        features = rng.standard_normal((n, d)).astype(np.float32)  # (N, D)
    n, d = features.shape
    path = folder / f"{slide_id}.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=features)
        c = f.create_dataset("coords", data=rng.integers(0, 40000, size=(n, 2)).astype(np.int64))  # (N, 2)
        c.attrs.update(COORD_ATTRS | (coord_attrs or {}))
        f.attrs.update(FILE_ATTRS | {"slide_id": slide_id, "feature_dim": d} | (file_attrs or {}))
    return path


def make_bags(folder, sizes, seed=0):
    return [write_bag(folder, f"s{i}", n=n, seed=seed + i) for i, n in enumerate(sizes)]


# ---------------------------------------------------------------------------- resolve_feature_files


def test_resolve_all_present(tmp_path):
    paths = make_bags(tmp_path, [3, 4, 5])
    slides = pd.DataFrame({"slide_id": ["s0", "s1", "s2"], "label": pd.array([0, 1, 0], dtype="Int64")})
    files, spec = resolve_feature_files(slides, tmp_path)
    assert files == {"s0": paths[0], "s1": paths[1], "s2": paths[2]}
    assert spec == FeatureSpec("resnet50_trunc", D, 0.5, 256, "ab" * 32)
    assert spec.as_dict() == dict(encoder="resnet50_trunc", feature_dim=D, target_mpp=0.5, patch_size=256, weights_sha256="ab" * 32)


def test_spec_missing_attrs_default():
    spec = FeatureSpec.from_attrs({"feature_dim": 4})
    assert spec == FeatureSpec("unknown", 4, None, None, "unknown")


def test_resolve_lists_every_missing_slide(tmp_path):
    make_bags(tmp_path, [3])
    slides = pd.DataFrame({"slide_id": ["s0", "a", "b", "c"]})
    with pytest.raises(MilError) as e:
        resolve_feature_files(slides, tmp_path)
    msg = str(e.value)
    assert "3 slide" in msg and "a, b, c" in msg and str(tmp_path) in msg and "mil extract features" in msg
    assert "\n" not in msg


def test_resolve_missing_folder(tmp_path):
    with pytest.raises(FeatureFileError, match="not a folder"):
        resolve_feature_files(pd.DataFrame({"slide_id": ["a"]}), tmp_path / "nope")


@pytest.mark.parametrize(
    "attr, kwargs, values",
    [
        ("encoder", dict(file_attrs={"encoder": "uni"}), ("resnet50_trunc", "uni")),
        ("feature_dim", dict(d=16), ("8", "16")),
        ("target_mpp", dict(coord_attrs={"target_mpp": 1.0}), ("0.5", "1.0")),
        ("weights_sha256", dict(file_attrs={"encoder_weights_sha256": "cd" * 32}), ("ab", "cd")),
    ],
)
def test_resolve_mixed_specs(tmp_path, attr, kwargs, values):
    write_bag(tmp_path, "s0")
    bad = write_bag(tmp_path, "s1", **kwargs)
    with pytest.raises(FeatureFileError) as e:
        resolve_feature_files(pd.DataFrame({"slide_id": ["s0", "s1"]}), tmp_path)
    msg = str(e.value)
    assert str(bad) in msg and attr in msg and all(v in msg for v in values)


def test_resolve_float_tolerance(tmp_path):
    write_bag(tmp_path, "s0")
    write_bag(tmp_path, "s1", coord_attrs={"target_mpp": 0.5 + 1e-12})
    _, spec = resolve_feature_files(pd.DataFrame({"slide_id": ["s0", "s1"]}), tmp_path)
    assert spec.target_mpp == 0.5


# ---------------------------------------------------------------------------- BagDataset


def test_ram_and_stream_agree(tmp_path):
    paths = make_bags(tmp_path, [3, 7, 1, 12])
    labels = [0, 1, 1, 0]
    ram = BagDataset(paths, labels, cache="ram")
    stream = BagDataset(paths, np.array(labels), cache="stream")
    assert (ram.cache_mode, stream.cache_mode) == ("ram", "stream")
    assert len(ram) == len(stream) == 4
    for i, p in enumerate(paths):
        xr, yr, sr = ram[i]
        xs, ys, ss = stream[i]
        assert xr.dtype == xs.dtype == torch.float32
        assert xr.shape == xs.shape == (read_bag(p).n_instances, D)
        assert (yr, sr) == (ys, ss) == (labels[i], f"s{i}")
        assert isinstance(yr, int)
        torch.testing.assert_close(xs, torch.from_numpy(read_bag(p).features), rtol=0, atol=0)
        torch.testing.assert_close(xr, xs, rtol=0, atol=1e-2)
    assert all(t.dtype == torch.float16 for t in ram._cache)


def test_auto_mode(tmp_path):
    paths = make_bags(tmp_path, [3, 4])
    assert BagDataset(paths, [0, 1]).cache_mode == "ram"
    ds = BagDataset(paths, [0, 1], max_ram_gb=1e-9)
    assert ds.cache_mode == "stream" and ds._cache is None
    assert ds.nbytes_fp16 == (3 + 4) * D * 2


def test_empty_bag_skipped_with_warning(tmp_path):
    paths = make_bags(tmp_path, [3, 4])
    paths.insert(1, write_bag(tmp_path, "empty", features=np.zeros((0, D), np.float32)))
    for cache in ("ram", "stream"):
        with pytest.warns(UserWarning, match="empty"):
            ds = BagDataset(paths, [0, 1, 1], cache=cache)
        assert ds.skipped_empty == ["empty"]
        assert ds.slide_ids == ["s0", "s1"] and ds.labels == [0, 1] and len(ds) == 2
        assert ds[1][2] == "s1"


@pytest.mark.parametrize("cache", ["ram", "stream"])
def test_subset_equals_a_fresh_dataset_and_shares_the_cache(tmp_path, monkeypatch, cache):
    """A fold's dataset is a subset of the run's: same items as one built from its files, no second read."""
    paths = make_bags(tmp_path, [3, 7, 1, 12, 5])
    paths.insert(2, write_bag(tmp_path, "empty", features=np.zeros((0, D), np.float32)))
    labels = [0, 1, 0, 1, 0, 1]
    with pytest.warns(UserWarning, match="empty"):
        full = BagDataset(paths, labels, cache=cache)
    ids = ["s3", "empty", "s0", "s4"]  # any order; the empty bag is skipped silently (warned about once)
    import mil.data

    reads = []
    monkeypatch.setattr(mil.data, "read_bag", lambda *a, **k: reads.append(a) or read_bag(*a, **k))
    sub = full.subset(ids)
    reads_by_subset = list(reads)
    fresh_ids = ["s3", "s0", "s4"]
    fresh = BagDataset([tmp_path / f"{s}.h5" for s in fresh_ids], [0, 0, 1], cache=cache, slide_ids=fresh_ids)
    assert (sub.slide_ids, sub.labels, sub.skipped_empty, sub.nbytes_fp16) == (fresh_ids, [0, 0, 1], ["empty"], fresh.nbytes_fp16)
    if cache == "ram":
        assert reads_by_subset == [] and sub._cache[0].data_ptr() == full._cache[3].data_ptr()  # the same float16 storage
    for i in range(len(sub)):
        torch.testing.assert_close(sub[i][0], fresh[i][0], rtol=0, atol=0)
        assert sub[i][1:] == fresh[i][1:]
    with pytest.raises(MilError, match="nope"):
        full.subset(["s0", "nope"])


def test_nan_bag_raises_naming_file(tmp_path):
    feats = np.random.default_rng(0).standard_normal((4, D)).astype(np.float32)
    feats[2, 3] = np.nan
    bad = write_bag(tmp_path, "bad", features=feats)
    good = write_bag(tmp_path, "good")
    with pytest.raises(FeatureFileError, match=str(bad)):
        BagDataset([good, bad], [0, 1], cache="ram")
    ds = BagDataset([good, bad], [0, 1], cache="stream")  # stream: checked on access
    ds[0]
    with pytest.raises(FeatureFileError, match=str(bad)):
        ds[1]


def test_bad_options(tmp_path):
    paths = make_bags(tmp_path, [3])
    with pytest.raises(MilError, match="cache"):
        BagDataset(paths, [0], cache="disk")
    with pytest.raises(MilError, match="one label per"):
        BagDataset(paths, [0, 1])
    with pytest.raises(MilError, match="integer label"):
        BagDataset(paths, pd.array([pd.NA], dtype="Int64"))
    with pytest.raises(MilError, match="integer label"):
        BagDataset(paths, [0.5])


def test_stream_holds_no_features(tmp_path):
    paths = make_bags(tmp_path, [20] * 50)
    ds = BagDataset(paths, [i % 2 for i in range(50)], cache="stream", slide_ids=[f"id{i}" for i in range(50)])
    assert ds._cache is None
    held = [v for v in vars(ds).values() if isinstance(v, (torch.Tensor, np.ndarray))]
    held += [x for v in vars(ds).values() if isinstance(v, (list, tuple)) for x in v if isinstance(x, (torch.Tensor, np.ndarray))]
    assert held == []
    x, y, sid = ds[49]
    assert x.shape == (20, D) and y == 1 and sid == "id49"
    assert ds._cache is None


def test_works_with_dataloader(tmp_path):
    paths = make_bags(tmp_path, [3, 9, 5])
    loader = torch.utils.data.DataLoader(BagDataset(paths, [0, 1, 0], cache="stream"), batch_size=2, collate_fn=collate_bags)
    shapes = [tuple(X.shape) for X, *_ in loader]
    assert shapes == [(2, 9, D), (1, 5, D)]


# ---------------------------------------------------------------------------- collate_bags


def test_collate_shapes_mask_padding():
    rng = torch.Generator().manual_seed(0)
    bags = [(torch.randn(n, D, generator=rng), y, f"b{n}") for n, y in [(3, 0), (6, 1), (1, 1)]]
    X, mask, labels, ids = collate_bags(bags)
    assert X.shape == (3, 6, D) and X.dtype == torch.float32
    assert mask.shape == (3, 6) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [3, 6, 1]
    assert labels.dtype == torch.float32 and labels.tolist() == [0.0, 1.0, 1.0]
    assert ids == ["b3", "b6", "b1"]
    for i, (x, _, _) in enumerate(bags):
        n = x.shape[0]
        assert torch.equal(X[i, :n], x)
        assert mask[i, :n].all() and not mask[i, n:].any()
        assert (X[i, n:] == 0).all()


def test_collate_of_one_bag_matches_the_padded_path():
    """A batch of one bag (float16 from the RAM cache, or float32) is that bag as float32, fully masked."""
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(1))
    for bag in (x, x.half()):
        X, mask, labels, ids = collate_bags([(bag, 1, "a")])
        ref, ref_mask, _, _ = collate_bags([(bag, 1, "a"), (bag[:2], 0, "b")])
        assert X.dtype == torch.float32 and torch.equal(X[0], ref[0]) and X.shape == (1, 5, D)
        assert mask.dtype == torch.bool and torch.equal(mask[0], ref_mask[0]) and labels.tolist() == [1.0] and ids == ["a"]


def test_collate_rejects_bad_batches():
    with pytest.raises(ValueError, match="empty batch"):
        collate_bags([])
    with pytest.raises(ValueError, match="shape"):
        collate_bags([(torch.zeros(2, 4), 0, "a"), (torch.zeros(2, 5), 0, "b")])


def test_padding_changes_no_logit(tmp_path):
    torch.manual_seed(0)
    paths = make_bags(tmp_path, [2, 11, 5])
    ds = BagDataset(paths, [0, 1, 0], cache="ram")
    head = create_head("abmil", in_dim=D).eval()
    X, mask, _, _ = collate_bags([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        batched = head(X, mask).logits  # (B,)
        alone = torch.cat([head(ds[i][0][None]).logits for i in range(len(ds))])  # (B,)
    assert batched.shape == (3,)
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-6)
