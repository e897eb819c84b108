"""Reading feature files: one bag of instance features (and their tile coordinates) per slide.

Layouts accepted by `read_bag`, detected from the file's content (see docs/architecture.md,
"Feature file"):

===========  =====================================================================================
format       what identifies it
===========  =====================================================================================
``mil``      HDF5 written by `mil extract features` (or `mil extract import-csv`): ``features``
             (N, D) float32/float16, ``coords`` (N, 2) int64 with tiling attrs, file attrs
             including ``mil_version``.
``trident``  HDF5 from TRIDENT: ``coords`` int64 with ``level0_magnification`` /
             ``target_magnification`` / ``savetodir`` attrs, ``features.attrs['encoder']``.
``clam``     any other HDF5 with a ``features`` dataset, typically CLAM ``h5_files/<slide>.h5``
             (``coords`` int32, no attrs at all).
``pt``       ``.pt`` / ``.pth``: a (N, D) tensor (CLAM ``pt_files``, slideflow) or a dict with a
             ``features`` tensor and optional ``coords`` tensor. Always loaded with
             ``weights_only=True``: a feature file never gets to run code.
===========  =====================================================================================

A ``features`` dataset stored with a leading batch axis, (1, N, D), is squeezed to (N, D).

Errors are `FeatureFileError` (a `MilError` and `ValueError`): one line naming the file, what was
expected, what was found, and how to fix it. NaN/Inf values are *not* checked on read (that
would cost a pass over every bag on every read); call `check_finite` where it matters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mil.errors import FeatureFileError, OptionError

FEATURE_SUFFIXES = (".h5", ".hdf5", ".pt")
_PT_SUFFIXES = (".pt", ".pth")
# Coords attrs only TRIDENT writes; CLAM coordinate files use patch_level/downsample instead.
_TRIDENT_COORD_ATTRS = ("level0_magnification", "target_magnification", "savetodir")
# Dataset names other tools use for features, to point users at the right converter.
_OTHER_FEATURE_NAMES = {"feats": "STAMP", "patch_embeddings": "STAMP"}


@dataclass
class Bag:
    """One slide's instances, as read from a feature file.

    Attributes:
        features: (N, D) float32 or float16 as stored (or cast by ``read_bag(dtype=…)``); N may be 0.
        coords: (N, 2) int64 top-left (x, y) of each tile in level-0 px; all zeros when the file
            has no coordinates (``.pt`` files, some HDF5 files).
        attrs: file attrs merged with coords attrs (file attrs win on a clash) plus ``format``
            (``'mil'``, ``'clam'``, ``'trident'`` or ``'pt'``). Values are plain Python objects
            (numpy scalars → int/float, bytes → str, arrays → lists); JSON strings stay str.
        path: the file read.
    """

    features: np.ndarray
    coords: np.ndarray
    attrs: dict
    path: Path

    @property
    def slide_id(self) -> str:
        """``attrs['slide_id']`` when the file stores one, else the file name without suffix."""
        sid = self.attrs.get("slide_id")
        return str(sid) if sid not in (None, "") else self.path.stem

    @property
    def n_instances(self) -> int:
        """N, the number of instances (rows of `features`)."""
        return int(self.features.shape[0])

    @property
    def feature_dim(self) -> int:
        """D, the length of each instance's feature vector."""
        return int(self.features.shape[1])

    def __len__(self) -> int:
        return self.n_instances


# ----------------------------------------------------------------------------------------------
# public API


def read_bag(path: str | Path, *, dtype: Any = None, mmap: bool = False) -> Bag:
    """Read one feature file into a `Bag`, whatever its layout (mil, CLAM, TRIDENT, .pt).

    Args:
        path: an ``.h5``/``.hdf5`` (or any HDF5) file, or a ``.pt``/``.pth`` torch file.
        dtype: cast the features on read (e.g. ``np.float32``); None keeps the stored float
            type. Integer features are always returned as float32; bfloat16 tensors as float32
            (numpy has no bfloat16).
        mmap: memory-map ``.pt`` files instead of reading them (``torch.load(mmap=True)``);
            ignored for HDF5, which is read into memory.

    Returns:
        The bag: features (N, D), coords (N, 2) int64, merged attrs with ``format``.

    Raises:
        FeatureFileError: the file is missing, corrupt, or has no valid (N, D) features.
        OptionError: `dtype` is not a floating-point type.
    """
    path = Path(path)
    target = _check_dtype(dtype)
    _check_exists(path)
    if path.suffix.lower() in _PT_SUFFIXES:
        features, coords, attrs = _read_pt(path, mmap=mmap)
    else:
        features, coords, attrs = _read_h5(path, with_data=True)
    features = _as_float(features, target)
    return Bag(features=features, coords=coords, attrs=attrs, path=path)


def read_bag_attrs(path: str | Path) -> dict:
    """The attrs `read_bag` would return, plus ``n_instances`` and ``feature_dim``, without reading features.

    For HDF5 files only metadata is read (shapes, dtypes, attrs), so this is cheap on any size
    of bag. ``.pt`` files are memory-mapped where torch allows it. The same layout checks as
    `read_bag` apply, except those that need the values (coords integrality).

    Raises:
        FeatureFileError: as `read_bag`.
    """
    path = Path(path)
    _check_exists(path)
    if path.suffix.lower() in _PT_SUFFIXES:
        features, _, attrs = _read_pt(path, mmap=True)
        n, d = features.shape
    else:
        (n, d), _, attrs = _read_h5(path, with_data=False)
    return attrs | {"n_instances": int(n), "feature_dim": int(d)}


def check_finite(bag: Bag) -> None:
    """Raise `FeatureFileError` if any feature value is NaN or ±Inf.

    Raises:
        FeatureFileError: naming the file, the number of non-finite values and the first bad row.
    """
    bad = ~np.isfinite(bag.features)  # (N, D) bool
    n_bad = int(bad.sum())
    if n_bad:
        first_row = int(np.argmax(bad.any(axis=1)))
        raise FeatureFileError(
            f"{bag.path}: expected finite feature values, got {n_bad} NaN/Inf value(s) of {bag.features.size} "
            f"(first in row {first_row}) instead; re-extract this slide's features or drop it from the manifest."
        )


# ----------------------------------------------------------------------------------------------
# HDF5


def _read_h5(path: Path, *, with_data: bool) -> tuple[Any, np.ndarray | None, dict]:
    """Validate an HDF5 feature file; return (features or their (N, D) shape, coords or None, attrs)."""
    try:
        is_h5 = h5py.is_hdf5(str(path))
    except OSError as e:  # unreadable (permissions, a folder …)
        raise FeatureFileError(f"{path}: expected a readable HDF5 feature file, could not read it: {_one_line(e)}.") from None
    if not is_h5:
        hint = " (it looks like a torch file: rename it to .pt)" if _is_zip(path) else ""
        raise FeatureFileError(
            f"{path}: expected an HDF5 feature file (or a .pt file), got a file that is not HDF5{hint}; "
            "re-create it with `mil extract features`."
        )
    try:
        with h5py.File(path, "r") as f:
            feats, coords_ds = _h5_datasets(f, path)
            shape, squeeze = _features_shape(feats.shape, path)
            _check_numeric(feats.dtype, path)
            coords_shape = _coords_shape(coords_ds, shape[0], path) if coords_ds is not None else None
            attrs = _h5_attrs(f, feats, coords_ds)
            if not with_data:
                return shape, None, attrs
            features = feats[()]  # (N, D) or (1, N, D)
            features = features[0] if squeeze else features  # (N, D)
            if coords_ds is None:
                coords = np.zeros((shape[0], 2), dtype=np.int64)  # (N, 2) placeholder: no coords stored
            else:
                coords = _coords_values(coords_ds[()].reshape(coords_shape), path)  # (N, 2) int64
            return features, coords, attrs
    except FeatureFileError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:  # h5py's ways of saying corrupt/truncated
        raise FeatureFileError(
            f"{path}: expected a complete HDF5 feature file, could not read it ({_one_line(e)}); "
            "the file is probably truncated or corrupt: delete it and re-run `mil extract features`."
        ) from None


def _h5_datasets(f: h5py.File, path: Path) -> tuple[h5py.Dataset, h5py.Dataset | None]:
    """The `features` dataset and the `coords` dataset (or None), with clear errors when absent."""
    obj = f.get("features")
    if not isinstance(obj, h5py.Dataset):
        found = sorted(map(str, f.keys()))
        if obj is not None:
            got = "a group named 'features'"
        elif "coords" in f:
            raise FeatureFileError(
                f"{path}: expected a 'features' dataset, got a file that has coords but no features: run `mil extract features` first."
            )
        else:
            got = f"datasets {found}" if found else "an empty file"
        tools = [f"a {tool} file ('{k}' dataset)" for k, tool in _OTHER_FEATURE_NAMES.items() if k in f]
        hint = (
            f"; this looks like {tools[0]}: rename that dataset to 'features' (and give coords in level-0 px)"
            if tools
            else "; write features as an (N, D) dataset named 'features' (CLAM/TRIDENT layout)"
        )
        raise FeatureFileError(f"{path}: expected an (N, D) dataset named 'features', got {got} instead{hint}.")
    # `f["coords"]`, not `f.get`: get() returns None for an object whose header fails its checksum
    coords = f["coords"] if "coords" in f else None
    if coords is not None and not isinstance(coords, h5py.Dataset):
        raise FeatureFileError(f"{path}: expected 'coords' to be an (N, 2) dataset, got a group instead; rewrite the file.")
    return obj, coords


def _features_shape(shape: tuple, path: Path) -> tuple[tuple[int, int], bool]:
    """(N, D) and whether a leading batch axis of 1 must be squeezed."""
    if len(shape) == 3 and shape[0] == 1:  # some tools keep a batch axis: (1, N, D)
        return (int(shape[1]), int(shape[2])), True
    if len(shape) != 2:
        raise FeatureFileError(
            f"{path}: expected 'features' of shape (N, D) (or (1, N, D)), got shape {tuple(shape)} instead; store one row per instance."
        )
    return (int(shape[0]), int(shape[1])), False


def _coords_shape(coords: h5py.Dataset, n: int, path: Path) -> tuple[int, int]:
    """Validate the coords dataset's shape and dtype against N; return (N, 2)."""
    shape = tuple(coords.shape)
    if len(shape) == 3 and shape[0] == 1:  # batch axis, as for features
        shape = shape[1:]
    if len(shape) != 2 or shape[1] != 2:
        raise FeatureFileError(
            f"{path}: expected 'coords' of shape (N, 2) with (x, y) per instance, got shape {tuple(coords.shape)} instead; "
            "rewrite the coords or delete the dataset."
        )
    if shape[0] != n:
        raise FeatureFileError(
            f"{path}: expected as many coords rows as features rows ({n}), got {shape[0]} instead; "
            "the file was written inconsistently: re-extract this slide."
        )
    if coords.dtype.kind not in "iuf":
        raise FeatureFileError(
            f"{path}: expected numeric 'coords' (integer level-0 px), got dtype {coords.dtype} instead; rewrite the coords."
        )
    return (int(shape[0]), 2)


def _coords_values(coords: np.ndarray, path: Path) -> np.ndarray:
    """(N, 2) coords of any numeric dtype → int64, refusing non-integral floats (µm, not px)."""
    if coords.dtype.kind == "f":
        if not (np.all(np.isfinite(coords)) and np.array_equal(coords, np.round(coords))):
            raise FeatureFileError(
                f"{path}: expected integer level-0 pixel 'coords', got non-integral {coords.dtype} values instead "
                "(µm coordinates?); convert them to level-0 px."
            )
    if coords.size and coords.dtype.kind in "fu" and float(np.abs(coords).max()) >= 2.0**62:  # would wrap around in int64
        raise FeatureFileError(
            f"{path}: expected level-0 pixel 'coords', got values up to {float(np.abs(coords).max()):g} instead; rewrite the coords."
        )
    return coords.astype(np.int64, copy=False)  # CLAM stores int32


def _h5_attrs(f: h5py.File, feats: h5py.Dataset, coords: h5py.Dataset | None) -> dict:
    """Merged attrs (coords attrs, then file attrs on top) and the detected format."""
    file_attrs = _plain(f.attrs)
    coord_attrs = _plain(coords.attrs) if coords is not None else {}
    feat_attrs = _plain(feats.attrs)
    attrs = coord_attrs | file_attrs
    if "encoder" not in attrs and "encoder" in feat_attrs:  # TRIDENT names the encoder on features only
        attrs["encoder"] = feat_attrs["encoder"]
    if "mil_version" in file_attrs:
        fmt = "mil"
    elif any(k in coord_attrs for k in _TRIDENT_COORD_ATTRS) or "encoder" in feat_attrs:
        fmt = "trident"
    else:
        fmt = "clam"
    attrs["format"] = fmt
    return attrs


def _check_numeric(dtype: np.dtype, path: Path) -> None:
    """Refuse strings, compound, bool or complex features (integers are accepted, read as float32)."""
    if dtype.kind not in "fiu":
        raise FeatureFileError(
            f"{path}: expected numeric 'features' (float32 or float16), got dtype {dtype} instead; re-extract the features."
        )


def _plain(attrs: h5py.AttributeManager) -> dict:
    """h5py attrs as plain Python values (JSON-friendly), skipping those of a type h5py cannot map
    (an OSError — HDF5 could not read the bytes: corruption — propagates to the caller)."""
    out = {}
    for key in attrs.keys():
        try:
            value = attrs[key]
        except (TypeError, ValueError):  # an attr type h5py cannot map; not worth failing the read
            continue
        out[key] = _plain_value(value)
    return out


def _plain_value(value: Any) -> Any:
    if isinstance(value, h5py.Empty):
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        return [_plain_value(v) for v in value.tolist()] if value.dtype.kind in "SO" else value.tolist()
    if isinstance(value, np.generic):
        return _plain_value(value.item())
    return value


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"PK\x03\x04"


# ----------------------------------------------------------------------------------------------
# .pt


def _read_pt(path: Path, *, mmap: bool) -> tuple[np.ndarray, np.ndarray, dict]:
    """Load a torch feature file (weights_only, always); return (features, coords, attrs)."""
    import pickle

    import torch  # only .pt files pay for importing torch here

    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if not mmap or "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format cannot be mapped
    except pickle.UnpicklingError as e:
        # "Unsupported global: GLOBAL x.y was not an allowed global …", or for blocked modules (os, posix,
        # subprocess …) "Trying to load unsupported GLOBAL posix.system whose module posix is blocked".
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        if m:
            raise FeatureFileError(
                f"{path}: expected a tensor (or a dict of tensors), got a pickled object of type {m.group(1)} instead, "
                "which weights_only loading refuses (it could run code); re-save the features with "
                "torch.save(features_tensor, path)."
            ) from None
        raise FeatureFileError(
            f"{path}: expected a torch feature file, could not unpickle it ({pickle_reason(e)}); "
            "the file is corrupt or not a torch file: re-create it."
        ) from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - torch's unpickler fails on bad bytes with any of a dozen types (IndexError, EOFError …)
        raise FeatureFileError(
            f"{path}: expected a complete torch feature file, could not read it ({_first_sentence(e)}); "
            "the file is probably truncated or corrupt: re-create it."
        ) from None

    attrs: dict = {}
    coords_t = None
    if isinstance(obj, torch.Tensor):
        feats_t = obj
    elif isinstance(obj, dict) and isinstance(obj.get("features"), torch.Tensor):
        feats_t = obj["features"]
        coords_t = obj.get("coords")
        if coords_t is not None and not isinstance(coords_t, torch.Tensor):
            raise FeatureFileError(
                f"{path}: expected 'coords' to be an (N, 2) tensor, got {type(coords_t).__name__} instead; "
                "save coords as a tensor or leave them out."
            )
        # Scalar metadata stored beside the tensors (slide_id, encoder …) becomes attrs.
        attrs = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, (str, int, float, bool))}
    else:
        got = f"a dict with keys {sorted(map(str, obj))}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise FeatureFileError(
            f"{path}: expected an (N, D) tensor or a dict with a 'features' tensor, got {got} instead; "
            "re-save the features with torch.save(features_tensor, path)."
        )
    if feats_t.dtype == torch.bfloat16:  # numpy has no bfloat16
        feats_t = feats_t.float()
    (n, _), squeeze = _features_shape(tuple(feats_t.shape), path)
    features = feats_t.detach().numpy()  # (N, D) or (1, N, D); shares memory (mmap) when possible
    _check_numeric(features.dtype, path)
    features = features[0] if squeeze else features  # (N, D)
    if coords_t is None:
        coords = np.zeros((n, 2), dtype=np.int64)  # (N, 2) placeholder: no coords stored
    else:
        if coords_t.dtype == torch.bfloat16:  # numpy has no bfloat16
            coords_t = coords_t.double()
        c = coords_t.detach().numpy()
        c = c[0] if c.ndim == 3 and c.shape[0] == 1 else c
        if c.ndim != 2 or c.shape[1] != 2 or c.dtype.kind not in "iuf":
            raise FeatureFileError(
                f"{path}: expected 'coords' of shape (N, 2) with (x, y) per instance, got shape {tuple(coords_t.shape)} "
                f"dtype {coords_t.dtype} instead; rewrite the coords or leave them out."
            )
        if c.shape[0] != n:
            raise FeatureFileError(
                f"{path}: expected as many coords rows as features rows ({n}), got {c.shape[0]} instead; "
                "the file was written inconsistently: re-create it."
            )
        coords = _coords_values(c, path)  # (N, 2) int64
    attrs["format"] = "pt"
    return features, coords, attrs


def pickle_reason(e: Exception) -> str:
    """Why weights_only unpickling refused a file, in one line."""
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", str(e), flags=re.S)
    return _one_line(m.group(1)) if m else _first_sentence(e)


def _first_sentence(e: BaseException) -> str:
    """torch's messages run to a paragraph; the first sentence says what went wrong."""
    return _one_line(e).split(". ")[0][:200]


# ----------------------------------------------------------------------------------------------
# helpers


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise FeatureFileError(
            f"expected a feature file ({', '.join(FEATURE_SUFFIXES)}), got {str(path)!r} which does not exist; "
            "check the path or run `mil extract features` first."
        )
    if path.is_dir():
        raise FeatureFileError(
            f"expected a feature file ({', '.join(FEATURE_SUFFIXES)}), got {str(path)!r} which is a folder; pass one file per slide."
        )


def _check_dtype(dtype: Any) -> np.dtype | None:
    if dtype is None:
        return None
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.kind != "f":
        raise OptionError(f"expected dtype to be a floating-point type such as np.float32, got {dtype!r} instead.")
    return dt


def _as_float(features: np.ndarray, target: np.dtype | None) -> np.ndarray:
    """Features as stored (float) or cast to `target`; integer features become float32."""
    if features.dtype.kind not in "fiu":
        raise FeatureFileError(f"expected numeric features, got dtype {features.dtype} instead.")  # unreachable guard
    if target is None:
        target = features.dtype if features.dtype.kind == "f" else np.dtype(np.float32)
    with np.errstate(over="ignore"):  # beyond the target's range becomes ±inf, which `check_finite` refuses
        return features.astype(target, copy=False)


def _one_line(e: BaseException | str) -> str:
    """An exception's message on one line (h5py and torch messages span several)."""
    return " ".join(str(e).split()).rstrip(".")
