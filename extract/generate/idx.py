"""Objects for the needle image sets: MNIST-format IDX files (MNIST, Fashion-MNIST, …) or, offline,
scikit-learn's 8 × 8 digits upscaled to 28 × 28.

Source splits are disjoint: val = the last `val_size` objects of the IDX train file, train = the
rest, test = the t10k file (`idx_splits`); the digits are cut 60 / 20 / 20 (`digits_splits`).
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mil.errors import IdxError, OptionError
from mil.imagesets import SPLITS

IDX_NAMES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("t10k", "images"): "t10k-images-idx3-ubyte",
    ("t10k", "labels"): "t10k-labels-idx1-ubyte",
}
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (plain or gzip-compressed, by the ``.gz`` suffix).

    Returns:
        The array with the shape in its header, e.g. (n, 28, 28) uint8 for images, (n,) for labels.

    Raises:
        IdxError: the file is missing, not IDX (bad magic number) or shorter than its header says.
    """
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise IdxError(f"{path}: expected an IDX file, got no such file instead.") from None
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise IdxError(f"{path}: expected an IDX file{' (gzip)' if path.suffix == '.gz' else ''}, could not read it ({e}).") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or not 1 <= raw[3] <= 4:
        magic = raw[:4].hex() if len(raw) >= 4 else f"only {len(raw)} bytes"
        raise IdxError(f"{path}: expected an IDX file with magic number 0x0000TTDD (TT a type code, DD = 1–4 dims), got {magic} instead.")
    ndim, dtype = raw[3], np.dtype(_IDX_DTYPES[raw[2]])
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxError(f"{path}: expected {header} header bytes, got a file of {len(raw)} bytes instead.")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    need = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != need:
        raise IdxError(f"{path}: expected {need} bytes for an IDX array of shape {shape}, got {len(raw)} instead.")
    arr = np.frombuffer(raw, dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="))  # native byte order, writable copy


FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # where Debian's dataset-fashion-mnist puts it


def require_fashion_mnist(folder: str | Path = FASHION_MNIST) -> Path:
    """`folder` if it holds Fashion-MNIST, else an `OptionError` saying how to install it.

    For the studies whose documented numbers are on Fashion-MNIST: no silent fallback to the
    bundled digits, whose numbers are not comparable.
    """
    if not Path(folder).is_dir():
        raise OptionError(
            f"Fashion-MNIST not found in {folder}; install the Debian package dataset-fashion-mnist "
            "(apt-get install dataset-fashion-mnist), or pass --source sklearn-digits for an offline run "
            "(its numbers are not comparable with those in docs/benchmarks.md)"
        )
    return Path(folder)


def find_idx(folder: str | Path) -> dict[tuple[str, str], Path]:
    """Paths of the four MNIST files in `folder` (plain or ``.gz``), keyed like `IDX_NAMES`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise IdxError(f"expected --idx-dir to be a folder holding MNIST-format IDX files, got {str(folder)!r} which is not a folder.")
    found, missing = {}, []
    for key, name in IDX_NAMES.items():
        hits = [p for p in (folder / name, folder / f"{name}.gz") if p.is_file()]
        if hits:
            found[key] = hits[0]
        else:
            missing.append(f"{name}[.gz]")
    if missing:
        raise IdxError(f"{folder}: expected the four MNIST-format IDX files, missing {', '.join(missing)}.")
    return found


def load_idx_dir(folder: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read the MNIST train and t10k files of `folder`.

    Returns:
        ``{"train": (images, labels), "t10k": (images, labels)}``: images (n, H, W) uint8,
        labels (n,) int64.
    """
    paths = find_idx(folder)
    out = {}
    for part in ("train", "t10k"):
        images, labels = read_idx(paths[part, "images"]), read_idx(paths[part, "labels"])
        if images.ndim != 3 or images.dtype != np.uint8:
            raise IdxError(f"{paths[part, 'images']}: expected images of shape (n, H, W) uint8, got {images.shape} {images.dtype} instead.")
        if labels.ndim != 1 or len(labels) != len(images):
            raise IdxError(f"{paths[part, 'labels']}: expected {len(images)} labels (one per image), got shape {labels.shape} instead.")
        out[part] = (images, labels.astype(np.int64))
    return out


@dataclass
class SourceSplit:
    """The objects one split of the image set may use.

    Attributes:
        objects: (n, h, w) uint8.
        labels: (n,) int64 class of each object.
        index: (n,) int64 index of each object in its source (IDX file or digits set).
        origin: where the objects come from, e.g. ``train-images-idx3-ubyte[55000:60000]``.
    """

    objects: np.ndarray
    labels: np.ndarray
    index: np.ndarray
    origin: str


def idx_splits(folder: str | Path, val_size: int = 5000) -> dict[str, SourceSplit]:
    """Disjoint train/val/test objects: val = last `val_size` of the IDX train file, test = t10k."""
    data = load_idx_dir(folder)
    (tr_x, tr_y), (te_x, te_y) = data["train"], data["t10k"]
    n = len(tr_x)
    if not 0 <= val_size < n:
        raise OptionError(f"expected --val-size in [0, {n}) (the IDX train file holds {n} objects), got {val_size} instead.")
    cut = n - val_size
    name = IDX_NAMES["train", "images"]
    return {
        "train": SourceSplit(tr_x[:cut], tr_y[:cut], np.arange(cut), f"{name}[0:{cut}]"),
        "val": SourceSplit(tr_x[cut:], tr_y[cut:], np.arange(cut, n), f"{name}[{cut}:{n}]"),
        "test": SourceSplit(te_x, te_y, np.arange(len(te_x)), f"{IDX_NAMES['t10k', 'images']}[0:{len(te_x)}]"),
    }


def digits_splits(size: int = 28) -> dict[str, SourceSplit]:
    """scikit-learn's bundled 8 × 8 digits (1,797, no download) as 28 × 28 uint8 objects.

    Values 0–16 are rescaled to 0–255 and upscaled with bilinear `skimage.transform.resize`;
    splits are the first 60 % / next 20 % / last 20 % by index.
    """
    from skimage.transform import resize
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = digits.images.astype(np.float32) / 16.0  # (n, 8, 8) in [0, 1]
    big = resize(small, (len(small), size, size), order=1, anti_aliasing=False, preserve_range=True)  # (n, 28, 28)
    objects = np.clip(np.rint(big * 255.0), 0, 255).astype(np.uint8)  # (n, 28, 28)
    labels = digits.target.astype(np.int64)  # (n,)
    n = len(objects)
    a, b = int(round(0.6 * n)), int(round(0.8 * n))
    return {
        split: SourceSplit(objects[lo:hi], labels[lo:hi], np.arange(lo, hi), f"sklearn load_digits[{lo}:{hi}]")
        for split, (lo, hi) in zip(SPLITS, ((0, a), (a, b), (b, n)))
    }


def resize_objects(objects: np.ndarray, size: int) -> np.ndarray:
    """(n, h, w) uint8 objects resized to (n, size, size) uint8, anti-aliased (`skimage.transform.resize`)."""
    from skimage.transform import resize

    n = len(objects)
    if objects.shape[1:] == (size, size):
        return objects
    out = resize(objects.astype(np.float32), (n, size, size), order=1, anti_aliasing=True, preserve_range=True)  # (n, s, s)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
