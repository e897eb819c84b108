"""Image sets for the end-to-end O2I path: whole images with a label, an O2I ratio and a box.

`mil extract needles` (nMNIST-style canvases) and `mil extract crops` (nCAMELYON-style crops)
write them; `mil train bagnet` and `mil evaluate o2i` read them. One folder per image set::

    IMAGESET/
      imageset.json      what made it: generator, its resolved options, seed, sizes per split
      train.h5           one file per split (val.h5, test.h5), each holding
        images   (n, C, H, W) uint8, one chunk per image, lzf-compressed
        labels   (n,) int8          1 = the target object is present, 0 = not
        o2i      (n,) float32       object area / image area (0 for negatives)
        bbox     (n, 4) int32       target box x0, y0, x1, y1 in pixels, end exclusive; -1 for negatives
        source   (n,) int64         index of the source object / slide the positive came from (-1 if none)

Every split file is written to a temporary name and renamed when whole (`mil.atomic`), so a
split file that exists is complete. `ImageSetDataset` gives float32 images scaled to [0, 1].
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mil.atomic import atomic_path
from mil.errors import ImageSetError

SPLITS = ("train", "val", "test")
META_NAME = "imageset.json"
_FIELDS = ("images", "labels", "o2i", "bbox", "source")


@dataclass
class ImageSplit:
    """One split held in memory.

    Attributes:
        images: (n, C, H, W) uint8.
        labels: (n,) int8, 0/1.
        o2i: (n,) float32, object-to-image area ratio (0 for negatives).
        bbox: (n, 4) int32 x0, y0, x1, y1 of the target (-1 for negatives).
        source: (n,) int64 source-object index (-1 where none).
    """

    images: np.ndarray
    labels: np.ndarray
    o2i: np.ndarray
    bbox: np.ndarray
    source: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def check_split(images: np.ndarray, labels: np.ndarray, o2i: np.ndarray, bbox: np.ndarray, source: np.ndarray | None = None) -> ImageSplit:
    """Validate the arrays of one split and return them as an `ImageSplit` with the stored dtypes."""
    images = np.asarray(images)
    if images.ndim == 3:  # (n, H, W) grey images
        images = images[:, None]  # (n, 1, H, W)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ImageSetError(f"expected images of shape (n, C, H, W) and dtype uint8, got {images.shape} {images.dtype} instead.")
    n = len(images)
    labels = np.asarray(labels).astype(np.int8)
    o2i = np.asarray(o2i, dtype=np.float32)
    bbox = np.asarray(bbox, dtype=np.int32).reshape(-1, 4) if n else np.zeros((0, 4), np.int32)
    source = np.full(n, -1, np.int64) if source is None else np.asarray(source, dtype=np.int64)
    for name, arr in (("labels", labels), ("o2i", o2i), ("bbox", bbox), ("source", source)):
        if len(arr) != n:
            raise ImageSetError(f"expected {n} {name} (one per image), got {len(arr)} instead.")
    if not np.isin(labels, (0, 1)).all():
        raise ImageSetError(f"expected labels 0/1, got {sorted(set(labels.tolist()))} instead.")
    return ImageSplit(images, labels, o2i, bbox, source)


def write_split(path: str | Path, split: ImageSplit, attrs: dict[str, Any] | None = None) -> Path:
    """Write one split file atomically; `attrs` (JSON-able scalars) go into the file's attrs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n, c, h, w = split.images.shape
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("images", data=split.images, chunks=(1, c, h, w) if n else None, compression="lzf" if n else None)
        for name in _FIELDS[1:]:
            f.create_dataset(name, data=getattr(split, name))
        for k, v in (attrs or {}).items():
            f.attrs[k] = v
    return path


def write_meta(folder: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``imageset.json`` atomically (after the split files, so its presence means "done")."""
    path = Path(folder) / META_NAME
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    return path


def read_meta(folder: str | Path) -> dict[str, Any]:
    """Read ``imageset.json`` of an image-set folder; raises `ImageSetError` naming the folder."""
    path = Path(folder) / META_NAME
    if not path.is_file():
        raise ImageSetError(
            f"{folder}: expected an image-set folder with {META_NAME}, got none instead; "
            "make one with `mil extract needles` or `mil extract crops`."
        )
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ImageSetError(f"{path}: expected JSON, could not read it ({e}).") from None


def split_path(folder: str | Path, split: str) -> Path:
    """Path of one split file, checked to exist."""
    if split not in SPLITS:
        raise ImageSetError(f"expected a split in {', '.join(SPLITS)}, got {split!r} instead.")
    path = Path(folder) / f"{split}.h5"
    if not path.is_file():
        raise ImageSetError(f"{path}: expected the {split} split of the image set, got no such file instead.")
    return path


def read_split(folder: str | Path, split: str) -> ImageSplit:
    """Read one split fully into memory (images stay uint8)."""
    path = split_path(folder, split)
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in _FIELDS if k not in f]
            if missing:
                raise ImageSetError(f"{path}: expected datasets {', '.join(_FIELDS)}, missing {', '.join(missing)}.")
            arrays = {k: f[k][()] for k in _FIELDS}
    except OSError as e:
        raise ImageSetError(f"{path}: expected an HDF5 image-set split, could not read it ({e}).") from None
    try:
        return check_split(**arrays)
    except ImageSetError as e:
        raise ImageSetError(f"{path}: {e}") from None


class ImageSetDataset:
    """A torch-style dataset over one split, held in memory as uint8.

    ``ds[i]`` returns ``(image, label, index)``: image (C, H, W) float32 in [0, 1], label a float
    (0./1.), index the row in the split (for O2I and boxes, ``ds.split.o2i[index]``).
    """

    def __init__(self, folder: str | Path, split: str) -> None:
        self.folder = Path(folder)
        self.name = split
        self.split = read_split(folder, split)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        import torch

        image = torch.from_numpy(self.split.images[i]).float().div_(255.0)  # (C, H, W)
        return image, float(self.split.labels[i]), int(i)
