"""`mil extract features`: embed every tile of every slide into one HDF5 file per slide.

A producer/consumer pipeline: DataLoader worker processes read and decode tiles (one
OpenSlide handle each, see `TileDataset`), the encoder runs in the main process on fixed-size
batches, and each batch of features is written into the HDF5 file as it is produced, so
memory stays bounded whatever the number of tiles.

Output per slide, ``OUT/<slide_id>.h5`` (CLAM/TRIDENT compatible, see docs/architecture.md)::

    features        (N, D) float32 (or float16), chunked by rows; attrs: encoder
    coords          (N, 2) int64 level-0 px; attrs as written by `mil extract tiles`
    tissue_fraction (N,), tissue_mask   copied from the tiles file
    file attrs      slide_id, encoder, encoder_weights_sha256, feature_dim, encoder_config,
                    feature_settings, tissue_params, tiling_settings, mil_version

Slides without a coords file are tiled first (`tile_slide`, same layout). A slide whose file
already holds features made with the same settings is skipped; other settings are refused
before any work unless ``overwrite``.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

import mil
from mil.atomic import atomic_path, remove_stale_temporaries
from mil.errors import OptionError
from mil.extract.wsi.reader import TileDataset
from mil.extract.wsi.tiles import SlideResult, TilingConfig, check_existing, failed, tile_slide, write_report
from mil.rundir import refuse_other_settings

ROWS_PER_CHUNK = 1024  # HDF5 chunk height: whole bags read fast, random rows acceptably
DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass(frozen=True)
class FeatureConfig:
    """Options of the feature stage (the encoder itself is built once and passed in)."""

    tiling: TilingConfig = field(default_factory=TilingConfig)
    batch_size: int = 64
    workers: int = 2
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise OptionError(f"expected --batch-size >= 1, got {self.batch_size!r} instead.")
        if self.workers < 0:
            raise OptionError(f"expected --workers >= 0, got {self.workers!r} instead.")
        if self.dtype not in DTYPES:
            raise OptionError(f"expected --dtype to be float32 or float16, got {self.dtype!r} instead.")


def feature_settings(encoder, config: FeatureConfig) -> dict:
    """What determines a slide's features; stored in the file and compared on reruns."""
    d = encoder.describe()
    return {k: d[k] for k in ("name", "weights_sha256", "input_size", "mean", "std", "precision", "seed")} | {"dtype": config.dtype}


def _stored_feature_settings(path: Path) -> dict | None:
    """Settings of the features already in `path`, or None if it holds only coords."""
    with h5py.File(path, "r") as f:
        if "features" not in f:
            return None
        return json.loads(f.attrs.get("feature_settings", "{}"))


def release_freed_memory() -> bool:
    """Make glibc hand freed activations back to the OS, so peak RSS stays near one batch's working set.

    glibc's default raises its mmap threshold to the size of each large block freed (up to 32 MiB),
    after which the encoder's activations come from per-thread heaps that keep what they free: the
    main process embedding one slide (resnet50_trunc, bf16, batch 32) grew to 1,661 MiB. A fixed
    4 MiB threshold serves those blocks with mmap and returns them at once: 1,051 MiB
    (docs/benchmarks.md, "Stage one against CLAM"). Process-wide, so the CLI calls it, not `run_features`.

    Returns:
        False where there is no glibc (macOS, musl): nothing changed.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, 4 << 20))  # M_MMAP_THRESHOLD: fixed, which also stops its growth
    except (OSError, AttributeError):
        return False


def _collate(batch: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(batch))  # (B, T, T, 3) uint8


def embed_slide(slide_id: str, slide_path: str, coords_file: Path, out_file: Path, encoder, config: FeatureConfig, on_batch=None) -> int:
    """Embed every tile listed in `coords_file`; write ``out_file`` (temporary name, then rename).

    Args:
        on_batch: called with the number of tiles after each batch (progress).

    Returns:
        The number of tiles N.
    """
    ds = TileDataset.from_coords_file(coords_file, slide_path)
    n, dim = len(ds), encoder.feature_dim
    loader = DataLoader(
        ds,
        batch_size=config.batch_size,
        num_workers=config.workers if n else 0,
        collate_fn=_collate,
        pin_memory=str(encoder.device).startswith("cuda"),
        prefetch_factor=2 if config.workers and n else None,  # batches in flight per worker
    )
    settings = feature_settings(encoder, config)
    with h5py.File(coords_file, "r") as src:  # tiles-stage datasets and attrs travel with the features
        extra = {k: (src[k][:], dict(src[k].attrs)) for k in ("tissue_fraction", "tissue_mask") if k in src}
        coord_attrs, file_attrs = dict(src["coords"].attrs), dict(src.attrs)
    with atomic_path(out_file) as tmp, h5py.File(tmp, "w") as f:
        feats = f.create_dataset(
            "features", shape=(n, dim), dtype=DTYPES[config.dtype], chunks=(min(n, ROWS_PER_CHUNK), dim) if n else None
        )
        feats.attrs["encoder"] = encoder.name
        i = 0
        batches = iter(loader)
        try:
            for tiles in batches:  # (B, T, T, 3) uint8, read and decoded in the workers
                z = encoder.encode(tiles)  # (B, D) float32
                feats[i : i + len(z)] = z.cpu().numpy()  # written as produced: memory stays bounded
                i += len(z)
                if on_batch is not None:
                    on_batch(len(z))
        finally:
            # On an error the exception's traceback keeps the iterator alive: shut its workers down
            # now, not when a later slide's forked worker happens to garbage-collect it (torch then
            # prints "AssertionError: can only test a child process"); close the main process's
            # slide handle (workers=0).
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            ds.close()
        if i != n:
            raise RuntimeError(f"{slide_id}: embedded {i} tiles, expected {n}")
        c = f.create_dataset("coords", data=ds.coords)  # (N, 2) int64
        c.attrs.update(coord_attrs)
        for name, (data, attrs) in extra.items():
            d = f.create_dataset(name, data=data, compression="gzip" if data.ndim == 2 else None)
            d.attrs.update(attrs)
        f.attrs.update(file_attrs)
        f.attrs.update(
            slide_id=slide_id,
            encoder=encoder.name,
            encoder_weights_sha256=encoder.weights_sha256,
            feature_dim=dim,
            encoder_config=json.dumps(encoder.describe(), sort_keys=True),
            feature_settings=json.dumps(settings, sort_keys=True),
            mil_version=mil.__version__,
        )
    ds.close()
    return n


def run_features(
    slides: pd.DataFrame,
    out_dir: str | Path,
    encoder,
    config: FeatureConfig,
    *,
    coords_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """Tile (where needed) and embed every slide of a validated manifest table.

    Args:
        slides: from `mil.manifest.read_manifest` or `slides_from_folder`.
        out_dir: where ``<slide_id>.h5`` feature files go.
        encoder: from `mil.extract.create_encoder`.
        coords_dir: where the tiles stage's coords files are (and are written when missing);
            defaults to `out_dir`, in which case each slide's coords file becomes its feature file.

    Returns:
        The report (slide_id, status, n_tiles, seconds, error), also written to
        ``out_dir/extract_report.csv``.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    out_dir = Path(out_dir)
    coords_dir = Path(coords_dir) if coords_dir is not None else out_dir
    for d in (out_dir, coords_dir, coords_dir / "thumbnails"):
        d.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(d)
    tiling = config.tiling
    settings = feature_settings(encoder, config)
    overrides = [tiling.slide_mpp_override(m) for m in slides["mpp"]]

    # Every check before any work: tiling settings of existing coords, feature settings of existing features.
    plan: dict[str, str] = {}  # slide_id -> "skip" | "embed" | "tile+embed"
    for sid, o in zip(slides["slide_id"], overrides):
        has_coords = not overwrite and check_existing(coords_dir, sid, tiling.settings(o))
        old = _stored_feature_settings(out_dir / f"{sid}.h5") if (out_dir / f"{sid}.h5").exists() and has_coords else None
        if old is not None and not overwrite:
            refuse_other_settings(out_dir / f"{sid}.h5", old, settings, what="feature file", ignore=(), redo="re-extract")
        plan[sid] = "skip" if old == settings else ("embed" if has_coords else "tile+embed")
    _write_config(out_dir / "features_config.json", encoder, config, coords_dir, len(slides))

    console = Console(stderr=True)
    results: list[SlideResult] = []
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, disable=not progress) as bar:
        slide_task = bar.add_task("slides", total=len(slides), rate="")
        tile_task = bar.add_task("tiles", total=0, rate="")
        t_start, done_tiles = time.perf_counter(), 0

        def on_batch(k: int) -> None:
            nonlocal done_tiles
            done_tiles += k
            rate = done_tiles / max(time.perf_counter() - t_start, 1e-9)
            bar.update(tile_task, advance=k, rate=f"{rate:,.1f} tiles/s")

        for sid, path, override in zip(slides["slide_id"], slides["path"], overrides):
            t0 = time.perf_counter()
            out_file, coords_file = out_dir / f"{sid}.h5", coords_dir / f"{sid}.h5"
            try:
                if plan[sid] == "skip":
                    with h5py.File(out_file, "r") as f:
                        res = SlideResult(sid, "skipped", int(f["features"].shape[0]))
                else:
                    if plan[sid] == "tile+embed":
                        with warnings.catch_warnings():  # an empty slide is reported below
                            warnings.simplefilter("ignore")
                            tile_slide(sid, path, coords_dir, tiling, override)
                    with h5py.File(coords_file, "r") as f:
                        bar.update(tile_task, total=bar.tasks[tile_task].total + f["coords"].shape[0])
                    t_start, done_tiles = time.perf_counter(), 0
                    n = embed_slide(sid, path, coords_file, out_file, encoder, config, on_batch)
                    res = SlideResult(sid, "ok" if n else "empty", n, time.perf_counter() - t0)
                    if n == 0:
                        console.print(f"[yellow]warning[/yellow] {sid}: no tissue tiles; wrote a valid file with 0 rows.", soft_wrap=True)
            except Exception as e:  # noqa: BLE001 — one bad slide must not stop the batch
                res = failed(sid, path, e)
                console.print(f"[red]error[/red] {sid}: {res.error}", highlight=False, soft_wrap=True)
            results.append(res)
            bar.update(slide_task, advance=1)
    if getattr(encoder, "compile_seconds", None) is not None:
        console.print(f"compiled the encoder in {encoder.compile_seconds:.1f} s (its first batch)", highlight=False)

    return write_report(results, out_dir)


def _write_config(path: Path, encoder, config: FeatureConfig, coords_dir: Path, n_slides: int) -> None:
    """Write the run's resolved options beside its outputs."""
    doc = {
        "stage": "features",
        "mil_version": mil.__version__,
        "encoder": encoder.describe(),
        "device": str(encoder.device),
        "compile": bool(getattr(encoder, "compiled", False)),
        "batch_size": config.batch_size,
        "workers": config.workers,
        "dtype": config.dtype,
        "coords_dir": str(coords_dir),
        "tiling": config.tiling.as_dict(),
        "n_slides": n_slides,
    }
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
