"""nMNIST-style "needle in a haystack" image sets (Pawlowski et al., Needles in Haystacks, §5.1).

A positive canvas holds one object of the target class plus N clutter objects of the other
classes; a negative canvas holds N + 1 clutter objects, so both carry the same pixel mass. Objects
are added (overlaps allowed) and the sum is clipped to 255. The target lies wholly inside the
canvas at a uniformly random position; clutter is placed uniformly. Each target object is used
`duplicates` times with fresh clutter and every positive gets one negative (balanced classes).

Departure from the authors' code: they place the target wholly inside a random 64 × 64 grid cell,
which on a canvas that is not a multiple of 64 (e.g. 96²) leaves part of the canvas without
targets; here it may lie anywhere it fits. The occlusion of a target — the fraction of its box
covered by distractors' boxes — is recorded per canvas and its mean per split in imageset.json.
`object_size` resizes the objects (anti-aliased) for studies of the paper's geometry at a smaller
scale: 7-px objects on 128² canvases have the O2I of 28-px digits on 512².

Objects come from MNIST-format IDX files (MNIST, Fashion-MNIST, …) or, offline, from
scikit-learn's 8 × 8 digits upscaled to 28 × 28. Source splits are disjoint: val = the last
`val_size` objects of the IDX train file, train = the rest, test = the t10k file; a split's
clutter comes only from that split's objects.

`run_needles` writes one image-set folder (`mil.imagesets`) per canvas size:
``OUT/canvas_<size>/{train,val,test}.h5`` and ``imageset.json``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mil.errors import OptionError
from mil.extract.generate.folders import check_existing, mil_version, start_folder
from mil.extract.generate.idx import digits_splits, find_idx, idx_splits, resize_objects
from mil.imagesets import SPLITS, ImageSplit, check_split, write_meta, write_split

DENSITY_AREA = 64 * 64  # --clutter-density counts distractors per this many px²
PAPER_OBJECT = 28  # the paper's digits are 28 × 28
# Distractors per canvas in the paper's README commands (digit clutter, patch size 64).
CLUTTER_TABLE = {64: 2, 128: 6, 256: 25, 512: 100, 1024: 400, 2048: 1600, 4096: 6400, 6144: 14400}
PX_PER_OBJECT = 2600  # canvases outside the table: about one 28-px object per 2,600 px²
MAX_BYTES = 4 * 2**30  # largest split held in memory
SOURCES = ("idx", "sklearn-digits")


# ---------------------------------------------------------------------------------------------
# Making canvases


def default_n_clutter(canvas: int, density: float | None = None, object_size: int = PAPER_OBJECT) -> int:
    """Distractors per positive canvas: the paper's table, else about one object per 2,600 px².

    Both are for 28-px objects; other object sizes get the count of the paper's canvas with the same
    canvas-to-object ratio (7-px objects on 128² get 512²'s 100), so that the O2I and the share of the
    canvas covered by clutter are the paper's.

    Args:
        canvas: canvas side (px).
        density: distractors per 64 × 64 px (overrides the table; the paper's is about 1.56).
        object_size: side of the objects (px).
    """
    if density is not None:
        return max(0, int(round(density * canvas * canvas / DENSITY_AREA)))
    equivalent = canvas * PAPER_OBJECT / object_size  # the paper's canvas side at this ratio
    if equivalent in CLUTTER_TABLE:
        return CLUTTER_TABLE[int(equivalent)]
    return max(0, int(round(equivalent * equivalent / PX_PER_OBJECT)) - 1)


def box_occlusion(box: Sequence[int], xs: np.ndarray, ys: np.ndarray, h: int, w: int) -> float:
    """Fraction of the target box ``x0, y0, x1, y1`` covered by the union of ``h × w`` distractor boxes at ``(xs, ys)``."""
    x0, y0, x1, y1 = (int(v) for v in box)
    covered = np.zeros((y1 - y0, x1 - x0), bool)  # (h, w) of the target
    for x, y in zip(xs, ys):
        a, b = max(int(y), y0) - y0, min(int(y) + h, y1) - y0
        c, d = max(int(x), x0) - x0, min(int(x) + w, x1) - x0
        if a < b and c < d:
            covered[a:b, c:d] = True
    return float(covered.mean())


@dataclass
class Needles:
    """The canvases of one split and how they were built.

    Attributes:
        split: the image-set arrays (images (n, 1, canvas, canvas) uint8, labels, o2i, bbox, source).
        clutter_source: (n, N + 1) int64 source index of each clutter object; -1 pads the unused
            last slot of positives (they carry N clutter objects, negatives N + 1).
        clutter_xy: (n, N + 1, 2) int32 top-left (x, y) of each clutter object; -1 where unused.
        n_objects: (n,) int32 objects on each canvas (target included), always N + 1.
        occlusion: (n,) float fraction of the target's box covered by distractors' boxes; NaN for negatives.
    """

    split: ImageSplit
    clutter_source: np.ndarray
    clutter_xy: np.ndarray
    n_objects: np.ndarray
    occlusion: np.ndarray

    @property
    def mean_occlusion(self) -> float | None:
        """Mean target occlusion over the positives (None without positives)."""
        pos = self.occlusion[~np.isnan(self.occlusion)]
        return float(pos.mean()) if len(pos) else None


def make_needles(
    objects: np.ndarray,
    labels: np.ndarray,
    target: int,
    canvas: int,
    n_clutter: int | None = None,
    n_images: int | None = None,
    duplicates: int = 2,
    seed: int | Sequence[int] = 0,
    *,
    source_index: np.ndarray | None = None,
    progress: Callable[[int], None] | None = None,
) -> Needles:
    """Balanced needle canvases from one split's objects.

    Args:
        objects: (n, h, w) uint8 objects (e.g. 28 × 28 digits).
        labels: (n,) class of each object.
        target: the class whose presence makes a canvas positive.
        canvas: canvas side in px (>= the object side).
        n_clutter: distractors per positive canvas (N); default `default_n_clutter(canvas, object_size=h)`.
        n_images: cap on the number of canvases (positives = negatives = n_images // 2).
        duplicates: times each target object is used, each time with fresh clutter.
        seed: seed of `numpy.random.default_rng`; the same seed gives identical arrays.
        source_index: (n,) index of each object in its source, recorded as `source`; default arange.
        progress: called with the number of canvases finished since the last call.

    Returns:
        `Needles`; its split holds 2 · min(duplicates · #targets, n_images // 2) canvases in
        random order, images (n, 1, canvas, canvas) uint8, o2i = h · w / canvas² for positives.
    """
    objects = np.asarray(objects)
    labels = np.asarray(labels).reshape(-1)
    if objects.ndim != 3 or objects.dtype != np.uint8:
        raise OptionError(f"expected objects of shape (n, h, w) and dtype uint8, got {objects.shape} {objects.dtype} instead.")
    if len(labels) != len(objects):
        raise OptionError(f"expected one label per object ({len(objects)}), got {len(labels)} instead.")
    n_obj, h, w = objects.shape
    if canvas < max(h, w):
        raise OptionError(f"expected --canvas of at least the object size {max(h, w)}, got {canvas} instead.")
    if duplicates < 1:
        raise OptionError(f"expected --duplicates >= 1, got {duplicates} instead.")
    n_clutter = default_n_clutter(canvas, object_size=max(h, w)) if n_clutter is None else int(n_clutter)
    if n_clutter < 0:
        raise OptionError(f"expected a number of clutter objects >= 0, got {n_clutter} instead.")
    index = np.arange(n_obj, dtype=np.int64) if source_index is None else np.asarray(source_index, np.int64)
    targets = np.flatnonzero(labels == target)  # (T,)
    pool = np.flatnonzero(labels != target)  # (P,)
    if n_obj and not len(targets):
        raise OptionError(
            f"expected objects of the target class {target} in this split, got none (classes {sorted(set(labels.tolist()))})."
        )
    if n_obj and n_clutter and not len(pool):
        raise OptionError(f"expected objects of classes other than the target {target} for clutter, got none.")

    rng = np.random.default_rng(seed)
    # Duplicate-major order, so a cap below #targets still uses distinct target objects.
    order = np.concatenate([rng.permutation(targets) for _ in range(duplicates)]) if len(targets) else targets  # (T·dup,)
    n_pos = len(order) if n_images is None else min(len(order), max(int(n_images), 0) // 2)
    order = order[:n_pos]
    n = 2 * n_pos
    nbytes = n * canvas * canvas
    if nbytes > MAX_BYTES:
        raise OptionError(
            f"expected a split of at most {MAX_BYTES / 2**30:.0f} GiB in memory, got {n:,} canvases of {canvas}² px "
            f"({nbytes / 2**30:.1f} GiB) instead; cap it with --max-per-split."
        )
    is_pos = rng.permutation(np.arange(n) < n_pos)  # (n,) random order of positives and negatives
    target_of = np.full(n, -1, np.int64)  # (n,) row in `objects` of each positive's target
    target_of[is_pos] = order

    images = np.zeros((n, 1, canvas, canvas), np.uint8)  # (n, 1, S, S)
    bbox = np.full((n, 4), -1, np.int32)  # (n, 4) x0, y0, x1, y1
    clutter_source = np.full((n, n_clutter + 1), -1, np.int64)  # (n, N+1)
    clutter_xy = np.full((n, n_clutter + 1, 2), -1, np.int32)  # (n, N+1, 2)
    occlusion = np.full(n, np.nan)  # (n,)
    acc = np.empty((canvas, canvas), np.int32)  # (S, S) sum of objects before clipping
    done = 0
    for i in range(n):
        acc[:] = 0
        if is_pos[i]:  # anywhere the whole object fits
            y0, x0 = (int(v) for v in rng.integers(0, (canvas - h + 1, canvas - w + 1)))
            acc[y0 : y0 + h, x0 : x0 + w] += objects[target_of[i]]
            bbox[i] = (x0, y0, x0 + w, y0 + h)
        k = n_clutter + (0 if is_pos[i] else 1)
        picks = pool[rng.integers(0, len(pool), k)] if k else pool[:0]  # (k,)
        ys = rng.integers(0, max(canvas - h, 1), k)  # (k,) top-left in [0, canvas − h)
        xs = rng.integers(0, max(canvas - w, 1), k)  # (k,)
        for j, y, x in zip(picks, ys, xs):
            acc[y : y + h, x : x + w] += objects[j]
        if is_pos[i]:
            occlusion[i] = box_occlusion(bbox[i], xs, ys, h, w)
        np.minimum(acc, 255, out=acc)
        images[i, 0] = acc
        clutter_source[i, :k] = index[picks]
        clutter_xy[i, :k, 0], clutter_xy[i, :k, 1] = xs, ys
        done += 1
        if progress is not None and (done == 256 or i == n - 1):
            progress(done)
            done = 0

    o2i = np.where(is_pos, h * w / float(canvas * canvas), 0.0)  # (n,)
    source = np.where(is_pos, index[np.maximum(target_of, 0)] if n_obj else -1, -1)  # (n,)
    split = check_split(images, is_pos.astype(np.int8), o2i, bbox, source)
    return Needles(split, clutter_source, clutter_xy, np.full(n, n_clutter + 1, np.int32), occlusion)


# ---------------------------------------------------------------------------------------------
# Image-set folders and the command


def run_needles(
    out: str | Path,
    *,
    target: int,
    canvases: Sequence[int],
    idx_dir: str | Path | None = None,
    source: str = "idx",
    seed: int = 0,
    duplicates: int = 2,
    val_size: int | None = None,
    max_per_split: Sequence[int] | None = None,
    clutter_density: float | None = None,
    object_size: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Write one image set per canvas size to ``out/canvas_<size>/``.

    Args:
        out: parent folder of the image sets.
        target: the target class.
        canvases: canvas sides in px.
        idx_dir: folder of MNIST-format IDX files (``source="idx"``).
        source: "idx" or "sklearn-digits" (offline, no files needed).
        seed: seed of everything; a split's generator is seeded with (seed, split, canvas).
        duplicates: times each target object is used.
        val_size: objects at the end of the IDX train file used for val (default 5,000).
        max_per_split: cap on canvases for train, val, test (balance kept).
        clutter_density: distractors per 64 × 64 px instead of the paper's table.
        object_size: resize the objects to this side (px); None keeps them (28 px for MNIST).
        overwrite: replace image sets made with other options.
        progress: show a progress bar over canvases.

    Returns:
        One dict per canvas: ``folder``, ``status`` ("written" or "complete") and ``meta``.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    options = resolve_needles_options(
        target=target,
        canvases=canvases,
        idx_dir=idx_dir,
        source=source,
        seed=seed,
        duplicates=duplicates,
        val_size=val_size,
        max_per_split=max_per_split,
        clutter_density=clutter_density,
        object_size=object_size,
    )
    out = Path(out)
    todo, results = [], []
    for canvas, opts in options.items():  # every folder checked before any work
        folder = out / f"canvas_{canvas}"
        if check_existing(folder, opts, overwrite):
            from mil.imagesets import read_meta

            results.append({"folder": folder, "status": "complete", "meta": read_meta(folder)})
        else:
            todo.append((canvas, folder, opts))
    if not todo:
        return results

    first = todo[0][2]
    resize_to = first["object_size"]
    if first["source"] == "sklearn-digits":
        splits = digits_splits(resize_to or PAPER_OBJECT)
    else:
        splits = idx_splits(first["idx_dir"], first["val_size"])
        if resize_to is not None:
            splits = {k: replace(v, objects=resize_objects(v.objects, resize_to)) for k, v in splits.items()}
    labels = sorted(set(np.concatenate([s.labels for s in splits.values()]).tolist()))
    if target not in labels:
        raise OptionError(f"expected --target to be one of the classes {labels}, got {target} instead.")
    size = max(max(s.objects.shape[1:]) for s in splits.values())
    for canvas, _, _ in todo:  # make_needles checks this too, but only once the folder exists
        if canvas < size:
            raise OptionError(f"expected --canvas of at least the object size {size}, got {canvas} instead.")
    caps = dict(zip(SPLITS, first["max_per_split"] or (None,) * 3))
    totals = {}  # canvases per split: 2 · min(duplicates · #targets, cap // 2)
    for split in SPLITS:
        n_pos = int((splits[split].labels == target).sum()) * duplicates
        totals[split] = 2 * (n_pos if caps[split] is None else min(n_pos, caps[split] // 2))
        for canvas, _, _ in todo:  # refuse before any work
            if totals[split] * canvas * canvas > MAX_BYTES:
                raise OptionError(
                    f"expected each split to fit in {MAX_BYTES / 2**30:.0f} GiB, got {totals[split]:,} {split} canvases of "
                    f"{canvas}² px ({totals[split] * canvas**2 / 2**30:.1f} GiB) instead; cap it with --max-per-split."
                )
    console = Console(stderr=True)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("canvases"), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not progress, transient=True) as bar:
        for canvas, folder, opts in todo:
            task = bar.add_task(f"canvas {canvas}", total=sum(totals.values()))
            start_folder(folder)
            meta = {
                "generator": "needles",
                "mil_version": mil_version(),
                "options": opts,
                "seed": seed,
                "canvas": canvas,
                "channels": 1,
                "n_clutter": opts["n_clutter"],
                "objects_per_image": opts["n_clutter"] + 1,
                "n": {},
                "n_positive": {},
                "o2i": None,
                "object_size": None,
                "origin": {},
                "classes": labels,
                "target_occlusion": {},
            }
            for k, split in enumerate(SPLITS):
                s = splits[split]
                made = make_needles(
                    s.objects,
                    s.labels,
                    target,
                    canvas,
                    n_clutter=opts["n_clutter"],
                    n_images=caps[split],
                    duplicates=duplicates,
                    seed=(seed, k, canvas),
                    source_index=s.index,
                    progress=lambda d: bar.advance(task, d),  # noqa: B023 - used within the iteration
                )
                attrs = {"generator": "needles", "split": split, "canvas": canvas, "target": target, "origin": s.origin}
                write_split(folder / f"{split}.h5", made.split, attrs)
                meta["n"][split] = len(made.split)
                meta["n_positive"][split] = int(made.split.labels.sum())
                meta["origin"][split] = s.origin
                meta["target_occlusion"][split] = made.mean_occlusion
                meta["object_size"] = list(s.objects.shape[1:])
            h, w = meta["object_size"]
            meta["o2i"] = h * w / float(canvas * canvas)
            write_meta(folder, meta)
            bar.remove_task(task)
            results.append({"folder": folder, "status": "written", "meta": meta})
    order = [out / f"canvas_{c}" for c in options]
    return sorted(results, key=lambda r: order.index(r["folder"]))


def resolve_needles_options(
    *, target, canvases, idx_dir, source, seed, duplicates, val_size, max_per_split, clutter_density, object_size=None
) -> dict[int, dict[str, Any]]:
    """Validate the options and resolve them into one JSON-able dict per canvas (for imageset.json)."""
    if source not in SOURCES:
        raise OptionError(f"expected --source to be one of {', '.join(SOURCES)}, got {source!r} instead.")
    if source == "idx" and idx_dir is None:
        raise OptionError("expected --idx-dir DIR (MNIST-format IDX files) or --source sklearn-digits, got neither.")
    if source == "sklearn-digits" and idx_dir is not None:
        raise OptionError(f"expected either --idx-dir or --source sklearn-digits, got both (--idx-dir {idx_dir}).")
    if source == "sklearn-digits" and val_size is not None:
        raise OptionError(
            f"expected no --val-size with --source sklearn-digits (its splits are 60/20/20 by index), got {val_size} instead."
        )
    if not canvases or min(canvases) < 1:
        raise OptionError(f"expected --canvas to be canvas sides in px such as 64,128,256, got {list(canvases)} instead.")
    if duplicates < 1:
        raise OptionError(f"expected --duplicates >= 1, got {duplicates} instead.")
    if seed < 0:
        raise OptionError(f"expected --seed >= 0, got {seed} instead.")
    if max_per_split is not None and len(max_per_split) != 3:
        raise OptionError(f"expected --max-per-split to be three caps (train,val,test), got {list(max_per_split)} instead.")
    if clutter_density is not None and not clutter_density >= 0:
        raise OptionError(f"expected --clutter-density >= 0 (distractors per 64×64 px), got {clutter_density} instead.")
    if object_size is not None and not (isinstance(object_size, int) and object_size >= 2):
        raise OptionError(f"expected --object-size to be a side in px >= 2, got {object_size!r} instead.")
    if source == "idx":
        find_idx(idx_dir)  # a clear error before anything else
        idx_dir = str(Path(idx_dir).resolve())
        val_size = 5000 if val_size is None else int(val_size)
    base = {
        "source": source,
        "idx_dir": idx_dir,
        "target": int(target),
        "seed": int(seed),
        "duplicates": int(duplicates),
        "val_size": val_size,
        "max_per_split": None if max_per_split is None else [int(v) for v in max_per_split],
        "clutter_density": clutter_density,
        "object_size": object_size,
        "placement": "anywhere",  # the target anywhere it fits (the authors': inside a 64-px grid cell)
    }
    size = object_size or PAPER_OBJECT
    return {
        int(c): {**base, "canvas": int(c), "n_clutter": default_n_clutter(int(c), clutter_density, size)} for c in dict.fromkeys(canvases)
    }


def summary(result: dict[str, Any]) -> str:
    """One line per image set: folder, n per split, O2I."""
    meta, folder = result["meta"], result["folder"]
    if result["status"] == "complete":
        return f"{folder}: already complete with these options; nothing written"
    n = " · ".join(f"{s} {meta['n'][s]:,}" for s in SPLITS)
    return f"{folder}: {n} canvases (half positive), {meta['canvas']}² px, O2I {100 * meta['o2i']:.3g} %, {meta['n_clutter']} distractors"
