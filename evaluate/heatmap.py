"""`mil evaluate heatmap`: where a run's model looked on one slide.

Many slides in one process, where each slide file is found, and the tile scores as CSV and GeoJSON
(for QuPath) are in `mil.evaluate.heatmap_cohort`; this module computes and draws one slide's figure.

The figure: the slide thumbnail with each tile's attention weight (or instance score) painted
over its footprint, a colour bar, and a montage of the top-k tiles read from the slide at full
resolution with their scores.

Normalisation: scores are clipped to their 1st–99th percentile over the slide's tiles and then
min–max scaled to [0, 1] (linear, not rank-based), so a handful of extreme tiles cannot wash out
the rest; the colour bar is labelled in raw score units.

Cost is bounded by the thumbnail, not the slide: the thumbnail is read from the pyramid level
closest to its resolution, in horizontal strips box-reduced as they are read; the score image is
painted at thumbnail resolution with summed-area (difference) arrays, O(N + h·w) with no per-tile
loop; only the k montage tiles are read at full resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mil.device import module_device
from mil.errors import OptionError, SettingsMismatchError
from mil.features import FeatureFileError, check_finite
from mil.slides import rgba_to_rgb

SCORES = ("attention", "instance")
MONTAGE_PX = 192  # side of each montage tile as read (and at most as drawn), px
_STRIP_PX = 1 << 21  # level pixels per thumbnail strip read (8 MiB of RGBA)


@dataclass
class Heatmap:
    """Everything the figure shows, for one slide under one checkpoint.

    Attributes:
        thumbnail: (h, w, 3) uint8 slide thumbnail.
        image: (h, w) float32 normalised scores in [0, 1] at thumbnail resolution, NaN where no tile.
        values: (N,) raw tile scores; coords: (N, 2) int64 level-0 top-left (x, y); size0: tile side, level-0 px.
        scale: (2,) thumbnail px per level-0 px along x and y.
        lo, hi: raw scores mapped to 0 and 1 (1st and 99th percentiles).
        top: (k,) indices of the highest-scoring tiles, best first; tiles: k (MONTAGE_PX, MONTAGE_PX, 3) uint8.
        score_name: "attention" or "instance score"; note: why attention was not used, or "".
        probability: the slide's predicted probability; fold / held_out: checkpoint used, slide's set in it.
        attention: (N,) raw attention weights, or None (head without attention); instance: (N,) instance scores.
        slide_path: the slide file read.
    """

    slide_id: str
    fold: str
    held_out: str
    score_name: str
    note: str
    probability: float
    thumbnail: np.ndarray
    image: np.ndarray
    values: np.ndarray
    coords: np.ndarray
    size0: int
    scale: np.ndarray
    lo: float
    hi: float
    top: np.ndarray
    tiles: list[np.ndarray]
    attention: np.ndarray | None
    instance: np.ndarray
    slide_path: str


def check_options(score: str, top_k: int, thumbnail_size: int) -> None:
    """One-line `OptionError` for a bad --score, --top-k or --thumbnail-size."""
    if score not in SCORES:
        raise OptionError(f"expected --score attention or instance, got {score!r} instead.")
    if not 0 <= top_k <= 64 or not 32 <= thumbnail_size <= 16384:
        raise OptionError(f"expected --top-k in [0, 64] and --thumbnail-size in [32, 16384], got {top_k} and {thumbnail_size} instead.")


def compute_heatmap(
    run_dir: str | Path,
    slide_id: str,
    slides_manifest: str | Path | None = None,
    *,
    features: str | Path | None = None,
    fold: str | None = None,
    score: str = "attention",
    top_k: int = 8,
    thumbnail_size: int = 1024,
    slides_root: str | Path | None = None,
    device: str = "cpu",
) -> Heatmap:
    """Score one slide's tiles with a run's checkpoint and paint them at thumbnail resolution.

    Checkpoint: `fold` if given, else the fold whose test set holds the slide, else the first fold.
    Slide file: the manifest's path when it has the slide, else the one the feature file records
    (`slides_root` re-roots moved slides: see `mil.evaluate.heatmap_cohort.HeatmapSource.locate`).

    Raises (one-line `MilError`s): OptionError (bad option, unknown fold, no slide path), RunError (run files
    missing, unreadable checkpoint), FeatureFileError, SettingsMismatchError (features or slide do
    not match the checkpoint), SlideError, ManifestError.
    """
    from mil.evaluate.heatmap_cohort import HeatmapSource

    src = HeatmapSource(
        run_dir,
        manifest=slides_manifest,
        features=features,
        slides_root=slides_root,
        fold=fold,
        score=score,
        top_k=top_k,
        thumbnail_size=thumbnail_size,
        device=device,
    )
    return src.heatmap(src.plan([slide_id])[0])


def heatmap_of(
    bag, model, ckpt: dict, slide_path: str | Path, *, slide_id: str, fold: str, held_out: str, score: str, top_k: int, thumbnail_size: int
) -> Heatmap:
    """The `Heatmap` of one read bag under a loaded head (`load_head`'s model and checkpoint dict), reading `slide_path`."""
    from mil.slides import open_slide

    path = bag.path
    check_finite(bag)
    if bag.n_instances == 0 or (bag.n_instances > 1 and not np.ptp(bag.coords, axis=0).any()):
        raise FeatureFileError(
            f"{path}: expected tiles with level-0 coords, got {bag.n_instances} tiles "
            f"{'' if bag.n_instances == 0 else 'all at one position'} instead; nothing to paint."
        )
    with torch.no_grad():
        out = model(
            torch.from_numpy(bag.features)[None].to(module_device(model))
        )  # BagOutput: logits (1,), instance_scores (1, N), attention (1, N) | None
    note = "" if score == "instance" or out.attention is not None else f"head {ckpt['head']} has no attention: instance scores shown"
    attention = None if out.attention is None else out.attention[0].double().numpy()  # (N,)
    instance = out.instance_scores[0].double().numpy()  # (N,)
    values = attention if score == "attention" and attention is not None else instance  # (N,)
    lo, hi = np.percentile(values, [1, 99])
    norm = np.clip((values - lo) / (hi - lo), 0, 1) if hi > lo else np.full_like(values, 0.5)  # (N,)
    size0 = _tile_size0(bag.attrs, bag.coords, path)
    top = np.argsort(-values, kind="stable")[:top_k]  # (k,)

    slide = open_slide(slide_path)
    try:
        W, H = slide.dimensions
        w0, h0 = bag.attrs.get("level0_width"), bag.attrs.get("level0_height")
        if w0 is not None and h0 is not None and (int(w0), int(h0)) != (W, H):
            raise SettingsMismatchError(
                f"{path}: expected tiles of a {W}x{H} slide like {slide_path}, got a feature file "
                f"made on a {w0}x{h0} slide instead; check the manifest's path for {slide_id!r}."
            )
        thumb = read_thumbnail(slide, thumbnail_size)  # (h, w, 3)
        tiles = [_read_tile(slide, bag.coords[i], size0) for i in top]
    finally:
        slide.close()
    scale = np.array([thumb.shape[1] / W, thumb.shape[0] / H])  # (2,) thumbnail px per level-0 px
    return Heatmap(
        slide_id=slide_id,
        fold=fold,
        held_out=held_out,
        score_name="instance score" if note or score == "instance" else "attention",
        note=note,
        probability=float(torch.sigmoid(out.logits[0])),
        thumbnail=thumb,
        image=score_image(bag.coords, norm, size0, thumb.shape[:2], scale),  # (h, w)
        values=values,
        coords=bag.coords,
        size0=size0,
        scale=scale,
        lo=float(lo),
        hi=float(hi),
        top=top,
        tiles=tiles,
        attention=attention,
        instance=instance,
        slide_path=str(slide_path),
    )


def render_heatmap(
    run_dir: str | Path,
    slide_id: str,
    slides_manifest: str | Path | None = None,
    *,
    out: str | Path | None = None,
    features: str | Path | None = None,
    fold: str | None = None,
    score: str = "attention",
    top_k: int = 8,
    thumbnail_size: int = 1024,
    slides_root: str | Path | None = None,
    device: str = "cpu",
) -> Path:
    """Write the heatmap figure of `compute_heatmap` as a PNG (default RUN_DIR/heatmaps/<slide_id>.png); return its path.

    The tile scores go beside it, as ``<name>.csv`` and ``<name>.geojson`` (`heatmap_cohort.write_outputs`).
    """
    from mil.evaluate.heatmap_cohort import write_outputs

    hm = compute_heatmap(
        run_dir,
        slide_id,
        slides_manifest,
        features=features,
        fold=fold,
        score=score,
        top_k=top_k,
        thumbnail_size=thumbnail_size,
        slides_root=slides_root,
        device=device,
    )
    out = Path(out) if out is not None else Path(run_dir) / "heatmaps" / f"{slide_id}.png"
    write_outputs(hm, out)
    return out


def draw_heatmap(hm: Heatmap) -> tuple[Image.Image, Image.Image]:
    """The figure of `hm` (title, painted thumbnail with the top-k tiles outlined, colour bar, montage) and its painted thumbnail.

    The painted thumbnail is pasted into the rendered figure at its native resolution (one figure pixel
    per thumbnail pixel): matplotlib's own image path would hold several float copies of it.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from PIL import ImageDraw

    where = f"slide in its {hm.held_out} set" if hm.held_out != "none" else "slide not in its splits"
    lines = [
        f"{hm.slide_id}: {hm.score_name} · checkpoint {hm.fold} ({where}) · P(positive) = {hm.probability:.3f}",
        f"colours: {hm.score_name} clipped to its 1st–99th percentile over {len(hm.values):,} tiles, scaled linearly",
    ]
    lines += [f"({hm.note})"] if hm.note else []
    th, tw = hm.image.shape
    k, rows = len(hm.tiles), max(1, -(-len(hm.tiles) // 2))
    m, cap, top = 24, 22, 20 + 15 * len(lines)  # px: margin, montage caption, title block
    side = int(np.clip((th - (rows - 1) * cap) // rows - cap, 96, MONTAGE_PX)) if k else 0  # montage tile px
    x_montage = m + tw + m + 18 + 100  # colour bar, its tick labels and label
    W, H = x_montage + (2 * side + 2 * m if k else 0), top + max(th, rows * (side + cap)) + m
    fig = Figure(figsize=(W / 100, H / 100), dpi=100)

    def axes(x: float, y: float, w: float, h: float):  # from a top-left box in figure px
        return fig.add_axes((x / W, 1 - (y + h) / H, w / W, h / H))

    cmap = colormaps["inferno"]
    bar = fig.colorbar(ScalarMappable(Normalize(0, 1), cmap), cax=axes(m + tw + m, top, 18, th))
    ticks = np.linspace(0, 1, 5)
    bar.set_ticks(ticks, labels=_distinct_labels(hm.lo + ticks * (hm.hi - hm.lo)))
    bar.ax.tick_params(labelsize=8)
    bar.set_label(hm.score_name, fontsize=9)
    fig.text(m / W, 1 - 10 / H, "\n".join(lines), va="top", fontsize=9)
    for j, tile in enumerate(hm.tiles):
        r, c = divmod(j, 2)
        a = axes(x_montage + c * (side + m), top + r * (side + cap) + cap, side, side)
        a.imshow(tile, interpolation="antialiased")
        a.set_axis_off()
        a.set_title(f"#{j + 1}: {hm.values[hm.top[j]]:.3g}", fontsize=8, pad=3)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    page = Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3])  # (H, W, 3)
    thumb = Image.fromarray(overlay(hm.thumbnail, hm.image, cmap))  # (th, tw, 3)
    draw = ImageDraw.Draw(thumb)
    for rank, i in enumerate(hm.top, 1):
        (x, y), d = hm.coords[i] * hm.scale, hm.size0 * hm.scale  # (2,), (2,) thumbnail px
        draw.rectangle([x, y, x + d[0], y + d[1]], outline=(0, 255, 255), width=2)
        draw.text((x + 3, y + 2), str(rank), fill=(0, 255, 255))
    page.paste(thumb, (m, top))
    return page, thumb


def overlay(thumbnail: np.ndarray, image: np.ndarray, cmap, alpha: float = 0.6) -> np.ndarray:
    """(h, w, 3) uint8: `thumbnail` (h, w, 3) with `cmap` colours of `image` (h, w) in [0, 1] blended in where finite.

    Composited here in uint8/uint16 rather than as a second matplotlib layer, which would resample
    float64 RGBA copies of the whole image (hundreds of MB at 2048 px).
    """
    painted = np.isfinite(image)  # (h, w)
    colours = cmap(np.where(painted, image, 0), bytes=True)[..., :3]  # (h, w, 3) uint8
    a = round(alpha * 256)
    blend = ((thumbnail.astype(np.uint16) * (256 - a) + colours.astype(np.uint16) * a) >> 8).astype(np.uint8)  # (h, w, 3)
    return np.where(painted[..., None], blend, thumbnail)  # (h, w, 3)


def score_image(coords: np.ndarray, values: np.ndarray, size0: int, shape: tuple[int, int], scale: tuple[float, float]) -> np.ndarray:
    """Paint tile values over their footprints on an (h, w) grid; overlapping tiles are averaged.

    Args:
        coords: (N, 2) level-0 top-left (x, y); values: (N,); size0: tile side in level-0 px;
        shape: (h, w) of the grid; scale: (x, y) grid px per level-0 px.

    Returns:
        (h, w) float32, NaN where no tile lies. Every tile covers at least one grid pixel.
    """
    h, w = shape
    x0 = np.clip(np.round(coords[:, 0] * scale[0]), 0, w).astype(np.int64)  # (N,)
    y0 = np.clip(np.round(coords[:, 1] * scale[1]), 0, h).astype(np.int64)  # (N,)
    x1 = np.clip(np.maximum(np.round((coords[:, 0] + size0) * scale[0]), x0 + 1), 0, w).astype(np.int64)  # (N,)
    y1 = np.clip(np.maximum(np.round((coords[:, 1] + size0) * scale[1]), y0 + 1), 0, h).astype(np.int64)  # (N,)
    acc = np.zeros((2, h + 1, w + 1), np.float32)  # (2, h+1, w+1) difference arrays of value sums and tile counts
    v = np.stack([np.asarray(values, np.float32), np.ones(len(coords), np.float32)])  # (2, N)
    for ys, xs, sign in ((y0, x0, 1), (y0, x1, -1), (y1, x0, -1), (y1, x1, 1)):
        for c in range(2):
            np.add.at(acc[c], (ys, xs), sign * v[c])
    np.cumsum(acc, axis=1, out=acc)
    np.cumsum(acc, axis=2, out=acc)  # (2, h+1, w+1) sums and counts (counts exact: small integers)
    sums, counts = acc[0, :h, :w], acc[1, :h, :w]  # (h, w) each
    lo, hi = (v[0].min(), v[0].max()) if len(coords) else (0, 0)
    np.clip(np.divide(sums, np.maximum(counts, 1), out=sums), lo, hi, out=sums)  # (h, w) means; clip undoes sum rounding
    sums[counts < 0.5] = np.nan
    return sums  # (h, w)


def read_thumbnail(slide, max_side: int) -> np.ndarray:
    """(h, w, 3) uint8 thumbnail whose longer side is `max_side` (or the slide's, if smaller).

    Reads the pyramid level just finer than the thumbnail in strips of about 8 MiB, each box-reduced
    by the level's integer factor as it is read, so memory stays O(thumbnail + one strip).
    """
    W, H = slide.dimensions
    ds = max(1.0, max(W, H) / max_side)  # level-0 px per thumbnail px
    level = slide.get_best_level_for_downsample(ds)
    (wl, hl), dl = slide.level_dimensions[level], slide.level_downsamples[level]
    f = max(1, int(ds / dl))  # box reduction at that level
    strip = f * max(1, _STRIP_PX // (wl * f))  # level rows per read, a multiple of f
    parts = [
        np.asarray(Image.fromarray(rgba_to_rgb(slide.read_region((0, round(y * dl)), level, (wl, min(strip, hl - y))))).reduce(f))
        for y in range(0, hl, strip)
    ]
    size = (max(1, round(W / ds)), max(1, round(H / ds)))
    return np.asarray(Image.fromarray(np.concatenate(parts)).resize(size, Image.LANCZOS))  # (h, w, 3)


def _read_tile(slide, xy: np.ndarray, size0: int) -> np.ndarray:
    """(MONTAGE_PX, MONTAGE_PX, 3) uint8 view of one tile, read from the level closest to montage resolution."""
    level = slide.get_best_level_for_downsample(max(1.0, size0 / MONTAGE_PX))
    side = max(1, int(np.ceil(size0 / slide.level_downsamples[level])))
    img = rgba_to_rgb(slide.read_region((int(xy[0]), int(xy[1])), level, (side, side)))  # (side, side, 3)
    return np.asarray(Image.fromarray(img).resize((MONTAGE_PX, MONTAGE_PX), Image.LANCZOS))


def _pick_fold(run, slide_id: str, fold: str | None) -> tuple[str, str]:
    """(fold, the slide's set in it: train / val / test / 'none') — see `compute_heatmap`."""
    folds = sorted(run.checkpoints)
    if fold is not None and fold not in run.checkpoints:
        raise OptionError(f"expected --fold to be one of {', '.join(folds)}, got {fold!r} instead.")
    mine = run.splits[run.splits["slide_id"] == slide_id]
    if fold is None:
        held = mine.loc[mine["set"] == "test", "fold"]
        fold = str(held.iloc[0]) if len(held) else folds[0]
    sets = mine.loc[mine["fold"] == fold, "set"]
    return fold, str(sets.iloc[0]) if len(sets) else "none"


def _tile_size0(attrs: dict, coords: np.ndarray, path: Path) -> int:
    """Tile side in level-0 px: from the coords attrs, else the grid step of the coords (CLAM files; the stride if tiles overlap)."""
    if attrs.get("patch_size_level0"):
        return int(attrs["patch_size_level0"])
    if all(attrs.get(k) for k in ("patch_size", "target_mpp", "level0_mpp")):
        return max(1, round(attrs["patch_size"] * attrs["target_mpp"] / attrs["level0_mpp"]))
    steps = [np.diff(np.unique(coords[:, j])) for j in range(2)]
    steps = [int(s.min()) for s in steps if s.size]
    if steps:
        return min(steps)
    if attrs.get("patch_size"):
        return int(attrs["patch_size"])
    raise FeatureFileError(f"{path}: expected coords attrs giving the tile size (patch_size_level0), got none; re-extract the tiles.")


def _distinct_labels(values: np.ndarray) -> list[str]:
    """Tick labels with the fewest significant digits (3 to 9) that tell `values` apart.

    Near-uniform attention (every weight ≈ 1/N) would otherwise print five identical labels.
    """
    for digits in range(3, 10):
        labels = [f"{v:.{digits}g}" for v in values]
        if len(set(labels)) == len(labels):
            break
    return labels
