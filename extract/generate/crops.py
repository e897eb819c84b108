"""nCAMELYON-style crops (Pawlowski et al., Needles in Haystacks, §5.2) from slides and lesion masks.

Positive crops each contain one whole connected lesion component (8-connected, on the lesion
mask) and have a lesion fraction (the crop's O2I) inside the requested range; they are sampled at
random positions around the component (up to `tries` per component, up to `per_lesion` kept).
Negative crops come from negative slides (label 0) at random positions, rejected as background
when less than `min_tissue` of the crop is tissue (the project's tissue detection,
`mil.extract.wsi.tissue.detect_tissue`, on a low-resolution image) or their mean green exceeds
`max_green` (the paper's test); up to `per_slide` per slide. Each split (the manifest's `split`
column) is then balanced by subsampling the larger class.

Geometry: a crop is `size` px at `ds` level-0 px per crop px (a pyramid level's downsample, or
``level_mpp / level0_mpp``), i.e. ``size · ds`` level-0 px wide; its top-left is in level-0 px. A
mask of shape (h, w) covers the whole slide, so one mask pixel is ``width / w`` level-0 px (the
synthetic cohort's masks are 16 level-0 px per pixel). A crop pixel takes the mask value at its
centre (nearest neighbour), so O2I is exactly the mean of `crop_mask(...) > 0`.

Besides the split files and ``imageset.json`` the folder holds ``crops.csv``: for every crop its
split, row, label, slide (manifest row and id), level-0 top-left and level-0 px per crop px.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mil.errors import ManifestError, OptionError
from mil.extract.generate.crop_positions import load_lesion_mask, mask_scale, negative_positions, positive_positions
from mil.extract.generate.folders import check_existing, mil_version, start_folder
from mil.extract.generate.needles import MAX_BYTES
from mil.imagesets import SPLITS, check_split, write_meta, write_split

POSITIONS_NAME = "crops.csv"  # sidecar beside the split files: where each crop came from


@dataclass(frozen=True)
class CropConfig:
    """Options of `run_crops`.

    Attributes:
        size: crop side S in px; images are (n, 3, S, S) uint8.
        o2i: (low, high) lesion fraction of positive crops, both inclusive.
        level: pyramid level to crop at (its downsample), or None.
        level_mpp: µm per crop px instead of a level (needs the slide's mpp), or None.
        per_lesion: positive crops kept per lesion component at most.
        per_slide: negative crops kept per negative slide at most.
        tries: random positions tried per component / per negative slide.
        seed: seed of everything; the same seed gives identical image sets.
        min_tissue: a negative crop needs at least this fraction of tissue.
        max_green: a negative crop whose mean green (0–255) exceeds this is background.
        tissue_mpp: resolution (µm/px) of the tissue detection for negatives.
    """

    size: int = 256
    o2i: tuple[float, float] = (0.01, 0.1)
    level: int | None = None
    level_mpp: float | None = None
    per_lesion: int = 50
    per_slide: int = 100
    tries: int = 10_000
    seed: int = 0
    min_tissue: float = 0.5
    max_green: float = 200.0
    tissue_mpp: float = 8.0

    def __post_init__(self) -> None:
        lo, hi = self.o2i
        checks = [
            (self.size >= 8, "--size", "an integer >= 8", self.size),
            (0 <= lo < hi <= 1, "--o2i", "a range LOW-HIGH with 0 <= LOW < HIGH <= 1", f"{lo}-{hi}"),
            (self.level is None or self.level >= 0, "--level", "an integer >= 0", self.level),
            (self.level_mpp is None or self.level_mpp > 0, "--level-mpp", "> 0 (µm per crop px)", self.level_mpp),
            (
                self.level is None or self.level_mpp is None,
                "--level or --level-mpp",
                "only one of them",
                f"--level {self.level} and --level-mpp {self.level_mpp}",
            ),
            (self.per_lesion >= 1, "--per-lesion", "an integer >= 1", self.per_lesion),
            (self.per_slide >= 0, "--per-slide", "an integer >= 0", self.per_slide),
            (self.seed >= 0, "--seed", "an integer >= 0", self.seed),
            (self.tries >= 1, "tries", "an integer >= 1", self.tries),
            (0 <= self.min_tissue <= 1, "min_tissue", "in [0, 1]", self.min_tissue),
        ]
        for ok, opt, what, got in checks:
            if not ok:
                raise OptionError(f"expected {opt} to be {what}, got {got!r} instead.")

    def options(self) -> dict[str, Any]:
        d = asdict(self)
        d["o2i"] = list(self.o2i)
        if d["level"] is None and d["level_mpp"] is None:
            d["level"] = 0
        return d


def parse_range(text: str, option: str = "--o2i") -> tuple[float, float]:
    """'0.01-0.1' → (0.01, 0.1)."""
    parts = str(text).replace(" ", "").split("-")
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise OptionError(f"expected {option} to be a range LOW-HIGH such as 0.01-0.1, got {text!r} instead.") from None
    return lo, hi


# ---------------------------------------------------------------------------------------------
# Masks and crop geometry


def read_crop_manifest(path: str | Path):
    """A validated manifest (`mil.manifest.read_manifest`, labels required) with a `split` for every row."""
    import pandas as pd

    from mil.manifest import read_manifest

    df = read_manifest(path, require_labels=True)
    header = [str(c).strip() for c in pd.read_csv(path, nrows=0, dtype=str).columns]
    if "split" not in header:
        raise ManifestError(f"{path}: expected a 'split' column (train/val/test) to assign crops to splits, got columns {header} instead.")
    empty = np.flatnonzero(df["split"].to_numpy() == "")
    if empty.size:
        raise ManifestError(f"{path} line {int(empty[0]) + 2}: expected a split (train, val or test), got an empty 'split' instead.")
    return df


def read_crop(slide, x0: int, y0: int, size: int, ds: float) -> np.ndarray:
    """A (size, size, 3) uint8 RGB crop with top-left (x0, y0) in level-0 px at `ds` level-0 px per px.

    Read from the coarsest level not coarser than `ds`, resized if that level is finer; areas
    outside the scan are white.
    """
    from PIL import Image

    from mil.slides import best_level, rgba_to_rgb

    level = best_level(tuple(slide.level_downsamples), ds)
    n = max(1, round(size * ds / slide.level_downsamples[level]))  # crop side at that level
    region = slide.read_region((int(x0), int(y0)), level, (n, n))  # RGBA
    if n != size:
        k = n / size
        region = region.reduce(int(k)) if k.is_integer() else region.resize((size, size), Image.BILINEAR, reducing_gap=2.0)
    return rgba_to_rgb(region)  # (S, S, 3)


# ---------------------------------------------------------------------------------------------
# The command


def _slide_ds(slide, geom_fn, cfg: CropConfig, where: str) -> float:
    """Level-0 px per crop px for this slide."""
    if cfg.level_mpp is not None:
        geom = geom_fn()
        ds = cfg.level_mpp / geom.level0_mpp
        if ds < 1 - 1e-6:
            raise OptionError(f"{where}expected --level-mpp >= the slide's level-0 mpp {geom.level0_mpp:g}, got {cfg.level_mpp:g} instead.")
        return max(ds, 1.0)
    level = cfg.level or 0
    if level >= slide.level_count:
        raise OptionError(f"{where}expected --level below the slide's {slide.level_count} levels, got {level} instead.")
    return float(slide.level_downsamples[level])


def run_crops(
    manifest: str | Path, masks_dir: str | Path, out: str | Path, cfg: CropConfig, *, overwrite: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Write an nCAMELYON-style image set (`mil.imagesets`) to `out`.

    Args:
        manifest: manifest CSV with slide_id, path, label and split columns.
        masks_dir: folder of lesion masks (``<slide_id>_lesion.png``) for the positive slides.
        out: the image-set folder.
        cfg: crop options.
        overwrite: replace an image set made with other options.
        progress: show a progress bar over slides.

    Returns:
        ``{"folder", "status" ("written" or "complete"), "meta"}``.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from mil.extract.wsi.tissue import TissueParams, detect_tissue, read_low_res
    from mil.imagesets import read_meta
    from mil.slides import open_slide, slide_geometry

    out = Path(out)
    df = read_crop_manifest(manifest)
    masks_dir = Path(masks_dir)
    if not masks_dir.is_dir():
        raise OptionError(f"expected --masks to be a folder of lesion masks, got {str(masks_dir)!r} which is not a folder.")
    options = {**cfg.options(), "manifest": str(Path(manifest).resolve()), "masks": str(masks_dir.resolve())}
    if check_existing(out, options, overwrite):
        return {"folder": out, "status": "complete", "meta": read_meta(out)}
    for row in df.itertuples(index=False):  # masks of positives, before any work
        if row.label == 1:
            load_lesion_mask(masks_dir, row.slide_id)
    tissue_params = TissueParams(mask_mpp=cfg.tissue_mpp)

    per_split: dict[str, dict[str, list]] = {s: {"pos": [], "neg": []} for s in SPLITS}
    counts = {"components": 0, "used": 0, "too_large": 0, "no_fit": 0, "negative_slides": 0, "background_rejected": 0}
    nbytes = 0
    console = Console(stderr=True)
    columns = (TextColumn("[bold]crops"), BarColumn(), MofNCompleteColumn(), TextColumn("slides"), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not progress, transient=True) as bar:
        task = bar.add_task("crops", total=len(df))
        for i, row in enumerate(df.itertuples(index=False)):
            where = f"{row.path}: "
            rng = np.random.default_rng([cfg.seed, i])
            slide = open_slide(row.path)
            try:
                mpp = None if np.isnan(row.mpp) else float(row.mpp)
                ds = _slide_ds(slide, lambda: slide_geometry(slide, row.path, mpp), cfg, where)  # noqa: B023 - called within the iteration
                width, height = slide.dimensions
                items = []
                if row.label == 1:
                    lesion = load_lesion_mask(masks_dir, row.slide_id)
                    mask_scale(lesion.shape, width, height, where=f"{masks_dir / row.slide_id}: ")
                    found, c = positive_positions(lesion, width, height, ds, cfg, rng)
                    for key in ("components", "used", "too_large", "no_fit"):
                        counts[key] += c[key]
                    for p in found:
                        img = read_crop(slide, p.x0, p.y0, cfg.size, ds).transpose(2, 0, 1)  # (3, S, S)
                        items.append((img, 1, p.o2i, p.bbox, i, p.x0, p.y0, ds))
                    per_split[row.split]["pos"].extend(items)
                else:
                    geom = slide_geometry(slide, row.path, mpp)
                    low, tds = read_low_res(slide, geom, cfg.tissue_mpp)  # (h, w, 3)
                    tissue, _ = detect_tissue(low, tds * geom.level0_mpp, tissue_params)  # (h, w)
                    counts["negative_slides"] += 1
                    for x0, y0 in negative_positions(tissue, tds, width, height, ds, cfg, rng, n=4 * cfg.per_slide):
                        img = read_crop(slide, x0, y0, cfg.size, ds)  # (S, S, 3)
                        if img[..., 1].mean() > cfg.max_green:
                            counts["background_rejected"] += 1
                            continue
                        items.append((img.transpose(2, 0, 1), 0, 0.0, (-1, -1, -1, -1), i, x0, y0, ds))
                        if len(items) >= cfg.per_slide:
                            break
                    per_split[row.split]["neg"].extend(items)
            finally:
                slide.close()
            nbytes += len(items) * 3 * cfg.size * cfg.size
            if nbytes > MAX_BYTES:
                raise OptionError(
                    f"expected the crops to fit in {MAX_BYTES / 2**30:.0f} GiB of memory, got more by slide {row.slide_id!r}; "
                    "lower --per-lesion / --per-slide or --size."
                )
            bar.advance(task)

    start_folder(out)
    balance_rng = np.random.default_rng([cfg.seed, 2**31])
    meta = {
        "generator": "crops",
        "mil_version": mil_version(),
        "options": options,
        "seed": cfg.seed,
        "size": cfg.size,
        "channels": 3,
        "n": {},
        "n_positive": {},
        "before_balance": {},
        "o2i_range": None,
        "counts": counts,
        "background_test": f"tissue fraction >= {cfg.min_tissue} (mil.extract.wsi.tissue at {cfg.tissue_mpp} µm/px) "
        f"and mean green <= {cfg.max_green}",
    }
    o2i_all, rows = [], []
    for split in SPLITS:
        pos, neg = per_split[split]["pos"], per_split[split]["neg"]
        meta["before_balance"][split] = {"positive": len(pos), "negative": len(neg)}
        k = min(len(pos), len(neg))
        keep = [pos[j] for j in np.sort(balance_rng.choice(len(pos), k, replace=False))] if k else []
        keep += [neg[j] for j in np.sort(balance_rng.choice(len(neg), k, replace=False))] if k else []
        keep = [keep[j] for j in balance_rng.permutation(len(keep))]
        images = np.stack([t[0] for t in keep]) if keep else np.zeros((0, 3, cfg.size, cfg.size), np.uint8)  # (n, 3, S, S)
        data = check_split(images, [t[1] for t in keep], [t[2] for t in keep], [t[3] for t in keep], [t[4] for t in keep])
        write_split(out / f"{split}.h5", data, {"generator": "crops", "split": split, "size": cfg.size})
        meta["n"][split] = len(data)
        meta["n_positive"][split] = int(data.labels.sum())
        o2i_all.extend(data.o2i[data.labels == 1].tolist())
        ids = df["slide_id"].tolist()
        rows += [(split, j, t[1], t[4], ids[t[4]], t[5], t[6], t[7], t[2]) for j, t in enumerate(keep)]
    _write_positions(out / POSITIONS_NAME, rows)
    if o2i_all:
        meta["o2i_range"] = [float(min(o2i_all)), float(max(o2i_all))]
    write_meta(out, meta)
    return {"folder": out, "status": "written", "meta": meta}


def _write_positions(path: Path, rows: list[tuple]) -> None:
    """The sidecar table: where each crop of each split came from (level-0 top-left, scale)."""
    import pandas as pd

    from mil.atomic import atomic_path

    cols = ["split", "index", "label", "source", "slide_id", "x0", "y0", "level0_px_per_px", "o2i"]
    with atomic_path(path) as tmp:
        pd.DataFrame(rows, columns=cols).to_csv(tmp, index=False, float_format="%.6g")


def summary(result: dict[str, Any]) -> str:
    """One line: folder, n per split (before balancing), O2I range."""
    meta, folder = result["meta"], result["folder"]
    if result["status"] == "complete":
        return f"{folder}: already complete with these options; nothing written"
    parts = []
    for s in SPLITS:
        b = meta["before_balance"][s]
        parts.append(f"{s} {meta['n'][s]:,} (of {b['positive']:,} pos / {b['negative']:,} neg)")
    rng = meta["o2i_range"]
    o2i = f"O2I {rng[0]:.3g}–{rng[1]:.3g}" if rng else "no positive crops"
    return f"{folder}: " + " · ".join(parts) + f" balanced crops of {meta['size']}² px, {o2i}"
