"""Train / validation / test splits at patient level.

Two ways, both returning a list of `Fold`:

- the manifest's ``split`` column (``train``/``val``/``test``); when it names no ``val`` slides,
  a validation set is carved from the training slides;
- stratified K-fold cross-validation repeated R times (`folds`, `repeats`): every labelled slide
  is held out exactly once per repeat, and each fold's validation set is carved from its
  training slides only.

Stratification is over the label's classes, two or more (multi-class labels 0..C-1 stratify
the same way). Slides of one patient always stay together (scikit-learn's `StratifiedGroupKFold`, grouped by
``patient_id``, or by ``slide_id`` where no patient is given), so no patient can leak between
sets; `Fold.__post_init__` checks this for every fold it builds. Model selection uses ``val``
only; ``test`` is for `mil evaluate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from mil.errors import ManifestError, OptionError

SETS = ("train", "val", "test")


@dataclass(frozen=True)
class Fold:
    """One split of the slides. `name` is ``split`` (manifest column) or ``r<repeat>f<fold>``."""

    name: str
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]

    def __post_init__(self) -> None:
        a, b, c = set(self.train), set(self.val), set(self.test)
        if a & b or a & c or b & c:
            raise RuntimeError(f"fold {self.name}: a slide is in two sets")  # a bug, not a user mistake


def _groups(slides: pd.DataFrame) -> np.ndarray:
    """Patient id per slide; a slide without one is its own patient."""
    pid = slides["patient_id"].astype(str)
    return np.where(pid != "", pid, "slide:" + slides["slide_id"].astype(str))


def _carve(slides: pd.DataFrame, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split row positions of `slides` into (rest, val), stratified by label, grouped by patient."""
    n_splits = max(2, int(round(1 / fraction)))
    y = slides["label"].to_numpy(dtype=int)
    groups = _groups(slides)
    if len(np.unique(groups)) < n_splits:
        raise OptionError(
            f"expected at least {n_splits} patients to carve a validation set of {fraction:.0%}, "
            f"got {len(np.unique(groups))} instead; add slides or give a 'val' split in the manifest."
        )
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    try:
        rest, val = next(sgkf.split(np.zeros(len(y)), y, groups))
    except ValueError:  # scikit-learn: every label has fewer slides than n_splits
        raise OptionError(
            f"expected at least {n_splits} training slides of one label to carve a validation set of {fraction:.0%}, "
            f"got {_counts(y)} (label: slides); add slides, raise --val-fraction or give a 'val' split in the manifest."
        ) from None
    return rest, val


def _counts(y: np.ndarray) -> str:
    values, counts = np.unique(y, return_counts=True)
    return ", ".join(f"{int(v)}: {int(c)}" for v, c in zip(values, counts))


def _ids(slides: pd.DataFrame, rows: np.ndarray) -> tuple[str, ...]:
    return tuple(slides["slide_id"].iloc[np.sort(rows)])


def make_splits(
    slides: pd.DataFrame, *, folds: int | None = None, repeats: int = 1, val_fraction: float = 0.2, seed: int = 0
) -> list[Fold]:
    """Build the folds of a run.

    Args:
        slides: a validated manifest table (`mil.manifest.read_manifest`); rows without a label
            are ignored.
        folds: K for stratified K-fold cross-validation; None = use the ``split`` column.
        repeats: R, how many times K-fold is repeated with different shuffles.
        val_fraction: share of the training patients carved out for validation.
        seed: seeds the shuffles (recorded in the run's config).

    Raises:
        ManifestError: no ``split`` column values and no `folds`, or no training slides.
        OptionError: options out of range, or too few patients for the requested split.
    """
    if not (0 < val_fraction < 1):
        raise OptionError(f"expected --val-fraction in (0, 1), got {val_fraction!r} instead.")
    if repeats < 1 or (folds is not None and folds < 2):  # checked with or without --folds: a bad value is never ignored
        raise OptionError(f"expected --folds >= 2 and --repeats >= 1, got folds={folds!r}, repeats={repeats!r} instead.")
    slides = slides[slides["label"].notna()].reset_index(drop=True)
    if slides.empty:
        raise ManifestError(
            "expected slide labels (0/1, or 0..C-1) in the manifest's 'label' column for training, found none; label the slides."
        )
    if folds is None:
        split = slides["split"].astype(str)
        if not (split == "train").any():
            raise ManifestError(
                "expected the manifest's 'split' column to name 'train' slides, found none; "
                "fill the column or use --folds K for cross-validation."
            )
        train = slides[split == "train"].reset_index(drop=True)
        if (split == "val").any():
            val_ids = _ids(slides, np.flatnonzero(split == "val"))
            train_ids = tuple(train["slide_id"])
        else:
            rest, val = _carve(train, val_fraction, seed)
            train_ids, val_ids = _ids(train, rest), _ids(train, val)
        return [Fold("split", train_ids, val_ids, _ids(slides, np.flatnonzero(split == "test")))]

    if folds < 2 or repeats < 1:
        raise OptionError(f"expected --folds >= 2 and --repeats >= 1, got folds={folds!r}, repeats={repeats!r} instead.")
    y = slides["label"].to_numpy(dtype=int)
    groups = _groups(slides)
    if len(np.unique(groups)) < folds:
        raise OptionError(f"expected at least {folds} patients for {folds}-fold cross-validation, got {len(np.unique(groups))} instead.")
    if np.bincount(y, minlength=2).max() < folds:  # scikit-learn's own check, as a one-line error
        raise OptionError(
            f"expected at least {folds} slides of a label for {folds}-fold cross-validation, got {_counts(y)}; add slides or lower --folds."
        )
    out = []
    for r in range(repeats):
        sgkf = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed + r)
        for k, (train_rows, test_rows) in enumerate(sgkf.split(np.zeros(len(y)), y, groups)):
            train = slides.iloc[train_rows].reset_index(drop=True)
            rest, val = _carve(train, val_fraction, seed + 1000 * (r + 1) + k)
            out.append(Fold(f"r{r}f{k}", _ids(train, rest), _ids(train, val), _ids(slides, test_rows)))
    return out


def splits_table(folds: list[Fold]) -> pd.DataFrame:
    """Long table (fold, set, slide_id) for the run directory's ``splits.csv``."""
    rows = [(f.name, s, sid) for f in folds for s in SETS for sid in getattr(f, s)]
    return pd.DataFrame(rows, columns=["fold", "set", "slide_id"])
