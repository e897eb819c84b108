"""Synthetic whole-slide images, one slide at a time: masks, textures and the pyramidal file.

Slides are pyramidal, JPEG-tiled TIFFs (generic or Aperio-like SVS) that OpenSlide opens, with
H&E-like tissue blobs on a white background and, for positive slides, a planted "lesion" texture;
optionally "mimic" regions (`mil.extract.generate.mimic`) in the lesion's colours with another
texture. The ground truth is boolean masks at `mask_downsample` resolution; every pyramid level is
rendered tile by tile straight from those masks, so a gigapixel slide never exists in memory.

Layout note (OpenSlide 4.0.1): the generic-tiff and aperio drivers take pyramid levels from the
*top-level* tiled IFDs, so levels are written as successive pages, not as SubIFDs (which those
drivers ignore).

A whole cohort (labels, splits, manifest, reruns) is `mil.extract.generate.synthetic.make_cohort`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

from mil.atomic import atomic_path
from mil.errors import OptionError

MASK_DOWNSAMPLE = 16  # level-0 px per mask pixel (default)
LEVEL_FACTOR = 4  # downsample between successive pyramid levels
TOP_LEVEL_MAX = 1024  # stop adding levels once the longer side fits in this many px
TEXTURE = 512  # period (level-0 px) of the precomputed, seamlessly wrapping textures

# Base colours (RGB). Background is near-grey so its HSV saturation stays < 0.05; tissue is
# eosin pink (saturation ~0.3) so Otsu on saturation separates the two.
_BACKGROUND = (241.0, 240.0, 242.0)
_STROMA = (234.0, 160.0, 200.0)
_NUCLEUS = (95.0, 60.0, 150.0)
_LESION_STROMA = (205.0, 125.0, 180.0)
_LESION_NUCLEUS = (60.0, 30.0, 110.0)


def _mask_shape(width: int, height: int, ds: int) -> tuple[int, int]:
    return -(-height // ds), -(-width // ds)


def _top(values: np.ndarray, n: int) -> float:
    """The n-th largest value (so `values >= _top(values, n)` keeps about n); +inf when n <= 0."""
    if n <= 0:
        return np.inf
    n = min(n, values.size)
    return float(np.partition(values.ravel(), values.size - n)[values.size - n])


def _upsample(field: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a smooth float field to `shape` (pixel-area aligned)."""
    zoom = (shape[0] / field.shape[0], shape[1] / field.shape[1])
    return ndimage.zoom(field.astype(np.float32), zoom, order=1, grid_mode=True, mode="nearest")


def random_masks(
    width: int,
    height: int,
    *,
    rng: np.random.Generator,
    mask_downsample: int = MASK_DOWNSAMPLE,
    tissue_fraction: float = 0.4,
    lesion_fraction: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Random tissue and lesion masks.

    Tissue is a few Gaussian bumps roughened by smooth noise and thresholded (smooth, irregular
    blobs), damped towards the borders; lesion is one to three compact blobs deep inside the
    tissue. The smooth fields are designed on a grid of at most ~512 px and upsampled, so a
    gigapixel slide's masks cost seconds and tens of MB.

    Args:
        width: Slide width in level-0 px.
        height: Slide height in level-0 px.
        rng: Source of randomness.
        mask_downsample: Level-0 px per mask pixel.
        tissue_fraction: Fraction of the slide covered by tissue.
        lesion_fraction: Fraction of the tissue covered by lesion; None for no lesion.

    Returns:
        (tissue, lesion) bool arrays of shape (ceil(height/ds), ceil(width/ds)).
    """
    shape = _mask_shape(width, height, mask_downsample)
    c = max(1, -(-max(shape) // 512))
    ch, cw = -(-shape[0] // c), -(-shape[1] // c)
    yy = (np.arange(ch)[:, None] + 0.5) / ch
    xx = (np.arange(cw)[None, :] + 0.5) / cw
    field = np.zeros((ch, cw))
    for _ in range(int(rng.integers(2, 5))):
        (cy, cx), (sy, sx) = rng.uniform(0.25, 0.75, 2), rng.uniform(0.1, 0.22, 2)
        field += rng.uniform(0.6, 1.0) * np.exp(-(((yy - cy) / sy) ** 2) / 2 - ((xx - cx) / sx) ** 2 / 2)
    noise = ndimage.gaussian_filter(rng.standard_normal((ch, cw)), sigma=min(ch, cw) / 20)
    field += 0.25 * noise / (noise.std() + 1e-12)
    edge = np.minimum(np.minimum(yy, 1 - yy), np.minimum(xx, 1 - xx))
    field -= 2.0 * np.clip(1 - edge / 0.15, 0, 1) ** 2 + 100.0 * (edge < 0.05)
    coarse_tissue = field >= _top(field, int(round(tissue_fraction * field.size)))

    fine = _upsample(field, shape)
    fine[fine < -50] = -np.inf  # the damped border is never tissue
    n_free = int(np.isfinite(fine).sum())
    tissue = fine >= _top(fine, min(int(round(tissue_fraction * fine.size)), n_free))
    del fine

    lesion = np.zeros(shape, bool)
    if lesion_fraction is None or not tissue.any() or not coarse_tissue.any():
        return tissue, lesion
    closeness = blob_closeness(coarse_tissue, shape, rng)
    inside = closeness[tissue]
    n_target = max(1, int(round(lesion_fraction * inside.size)))
    lesion = tissue & (closeness >= _top(inside, n_target))
    return tissue, lesion


def blob_closeness(coarse: np.ndarray, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Closeness to one to three centres deep inside the `coarse` mask, upsampled to `shape`.

    The tissue closest (in a wobbly metric) to any centre makes a compact blob with an irregular
    outline: the lesion (`random_masks`) and the mimic (`mil.extract.generate.mimic`) take the top
    of it.
    """
    ch, cw = coarse.shape
    depth = ndimage.distance_transform_edt(coarse)
    candidates = np.flatnonzero(depth >= 0.5 * depth.max())
    k = min(int(rng.integers(1, 4)), candidates.size)
    cy, cx = np.unravel_index(rng.choice(candidates, size=k, replace=False), (ch, cw))
    gy, gx = np.mgrid[0:ch, 0:cw]
    dist = np.min([np.hypot(gy - y, gx - x) for y, x in zip(cy, cx)], axis=0)
    wobble = ndimage.gaussian_filter(rng.standard_normal((ch, cw)), sigma=3)
    # exp() keeps the metric positive, so the outline is irregular but no far-away specks appear.
    return _upsample(-dist * np.exp(0.25 * wobble / (wobble.std() + 1e-12)), shape)


def level_shapes(width: int, height: int) -> list[tuple[int, int]]:
    """(height, width) per level: downsample 4 each until the longer side is <= TOP_LEVEL_MAX."""
    shapes = [(height, width)]
    while max(shapes[-1]) > TOP_LEVEL_MAX:
        d = LEVEL_FACTOR ** len(shapes)
        shapes.append((-(-height // d), -(-width // d)))
    return shapes


def _texture(
    rng: np.random.Generator,
    stroma: tuple,
    nucleus: tuple,
    *,
    n_nuclei: int,
    radius: tuple[float, float],
    aspect: tuple[float, float] | None = None,
    size: int = TEXTURE,
) -> np.ndarray:
    """One periodic (wraps seamlessly) H&E-like RGB texture, float32 (size, size, 3).

    Each nucleus has semi-axes a, b: both drawn from `radius`, or b = a * (a draw from `aspect`).
    """

    def smooth(sigma: float | tuple) -> np.ndarray:
        f = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
        return f / (f.std() + 1e-12)

    img = np.asarray(stroma, np.float32) * (1 + 0.04 * smooth(12)[..., None])
    img += 6 * smooth((1, 5))[..., None]  # faint fibres
    # Nuclei: ellipses stamped with wrap-around; alpha ramps over ~1 px for antialiasing.
    alpha = np.zeros((size, size), np.float32)
    r_max = int(math.ceil(radius[1])) + 1
    oy, ox = np.mgrid[-r_max : r_max + 1, -r_max : r_max + 1]
    for _ in range(n_nuclei):
        y, x = rng.integers(0, size, 2)
        a = rng.uniform(*radius)
        b = rng.uniform(*radius) if aspect is None else a * rng.uniform(*aspect)
        th = rng.uniform(0, np.pi)
        u = (ox * np.cos(th) + oy * np.sin(th)) / a
        v = (-ox * np.sin(th) + oy * np.cos(th)) / b
        stamp = np.clip((1 - np.sqrt(u * u + v * v)) * min(a, b) + 0.5, 0, 1)
        rows, cols = (y + oy) % size, (x + ox) % size
        alpha[rows, cols] = np.maximum(alpha[rows, cols], stamp)
    chromatin = np.asarray(nucleus, np.float32) * (1 + 0.12 * smooth(1)[..., None])
    img = img * (1 - alpha[..., None]) + chromatin * alpha[..., None]
    img += 2.5 * rng.standard_normal((size, size, 1))  # grain
    return img


def _textures(seed: int, mimic: bool = False) -> dict[str, np.ndarray]:
    """Background, tissue, lesion (and mimic) level-0 textures for one slide (slight stain jitter).

    The mimic is the lesion's stain with another nuclear pattern: small, round, densely packed
    nuclei (an inflammatory infiltrate) instead of large pleomorphic ones, rescaled per channel to
    the lesion texture's mean RGB. It has its own random stream, so asking for it changes nothing
    else.
    """
    rng = np.random.default_rng(seed)
    jitter = rng.uniform(0.95, 1.05, 3)
    n = TEXTURE * TEXTURE / 512**2
    grain = ndimage.gaussian_filter(rng.standard_normal((TEXTURE, TEXTURE)), 1, mode="wrap")
    # Mostly grey (same in all channels) noise keeps the background's saturation near 0.01.
    bg = np.asarray(_BACKGROUND, np.float32) + 3.0 * grain[..., None] + 0.6 * rng.standard_normal((TEXTURE, TEXTURE, 3))
    tissue = _texture(
        rng, tuple(np.multiply(_STROMA, jitter)), tuple(np.multiply(_NUCLEUS, jitter)), n_nuclei=int(260 * n), radius=(3.0, 6.0)
    )
    lesion = _texture(
        rng,
        tuple(np.multiply(_LESION_STROMA, jitter)),
        tuple(np.multiply(_LESION_NUCLEUS, jitter)),
        n_nuclei=int(900 * n),
        radius=(5.0, 10.0),
    )
    out = {"bg": bg, "tissue": tissue, "lesion": lesion}
    if mimic:
        m = _texture(
            np.random.default_rng([seed, 1]),
            tuple(np.multiply(_LESION_STROMA, jitter)),
            tuple(np.multiply(_LESION_NUCLEUS, jitter)),
            n_nuclei=int(4000 * n),
            radius=(2.5, 4.5),
            aspect=(0.8, 1.0),
        )
        out["mimic"] = m * (lesion.mean(axis=(0, 1)) / m.mean(axis=(0, 1)))
    return out


def _level_texture(tex0: np.ndarray, d: int, tile: int) -> tuple[np.ndarray, int]:
    """Block-mean `tex0` by `d`, tiled so any (tile, tile) window at offset < period fits."""
    p0 = tex0.shape[0]
    if d <= p0:
        period = p0 // d
        tex = tex0.reshape(period, d, period, d, 3).mean(axis=(1, 3))
    else:
        period, tex = 1, tex0.mean(axis=(0, 1), keepdims=True)
    reps = -(-(period + tile) // period)
    return np.tile(np.clip(np.rint(tex), 0, 255).astype(np.uint8), (reps, reps, 1)), period


def _interp(start: int, n: int, d: int, ds: int, n_mask: int) -> tuple[int, int, np.ndarray]:
    """Bilinear weights from mask cells [lo, hi] to level px start..start+n-1 (their centres)."""
    c = (start + np.arange(n) + 0.5) * d / ds - 0.5
    i0 = np.floor(c).astype(int)
    f = (c - i0).astype(np.float32)
    a, b = np.clip(i0, 0, n_mask - 1), np.clip(i0 + 1, 0, n_mask - 1)
    lo, hi = int(a.min()), int(b.max())
    w = np.zeros((n, hi - lo + 1), np.float32)
    np.add.at(w, (np.arange(n), a - lo), 1 - f)
    np.add.at(w, (np.arange(n), b - lo), f)
    return lo, hi, w


def _tiles(
    level_shape: tuple[int, int],
    d: int,
    tissue: np.ndarray,
    lesion: np.ndarray | None,
    tex: dict[str, tuple[np.ndarray, int]],
    ds: int,
    tile: int,
    mimic: np.ndarray | None = None,
) -> Iterator[np.ndarray]:
    """Yield the level's full (tile, tile, 3) uint8 tiles in row-major order (lesion over mimic)."""
    h, w = level_shape
    rows = [_interp(y, tile, d, ds, tissue.shape[0]) for y in range(0, h, tile)]
    cols = [_interp(x, tile, d, ds, tissue.shape[1]) for x in range(0, w, tile)]

    def window(name: str, y: int, x: int) -> np.ndarray:
        arr, period = tex[name]
        return arr[y % period : y % period + tile, x % period : x % period + tile]

    def coverage(mask: np.ndarray, r: tuple, c: tuple) -> np.ndarray | bool:
        sub = mask[r[0] : r[1] + 1, c[0] : c[1] + 1]
        if not sub.any():
            return False
        if sub.all():
            return True
        return (r[2] @ sub.astype(np.float32) @ c[2].T) >= 0.5

    for ty, r in enumerate(rows):
        for tx, c in enumerate(cols):
            y, x = ty * tile, tx * tile
            t = coverage(tissue, r, c)
            if t is False:
                yield window("bg", y, x)
                continue
            out = window("tissue", y, x)
            if t is not True:
                out = np.where(t[..., None], out, window("bg", y, x))
            for name, mask in (("mimic", mimic), ("lesion", lesion)):
                cov = False if mask is None else coverage(mask, r, c)
                if cov is True:
                    out = window(name, y, x)
                elif cov is not False:
                    out = np.where(cov[..., None], window(name, y, x), out)
            yield out


def write_slide(
    path: str | os.PathLike,
    tissue: np.ndarray,
    lesion: np.ndarray | None,
    *,
    width: int,
    height: int,
    mask_downsample: int = MASK_DOWNSAMPLE,
    mpp: float | None = 0.25,
    fmt: str = "tiff",
    seed: int = 0,
    tile: int = 256,
    jpeg_quality: int = 80,
    mimic: np.ndarray | None = None,
) -> Path:
    """Stream a pyramidal JPEG-tiled slide rendered from the masks to `path`.

    Args:
        path: Output file; written under a temporary name in the same folder, then renamed.
        tissue: Tissue mask, bool (ceil(height/ds), ceil(width/ds)).
        lesion: Lesion mask of the same shape, or None.
        width: Level-0 width in px.
        height: Level-0 height in px.
        mask_downsample: Level-0 px per mask pixel.
        mpp: Microns per pixel at level 0. None writes no resolution tag (tiff) or no MPP and
            AppMag fields (svs), so OpenSlide reports neither mpp nor objective power.
        fmt: 'tiff' (generic TIFF, resolution tag in px/cm) or 'svs' (Aperio-like description).
        seed: Seed for the textures.
        tile: Tile side in px (multiple of 16).
        jpeg_quality: JPEG quality 1-100.
        mimic: Mask of lesion-mimicking regions (same shape), or None; the lesion is drawn over it.

    Returns:
        The path written.
    """
    if fmt not in ("tiff", "svs"):
        raise OptionError(f"expected --format to be 'tiff' or 'svs', got {fmt!r} instead")
    if mpp is not None and not mpp > 0:
        raise OptionError(f"expected --mpp to be > 0, got {mpp!r} instead")
    if tile <= 0 or tile % 16:
        raise OptionError(f"expected tile to be a positive multiple of 16, got {tile!r} instead")
    expected = _mask_shape(width, height, mask_downsample)
    for name, m in (("tissue", tissue), ("lesion", lesion), ("mimic", mimic)):
        if m is not None and m.shape != expected:
            raise OptionError(
                f"expected the {name} mask to have shape {expected} for a "
                f"{width}x{height} slide at downsample {mask_downsample}, got {m.shape}"
            )
    path = Path(path)
    tex0 = _textures(seed, mimic=mimic is not None)
    shapes = level_shapes(width, height)
    # Classic TIFF offsets are 32-bit: use BigTIFF once the raw pixels alone could pass 4 GiB.
    bigtiff = width * height * 4 > 2**32
    options: dict = dict(
        dtype=np.uint8, tile=(tile, tile), photometric="rgb", compression="jpeg", compressionargs={"level": jpeg_quality}, metadata=None
    )
    if mpp is not None and fmt == "tiff":
        options.update(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    desc = None
    if fmt == "svs":
        desc = f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) JPEG/RGB Q={jpeg_quality}"
        if mpp is not None:
            desc += f"|AppMag = {40 if mpp <= 0.3 else 20}|MPP = {mpp:.4f}"
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
            for level, shape in enumerate(shapes):
                d = LEVEL_FACTOR**level
                tex = {k: _level_texture(v, d, tile) for k, v in tex0.items()}
                tif.write(
                    _tiles(shape, d, tissue, lesion, tex, mask_downsample, tile, mimic),
                    shape=(*shape, 3),
                    subfiletype=0 if level == 0 else 1,
                    description=desc if level == 0 else None,
                    **options,
                )
    return path
