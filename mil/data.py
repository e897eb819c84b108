"""The bag data contract shared by training and evaluation: feature files → bags → padded batches.

* `resolve_feature_files` maps a manifest's slides to their feature files and checks, from the
  files' attrs only (cheap), that every slide has one and that all were made the same way
  (`FeatureSpec`: encoder, feature dim, target mpp, patch size, encoder weights).
* `BagDataset` serves one bag per item. ``cache='ram'`` reads every bag once and keeps it as a
  float16 tensor; ``cache='stream'`` reads the HDF5/.pt file on every access and keeps nothing,
  so peak memory does not grow with the number of slides; ``cache='auto'`` picks ``ram`` when the
  float16 bags fit in ``max_ram_gb``.
* `collate_bags` pads a list of bags to ``(B, Nmax, D)`` with a mask (True = real instance),
  the layout every head accepts (see docs/architecture.md, "Bags in code").
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from mil.bags import BagError
from mil.errors import OptionError
from mil.features import (
    FEATURE_SUFFIXES,
    FeatureFileError,
    check_finite,
    read_bag,
    read_bag_attrs,
)

CACHE_MODES = ("auto", "ram", "stream")
_FP16_BYTES = 2
_FP16_MAX = float(np.finfo(np.float16).max)
_MAX_LISTED = 10  # slide ids named in one error message before "… and K more"
_REL_TOL = 1e-6  # float attrs (target_mpp) compared with this relative tolerance


@dataclass(frozen=True)
class FeatureSpec:
    """What must agree across all bags of one run (and between a checkpoint and its inputs).

    Attributes:
        encoder: encoder name (``'unknown'`` when the file does not say).
        feature_dim: D, the length of each instance's feature vector.
        target_mpp: microns per pixel the tiles were read at, or None when unknown.
        patch_size: tile side in pixels at `target_mpp`, or None when unknown.
        weights_sha256: hash of the encoder weights (``'unknown'`` when the file does not say).
    """

    encoder: str
    feature_dim: int
    target_mpp: float | None
    patch_size: int | None
    weights_sha256: str

    @classmethod
    def from_attrs(cls, attrs: dict) -> FeatureSpec:
        """Build the spec from `mil.features.read_bag_attrs` output; missing attrs → None / ``'unknown'``."""
        encoder = attrs.get("encoder")
        sha = attrs.get("encoder_weights_sha256")
        mpp = attrs.get("target_mpp")
        patch = attrs.get("patch_size")
        return cls(
            encoder=str(encoder) if encoder not in (None, "") else "unknown",
            feature_dim=int(attrs["feature_dim"]),
            target_mpp=float(mpp) if mpp is not None else None,
            patch_size=int(patch) if patch is not None else None,
            weights_sha256=str(sha) if sha not in (None, "") else "unknown",
        )

    def as_dict(self) -> dict:
        """The spec as a JSON-friendly dict (for config.json and checkpoints)."""
        return asdict(self)

    def first_difference(self, other: FeatureSpec) -> tuple[str, Any, Any] | None:
        """``(attribute, self's value, other's value)`` for the first attribute that differs, else None.

        Floats (``target_mpp``) are compared with a small relative tolerance.
        """
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, float) and isinstance(b, float):
                if math.isclose(a, b, rel_tol=_REL_TOL):
                    continue
            elif a == b:
                continue
            return f.name, a, b
        return None


def _list_ids(ids: Sequence[str]) -> str:
    shown = ", ".join(ids[:_MAX_LISTED])
    return shown + (f" … and {len(ids) - _MAX_LISTED} more" if len(ids) > _MAX_LISTED else "")


def _find_feature_file(feature_dir: Path, slide_id: str) -> Path | None:
    for suffix in FEATURE_SUFFIXES:
        p = feature_dir / f"{slide_id}{suffix}"
        if p.is_file():
            return p
    return None


def resolve_feature_files(slides: pd.DataFrame, feature_dir: str | Path) -> tuple[dict[str, Path], FeatureSpec]:
    """Find each slide's feature file and check all files were made with the same settings.

    Only file metadata is read (`read_bag_attrs`), so this is cheap on any cohort size.

    Args:
        slides: a table with a ``slide_id`` column (e.g. from `mil.manifest.read_manifest`).
        feature_dir: folder holding ``<slide_id>.h5`` (or ``.hdf5`` / ``.pt``) per slide.

    Returns:
        ``{slide_id: path}`` in the table's order, and the `FeatureSpec` shared by all files.

    Raises:
        FeatureFileError: the folder is missing; some slides have no feature file (all of them are
            listed in one message); a file is unreadable; or a file's spec differs from the first
            file's (naming the attribute and both values).
        OptionError: `slides` has no ``slide_id`` column or no rows.
    """
    feature_dir = Path(feature_dir)
    if "slide_id" not in getattr(slides, "columns", ()):
        raise OptionError(f"expected a slides table with a 'slide_id' column, got columns {list(getattr(slides, 'columns', []))} instead.")
    ids = [str(s) for s in slides["slide_id"]]
    if not ids:
        raise OptionError("expected at least one slide to find feature files for, got an empty table instead.")
    if not feature_dir.is_dir():
        raise FeatureFileError(
            f"expected a folder of feature files, got {str(feature_dir)!r} which is not a folder; "
            "run `mil extract features` first or fix the features path."
        )

    files: dict[str, Path] = {}
    missing: list[str] = []
    for sid in ids:
        p = _find_feature_file(feature_dir, sid)
        if p is None:
            missing.append(sid)
        else:
            files[sid] = p
    if missing:
        raise FeatureFileError(
            f"{len(missing)} slide(s) have no feature file in {feature_dir}: {_list_ids(missing)} "
            f"(expected <slide_id>{' or '.join(FEATURE_SUFFIXES)}); run `mil extract features` first."
        )

    spec: FeatureSpec | None = None
    first: Path | None = None
    for p in files.values():
        s = FeatureSpec.from_attrs(read_bag_attrs(p))
        if spec is None:
            spec, first = s, p
            continue
        diff = spec.first_difference(s)
        if diff is not None:
            name, a, b = diff
            raise FeatureFileError(
                f"{p}: expected {name}={a!r} like {first.name} (the first feature file), got {name}={b!r} instead; "
                "features made with different settings cannot be mixed in one run: re-extract them with the same settings."
            )
    assert spec is not None
    return files, spec


class BagDataset(torch.utils.data.Dataset):
    """One bag per item: ``(X (N, D) float32, label, slide_id)``.

    Args:
        files: one feature file per bag.
        labels: one integer label per file.
        cache: ``'ram'`` reads every bag once and keeps it as a float16 tensor; ``'stream'`` reads
            the file on every access and keeps nothing; ``'auto'`` picks ``'ram'`` when the total
            float16 size (sum of N*D*2 bytes, from the files' metadata) is at most `max_ram_gb`.
        max_ram_gb: the RAM budget for ``'auto'`` in GiB.
        slide_ids: one id per file; defaults to the file names without suffix.

    Attributes:
        cache_mode: ``'ram'`` or ``'stream'``, the mode in use.
        files, labels, slide_ids: the bags kept (empty bags removed).
        skipped_empty: slide ids of bags with no instance (N = 0), left out with a warning.
        feature_dim: D, shared by all bags.
        nbytes_fp16: total size of the kept bags as float16, in bytes.

    Raises:
        OptionError: bad `cache` / `max_ram_gb`, lengths of `files`, `labels`, `slide_ids` differ,
            a label is not an integer, or no bag is left.
        FeatureFileError: a file is unreadable, bags have different D, or (``'ram'`` mode, at
            construction; ``'stream'`` mode, on access) a bag holds NaN/Inf.
    """

    def __init__(
        self,
        files: Sequence[str | Path],
        labels: Sequence[int] | np.ndarray,
        *,
        cache: str = "auto",
        max_ram_gb: float = 4.0,
        slide_ids: Sequence[str] | None = None,
    ) -> None:
        if cache not in CACHE_MODES:
            raise OptionError(f"expected cache to be one of {', '.join(CACHE_MODES)}, got {cache!r} instead.")
        if not (isinstance(max_ram_gb, (int, float)) and math.isfinite(max_ram_gb) and max_ram_gb >= 0):
            raise OptionError(f"expected max_ram_gb to be a finite number >= 0, got {max_ram_gb!r} instead.")
        files = [Path(f) for f in files]
        labels = list(labels)
        if len(labels) != len(files):
            raise OptionError(f"expected one label per feature file ({len(files)}), got {len(labels)} labels instead.")
        slide_ids = [p.stem for p in files] if slide_ids is None else [str(s) for s in slide_ids]
        if len(slide_ids) != len(files):
            raise OptionError(f"expected one slide id per feature file ({len(files)}), got {len(slide_ids)} ids instead.")
        int_labels = [_as_int_label(v, sid) for v, sid in zip(labels, slide_ids)]

        sizes: list[int] = []
        dims: list[int] = []
        for p in files:
            a = read_bag_attrs(p)
            sizes.append(int(a["n_instances"]))
            dims.append(int(a["feature_dim"]))
        empty = [i for i, n in enumerate(sizes) if n == 0]
        self.skipped_empty: list[str] = [slide_ids[i] for i in empty]
        if empty:
            warnings.warn(
                f"{len(empty)} bag(s) have no instance and are left out: {_list_ids(self.skipped_empty)}; "
                "check their tissue detection or drop them from the manifest.",
                stacklevel=2,
            )
        keep = [i for i, n in enumerate(sizes) if n > 0]
        if not keep:
            raise OptionError(f"expected at least one non-empty bag, got {len(files)} file(s) all empty or none at all.")
        self.files: list[Path] = [files[i] for i in keep]
        self.labels: list[int] = [int_labels[i] for i in keep]
        self.slide_ids: list[str] = [slide_ids[i] for i in keep]
        self._sizes: list[int] = [sizes[i] for i in keep]
        kept_dims = [dims[i] for i in keep]
        self.feature_dim: int = kept_dims[0]
        for i, d in zip(keep, kept_dims):
            if d != self.feature_dim:
                raise FeatureFileError(
                    f"{files[i]}: expected feature_dim={self.feature_dim} like {self.files[0].name}, got {d} instead; "
                    "bags of one run must come from the same encoder."
                )
        self.nbytes_fp16: int = sum(n * self.feature_dim * _FP16_BYTES for n in self._sizes)
        if cache == "auto":
            cache = "ram" if self.nbytes_fp16 <= max_ram_gb * 1024**3 else "stream"
        self.cache_mode: str = cache
        self._cache: list[Tensor] | None = self._load_all() if cache == "ram" else None

    def _load_all(self) -> list[Tensor]:
        """Read every bag once into one float16 buffer ``(ΣN, D)``; keep a view per bag.

        One allocation up front: per-bag float16 copies beside each bag's float32 read fragment the
        heap (measured: 28 % above the cache size at 400 bags of 5,000 × 1024).
        """
        buffer = torch.empty((sum(self._sizes), self.feature_dim), dtype=torch.float16)  # (ΣN, D)
        views: list[Tensor] = []
        start = 0
        for p, n in zip(self.files, self._sizes):
            bag = read_bag(p)
            check_finite(bag)
            view = buffer[start : start + n]  # (N, D) float16 view
            view.copy_(torch.from_numpy(np.ascontiguousarray(bag.features)))  # (N, D) cast in place
            if bool(torch.isinf(view).any()):  # finite before the cast: beyond float16's range
                raise FeatureFileError(
                    f"{p}: expected feature values within float16 range (|x| <= {_FP16_MAX:g}) to keep them in RAM, "
                    f"got values up to {float(np.abs(bag.features).max()):g} instead; use --cache stream (cache='stream')."
                )
            views.append(view)
            start += n
        return views

    def subset(self, slide_ids: Sequence[str]) -> BagDataset:
        """The bags of `slide_ids`, in that order, sharing this dataset's RAM cache: nothing is read again.

        Ids of bags this dataset left out as empty are skipped (they were warned about once).
        The folds of a run are subsets of one dataset, so a bag is read once per run, not once per fold.
        """
        index = {s: i for i, s in enumerate(self.slide_ids)}
        unknown = [s for s in slide_ids if s not in index and s not in self.skipped_empty]
        if unknown:
            raise OptionError(f"expected slide ids of this dataset, got {_list_ids(unknown)} instead.")
        keep = [index[s] for s in slide_ids if s in index]
        if not keep:
            raise OptionError(f"expected at least one non-empty bag, got {len(slide_ids)} id(s) all empty or none at all.")
        sub = copy.copy(self)
        sub.files = [self.files[i] for i in keep]
        sub.labels = [self.labels[i] for i in keep]
        sub.slide_ids = [self.slide_ids[i] for i in keep]
        sub._sizes = [self._sizes[i] for i in keep]
        sub._cache = None if self._cache is None else [self._cache[i] for i in keep]
        sub.skipped_empty = [s for s in slide_ids if s in set(self.skipped_empty)]
        sub.nbytes_fp16 = sum(n * self.feature_dim * _FP16_BYTES for n in sub._sizes)
        return sub

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int, str]:
        """Bag `i` as ``(X (N, D) float32, label, slide_id)``."""
        if self._cache is not None:
            x = self._cache[i].float()  # (N, D) float32 copy of the float16 cache
        else:
            bag = read_bag(self.files[i], dtype=np.float32)
            check_finite(bag)
            x = torch.from_numpy(np.ascontiguousarray(bag.features))  # (N, D) float32
        return x, self.labels[i], self.slide_ids[i]

    @property
    def n_instances(self) -> list[int]:
        """N of each kept bag, from the files' metadata."""
        return list(self._sizes)


def feature_stats(ds: BagDataset) -> tuple[Tensor, Tensor]:
    """Per-feature mean and standard deviation over every instance of `ds` (one bag in memory at a time).

    Returns:
        ``mean (D,)`` and ``std (D,)`` float32; a constant feature gets std 1 (it is only centred).
    """
    total = torch.zeros(ds.feature_dim, dtype=torch.float64)  # (D,)
    total_sq = torch.zeros(ds.feature_dim, dtype=torch.float64)  # (D,)
    n = 0
    for i in range(len(ds)):
        X = ds[i][0].double()  # (N, D)
        total += X.sum(0)
        total_sq += (X * X).sum(0)
        n += X.shape[0]
    mean = total / n  # (D,)
    var = (total_sq / n - mean * mean).clamp_min(0.0)  # (D,)
    std = var.sqrt()  # (D,)
    std = torch.where(std > 1e-6 * (1.0 + mean.abs()), std, torch.ones_like(std))  # (D,)
    return mean.float(), std.float()


def _as_int_label(value: Any, slide_id: str) -> int:
    try:
        missing = value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))
    except TypeError:
        missing = False
    if missing:
        raise OptionError(f"expected an integer label for slide {slide_id!r}, got an empty label instead; label it or leave it out.")
    try:
        as_int = int(value)
    except (TypeError, ValueError):
        raise OptionError(f"expected an integer label for slide {slide_id!r}, got {value!r} instead.") from None
    if as_int != value:
        raise OptionError(f"expected an integer label for slide {slide_id!r}, got {value!r} instead.")
    return as_int


def collate_bags(batch: Sequence[tuple[Tensor, int, str]]) -> tuple[Tensor, Tensor, Tensor, list[str]]:
    """Pad bags of different sizes into one batch.

    Args:
        batch: items of `BagDataset`: ``(X (N_i, D), label, slide_id)``.

    Returns:
        ``X`` (B, Nmax, D) float32, zero where padded; ``mask`` (B, Nmax) bool, True = real
        instance; ``labels`` (B,) float32; ``ids`` the B slide ids.

    Raises:
        BagError (a ValueError): empty batch, a bag that is not an (N, D) real-valued tensor, or
            bags with different D.
    """
    if len(batch) == 0:
        raise BagError("expected at least one bag to collate, got an empty batch instead.")
    for x, _, sid in batch:
        if not isinstance(x, Tensor) or x.ndim != 2 or x.is_complex():
            got = f"shape {tuple(x.shape)} dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
            raise BagError(f"expected bag {sid!r} to be an (N, D) real-valued tensor, got {got} instead.")
    d = int(batch[0][0].shape[1])
    for x, _, sid in batch:
        if x.shape[1] != d:
            raise BagError(f"expected bag {sid!r} of shape (N, {d}) like the first bag, got shape {tuple(x.shape)} instead.")
    n_max = max(int(x.shape[0]) for x, _, _ in batch)
    b = len(batch)
    if b == 1:  # one bag (MIL's usual batch): nothing to pad, no zero-filled copy of the whole bag
        X = batch[0][0].to(torch.float32).unsqueeze(0)  # (1, N, D)
        mask = torch.ones(1, n_max, dtype=torch.bool)  # (1, N)
    else:
        X = torch.zeros(b, n_max, d, dtype=torch.float32)  # (B, Nmax, D)
        mask = torch.zeros(b, n_max, dtype=torch.bool)  # (B, Nmax)
        for i, (x, _, _) in enumerate(batch):
            n = int(x.shape[0])
            X[i, :n] = x
            mask[i, :n] = True
    labels = torch.tensor([float(y) for _, y, _ in batch], dtype=torch.float32)  # (B,)
    ids = [sid for _, _, sid in batch]
    return X, mask, labels, ids
