"""Sparse patch annotations: ``--instance-labels CSV`` → instance targets for training bags.

The CSV has one row per annotated tile: ``slide_id, x, y, label`` with ``(x, y)`` the tile's
top-left corner in level-0 pixels, exactly as in the feature file's ``coords``, and ``label``
0 (benign) or 1 (lesion). A tile is matched to its row of the bag by its coordinates.

Instance targets of a training bag (``(N,)`` long, see `instance_targets`):

* an annotated tile gets its label;
* every tile of a negative slide is a known negative (0): the standard MIL assumption;
* the other tiles of a positive slide are unannotated (-1). ``bce`` ignores them; ``ece``
  (exclusive cross-entropy, docs/stage-two.md) treats them as subsampled, focal-weighted background
  and drops the confident ones, which are likely unannotated lesion tiles.

Only the slides given are opened (a run passes its training and validation slides), so
annotations of test slides are never read; their rows are counted as unused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from mil.errors import ManifestError
from mil.features import read_bag

COLUMNS = ("slide_id", "x", "y", "label")


@dataclass(frozen=True)
class InstanceLabels:
    """Annotated tiles of the slides of a run.

    Attributes:
        by_slide: ``{slide_id: (index (K,) long, label (K,) long)}``, the rows of the bag's tiles.
        n_rows: rows in the CSV.
        n_unused: rows of slides outside this run (e.g. test slides), not opened.
    """

    by_slide: dict[str, tuple[Tensor, Tensor]]
    n_rows: int
    n_unused: int


def read_instance_labels(csv_path: str | Path, files: dict[str, Path], slide_labels: dict[str, int]) -> InstanceLabels:
    """Read and check the annotation CSV against the feature files of `files`.

    Args:
        csv_path: the annotation CSV (columns ``slide_id, x, y, label``; others are ignored).
        files: ``{slide_id: feature file}`` of the slides this run may open.
        slide_labels: ``{slide_id: 0 | 1}`` bag labels of those slides.

    Raises:
        ManifestError: one line naming the file (and CSV line) for a missing column, a label that
            is not 0/1, a coordinate that is not a tile of the slide's feature file, the same tile
            annotated twice with different labels, or a lesion tile in a negative slide.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise ManifestError(f"{path}: expected an instance-label CSV, got no such file; check --instance-labels.")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)  # raw text: errors quote the cell as written
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: expected a CSV with columns {', '.join(COLUMNS)}, got unreadable text ({e}).") from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(
            f"{path}: expected columns {', '.join(COLUMNS)}, got {', '.join(map(str, df.columns))} instead (missing {', '.join(missing)})."
        )
    for col in ("x", "y", "label"):
        values = pd.to_numeric(df[col], errors="coerce")
        bad = values.isna() | (values != values.round())
        if col == "label":
            bad |= ~values.isin([0, 1])
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            want = "0 or 1" if col == "label" else "an integer pixel coordinate"
            raise ManifestError(f"{path}, line {i + 2}: expected {col} to be {want}, got {df[col].iloc[i]!r} instead.")
        df[col] = values.astype(np.int64)

    used = df["slide_id"].isin(list(files))
    by_slide: dict[str, tuple[Tensor, Tensor]] = {}
    for sid, rows in df[used].groupby("slide_id", sort=False):
        coords = read_bag(files[sid]).coords  # (N, 2) level-0 top-left corners
        where = {(int(x), int(y)): n for n, (x, y) in enumerate(coords)}
        seen: dict[int, int] = {}  # tile index -> label
        for line, x, y, lab in zip(rows.index + 2, rows["x"], rows["y"], rows["label"]):
            n = where.get((int(x), int(y)))
            if n is None:
                raise ManifestError(
                    f"{path}, line {line}: expected (x, y) to be a tile of {files[sid]} (its level-0 coords), "
                    f"got ({x}, {y}) instead; annotate tiles by the coordinates in the feature file."
                )
            if n in seen and seen[n] != lab:
                raise ManifestError(
                    f"{path}, line {line}: expected one label per tile, got {lab} after {seen[n]} for ({x}, {y}) of {sid!r}."
                )
            if lab == 1 and int(slide_labels[sid]) == 0:
                raise ManifestError(
                    f"{path}, line {line}: expected no lesion tile in negative slide {sid!r}, got label 1 at ({x}, {y}); fix the slide or the tile label."
                )
            seen[n] = lab
        by_slide[str(sid)] = (torch.tensor(list(seen), dtype=torch.long), torch.tensor(list(seen.values()), dtype=torch.long))  # (K,), (K,)
    return InstanceLabels(by_slide, n_rows=len(df), n_unused=int((~used).sum()))


def instance_targets(ids: list[str], bag_labels: Tensor, mask: Tensor, annotations: InstanceLabels) -> Tensor:
    """Instance targets of a padded batch: 1 / 0 known, -1 unannotated (see the module docstring).

    Args:
        ids: the B slide ids of the batch.
        bag_labels: ``(B,)`` bag labels 0/1.
        mask: ``(B, N)`` bool, True = real instance.
        annotations: from `read_instance_labels`.

    Returns:
        ``(B, N)`` long; padded slots are -1.
    """
    targets = torch.full(mask.shape, -1, dtype=torch.long)  # (B, N)
    targets[bag_labels == 0] = 0  # (B, N) every tile of a negative slide
    for b, sid in enumerate(ids):
        if sid in annotations.by_slide:
            index, label = annotations.by_slide[sid]  # (K,), (K,)
            targets[b, index] = label
    return targets.masked_fill(~mask, -1)  # (B, N)
