"""Synthetic cohorts for demos, tests and benchmarks: `make_cohort` writes slides (with
`mil.extract.generate.slide_writer`), their lesion and tissue masks (and, with a mimic fraction,
lesion-mimic masks: `mil.extract.generate.mimic`), labels, splits and a manifest.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from mil.atomic import atomic_path
from mil.errors import OptionError
from mil.extract.generate.mimic import random_mimic
from mil.extract.generate.slide_writer import LEVEL_FACTOR, MASK_DOWNSAMPLE, TEXTURE, level_shapes, random_masks, write_slide


def _check_cohort_args(
    n_slides: int,
    size: int,
    fmt: str,
    mpp: float,
    positive_fraction: float,
    lesion_fraction: float,
    tissue_fraction: float,
    mimic_fraction: float = 0.0,
) -> None:
    checks = [
        (n_slides >= 1, "--n-slides", "an integer >= 1", n_slides),
        (size >= 512, "--size", "an integer >= 512", size),
        (fmt in ("tiff", "svs"), "--format", "'tiff' or 'svs'", fmt),
        (mpp is not None and mpp > 0, "--mpp", "> 0", mpp),
        (0 <= positive_fraction <= 1, "--positive-fraction", "in [0, 1]", positive_fraction),
        (0 < lesion_fraction < 1, "--lesion-fraction", "in (0, 1)", lesion_fraction),
        (0 < tissue_fraction < 0.8, "--tissue-fraction", "in (0, 0.8)", tissue_fraction),
        (0 <= mimic_fraction < 1, "--mimic-fraction", "in [0, 1)", mimic_fraction),
    ]
    for ok, opt, what, got in checks:
        if not ok:
            raise OptionError(f"expected {opt} to be {what}, got {got!r} instead")
    if mimic_fraction > 0 and not lesion_fraction + mimic_fraction < 0.9:
        raise OptionError(
            f"expected --lesion-fraction + --mimic-fraction to be < 0.9, got {lesion_fraction!r} + {mimic_fraction!r} instead"
        )


def _labels_and_splits(n: int, positive_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Labels (~positive_fraction positive, both present when n >= 2 and 0 < fraction < 1) and
    label-stratified splits (~25 % test per label, at least one when the label has >= 2)."""
    n_pos = int(round(positive_fraction * n))
    if n >= 2 and 0 < positive_fraction < 1:
        n_pos = min(max(n_pos, 1), n - 1)
    labels = np.zeros(n, int)
    labels[rng.permutation(n)[:n_pos]] = 1
    test = np.zeros(n, bool)
    for lab in (0, 1):
        idx = rng.permutation(np.flatnonzero(labels == lab))
        if idx.size >= 2:
            test[idx[: max(1, int(round(0.25 * idx.size)))]] = True
    return labels, np.where(test, "test", "train")


def make_cohort(
    out_dir: str | os.PathLike,
    *,
    n_slides: int = 6,
    size: int = 8192,
    fmt: str = "tiff",
    seed: int = 0,
    mpp: float = 0.25,
    positive_fraction: float = 0.5,
    lesion_fraction: float = 0.02,
    tissue_fraction: float = 0.4,
    mimic_fraction: float = 0.0,
    progress: Callable[[str], None] | None = None,
    mask_downsample: int = MASK_DOWNSAMPLE,
    tile: int = 256,
    jpeg_quality: int = 80,
) -> Path:
    """Write a cohort of square synthetic slides with masks, manifest.csv and synthetic.json.

    Args:
        out_dir: Output folder (created).
        n_slides: Number of slides, ids synth_000, synth_001, …
        size: Slide side in level-0 px.
        fmt: 'tiff' or 'svs'.
        seed: Seed for everything; the same seed gives byte-identical outputs.
        mpp: Microns per pixel at level 0.
        positive_fraction: Fraction of slides with a lesion (label 1). Both labels are present
            when n_slides >= 2 unless the fraction is exactly 0 or 1.
        lesion_fraction: Lesion area as a fraction of tissue area on positive slides.
        tissue_fraction: Tissue area as a fraction of the slide.
        mimic_fraction: Area of lesion-mimicking regions (lesion colours, another texture) as a
            fraction of tissue area, on every slide whatever its label; never on the lesion.
            0 (default) writes no mimic: the cohort is byte-identical to one made without it.
        progress: Called as progress(slide_id) after each slide.
        mask_downsample: Level-0 px per mask pixel.
        tile: Tile side in px.
        jpeg_quality: JPEG quality.

    Returns:
        Path of manifest.csv.
    """
    _check_cohort_args(n_slides, size, fmt, mpp, positive_fraction, lesion_fraction, tissue_fraction, mimic_fraction)
    out = Path(out_dir)
    shapes = level_shapes(size, size)
    params = {
        "seed": seed,
        "n_slides": n_slides,
        "size": size,
        "fmt": fmt,
        "mpp": mpp,
        "positive_fraction": positive_fraction,
        "lesion_fraction": lesion_fraction,
        "tissue_fraction": tissue_fraction,
        "mask_downsample": mask_downsample,
        "tile": tile,
        "jpeg_quality": jpeg_quality,
        "compression": "jpeg",
        "level_downsample": LEVEL_FACTOR,
        "levels": len(shapes),
        "level_dimensions": [[w, h] for h, w in shapes],
        "texture_period": TEXTURE,
    }
    if mimic_fraction > 0:  # only then, so cohorts made without it keep their synthetic.json
        params["mimic_fraction"] = mimic_fraction
    if _already_written(out, params):  # rerun with the same parameters: nothing to do
        return out / "manifest.csv"
    (out / "masks").mkdir(parents=True, exist_ok=True)
    labels, splits = _labels_and_splits(n_slides, positive_fraction, np.random.default_rng([seed, 2**31]))
    rows, per_slide = [], {}
    for i in range(n_slides):
        sid = f"synth_{i:03d}"
        ss = np.random.SeedSequence([seed, i])
        mask_rng, tex_seed = np.random.default_rng(ss), int(ss.generate_state(1)[0])
        tissue, lesion = random_masks(
            size,
            size,
            rng=mask_rng,
            mask_downsample=mask_downsample,
            tissue_fraction=tissue_fraction,
            lesion_fraction=lesion_fraction if labels[i] else None,
        )
        # The mimic has its own stream (a child of the slide's seed): tissue, lesion and the
        # slide's other pixels are the same whatever mimic_fraction is.
        masks = {"tissue": tissue, "lesion": lesion}
        if mimic_fraction > 0:
            masks["mimic"] = random_mimic(tissue, lesion, rng=np.random.default_rng(ss.spawn(1)[0]), fraction=mimic_fraction)
        else:  # a rerun without the mimic leaves no stale mimic mask behind
            (out / "masks" / f"{sid}_mimic.png").unlink(missing_ok=True)
        mimic = masks.get("mimic")
        for kind, m in masks.items():
            Image.fromarray(m.astype(np.uint8) * 255).save(out / "masks" / f"{sid}_{kind}.png")
        name = f"{sid}.{fmt}"
        write_slide(
            out / name,
            tissue,
            lesion if labels[i] else None,
            width=size,
            height=size,
            mask_downsample=mask_downsample,
            mpp=mpp,
            fmt=fmt,
            seed=tex_seed,
            tile=tile,
            jpeg_quality=jpeg_quality,
            mimic=mimic,
        )
        rows.append({"slide_id": sid, "path": name, "label": int(labels[i]), "split": splits[i], "patient_id": sid})
        per_slide[sid] = {
            "label": int(labels[i]),
            "split": str(splits[i]),
            "tissue_fraction": float(tissue.mean()),
            "lesion_fraction": float(lesion.sum() / max(tissue.sum(), 1)),
        }
        if mimic is not None:
            per_slide[sid]["mimic_fraction"] = float(mimic.sum() / max(tissue.sum(), 1))
        if progress is not None:
            progress(sid)
    manifest = out / "manifest.csv"
    with atomic_path(manifest) as tmp:
        pd.DataFrame(rows, columns=["slide_id", "path", "label", "split", "patient_id"]).to_csv(tmp, index=False)
    # synthetic.json last: it marks the cohort as complete for reruns.
    with atomic_path(out / "synthetic.json") as tmp:
        tmp.write_text(json.dumps({**params, "slides": per_slide}, indent=2) + "\n")
    return manifest


def _already_written(out: Path, params: dict) -> bool:
    """True if `out` holds a complete cohort made with exactly `params`."""
    try:
        old = json.loads((out / "synthetic.json").read_text())
    except (OSError, ValueError):
        return False
    slides = old.pop("slides", {})
    files = [out / f"{sid}.{params['fmt']}" for sid in slides] + [out / "manifest.csv"]
    return old == params and all(f.exists() for f in files)


def load_masks(masks_dir: str | os.PathLike, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
    """Read back the (tissue, lesion) bool masks that make_cohort wrote for `slide_id`."""
    d = Path(masks_dir)
    return tuple(
        np.asarray(Image.open(d / f"{slide_id}_{k}.png")) > 127  # type: ignore[return-value]
        for k in ("tissue", "lesion")
    )


MASK_KINDS = ("tissue", "lesion", "mimic")


def load_mask(masks_dir: str | os.PathLike, slide_id: str, kind: str) -> np.ndarray:
    """Read back one bool mask that make_cohort wrote for `slide_id`: kind 'tissue', 'lesion' or 'mimic'."""
    if kind not in MASK_KINDS:
        raise OptionError(f"expected the mask kind to be one of 'tissue', 'lesion', 'mimic', got {kind!r} instead")
    path = Path(masks_dir) / f"{slide_id}_{kind}.png"
    if kind == "mimic" and not path.exists():
        raise FileNotFoundError(f"{path} does not exist: the cohort was made without a mimic (make it with --mimic-fraction > 0)")
    return np.asarray(Image.open(path)) > 127
