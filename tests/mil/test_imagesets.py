"""Image-set folders (mil.imagesets): round trip, validation, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from mil.imagesets import ImageSetDataset, ImageSetError, check_split, read_meta, read_split, write_meta, write_split


def _split(n: int = 4, c: int = 1, size: int = 16) -> object:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, c, size, size), dtype=np.uint8)  # (n, C, H, W)
    labels = np.arange(n) % 2
    bbox = np.where(labels[:, None] == 1, [2, 3, 6, 7], -1)  # (n, 4)
    return check_split(images, labels, labels * 0.0625, bbox)


def test_round_trip_and_dataset(tmp_path):
    split = _split()
    write_split(tmp_path / "train.h5", split)
    write_meta(tmp_path, {"generator": "test"})
    back = read_split(tmp_path, "train")
    for name in ("images", "labels", "o2i", "bbox", "source"):
        np.testing.assert_array_equal(getattr(back, name), getattr(split, name))
    assert back.source.tolist() == [-1] * 4 and read_meta(tmp_path) == {"generator": "test"}
    ds = ImageSetDataset(tmp_path, "train")
    image, label, index = ds[1]
    assert image.shape == (1, 16, 16) and 0 <= float(image.min()) and float(image.max()) <= 1
    assert label == 1.0 and index == 1 and len(ds) == 4
    assert not list(tmp_path.glob(".*tmp*"))  # nothing half-written left behind


def test_grey_images_gain_a_channel_axis():
    split = check_split(np.zeros((2, 8, 8), np.uint8), [0, 1], [0, 0.5], [[-1] * 4, [0, 0, 4, 4]])
    assert split.images.shape == (2, 1, 8, 8)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"images": np.zeros((2, 1, 8, 8), np.float32)}, "uint8"),
        ({"labels": [0, 2]}, "labels 0/1"),
        ({"o2i": [0.0]}, "expected 2 o2i"),
    ],
)
def test_check_split_refuses_bad_arrays(kwargs, match):
    args = {"images": np.zeros((2, 1, 8, 8), np.uint8), "labels": [0, 1], "o2i": [0, 0.5], "bbox": [[-1] * 4, [0, 0, 4, 4]]}
    with pytest.raises(ImageSetError, match=match):
        check_split(**{**args, **kwargs})


def test_missing_folder_and_split_are_named(tmp_path):
    with pytest.raises(ImageSetError, match="imageset.json"):
        read_meta(tmp_path)
    with pytest.raises(ImageSetError, match="val.h5"):
        read_split(tmp_path, "val")
    with pytest.raises(ImageSetError, match="expected a split"):
        read_split(tmp_path, "holdout")
    (tmp_path / "test.h5").write_bytes(b"not hdf5")
    with pytest.raises(ImageSetError, match="test.h5"):
        read_split(tmp_path, "test")
