"""Tiles for MoCo pretraining: the tiles stage's coords, a seeded sample per slide, two views per tile.

Nothing is dumped to image files. Coords come from the tiles stage (slides without a coords file
are tiled first, as `mil extract features` does); tiles are read from the slides in DataLoader
worker processes with `TileDataset` (one OpenSlide handle per slide and worker, at most `MAX_OPEN`
open at once), as in feature extraction; the training process receives ``(B, T, T, 3)`` uint8
batches and makes two views of each tile with `Augment`, batched, on its device.
"""

from __future__ import annotations

import warnings
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from mil.errors import OptionError, SettingsMismatchError
from mil.extract.wsi.reader import TileDataset
from mil.extract.wsi.tiles import TilingConfig, check_existing, failed, tile_slide

MAX_OPEN = 32  # open slides per worker process; older handles are closed


def plan_tiling(slides: pd.DataFrame, coords_dir: Path, tiling: TilingConfig, overwrite: bool = False) -> list[str]:
    """The slide ids whose coords must be made; reads only.

    A coords file with the same tiling settings is reused (even with `overwrite`, which concerns
    the MoCo run: coords are deterministic); one with other settings is re-made with `overwrite`.

    Raises:
        SettingsMismatchError: a coords file exists with other tiling settings (without `overwrite`).
    """
    todo = []
    for sid, mpp in zip(slides["slide_id"], slides["mpp"]):
        try:
            done = check_existing(coords_dir, sid, tiling.settings(tiling.slide_mpp_override(mpp)))
        except SettingsMismatchError:
            if not overwrite:
                raise
            done = False
        if not done:
            todo.append(sid)
    return todo


def tile_missing(slides: pd.DataFrame, todo: list[str], coords_dir: Path, tiling: TilingConfig, progress: bool = True) -> dict[str, str]:
    """Tile the slides of `todo` into `coords_dir`; return ``{slide_id: error}`` of those that failed
    (their coords file, if an old one was there, is removed: they are left out of training)."""
    from rich.console import Console
    from rich.progress import Progress

    (coords_dir / "thumbnails").mkdir(parents=True, exist_ok=True)
    rows = slides[slides["slide_id"].isin(todo)]
    errors: dict[str, str] = {}
    console = Console(stderr=True)
    with Progress(console=console, disable=not progress or not todo, transient=True) as bar:
        task = bar.add_task("tiling", total=len(rows))
        for sid, path, mpp in zip(rows["slide_id"], rows["path"], rows["mpp"]):
            try:
                with warnings.catch_warnings():  # empty slides simply give no tiles
                    warnings.simplefilter("ignore")
                    tile_slide(sid, path, coords_dir, tiling, tiling.slide_mpp_override(mpp))
            except Exception as e:  # noqa: BLE001 — one bad slide must not stop the others
                errors[sid] = failed(sid, path, e).error
                (coords_dir / f"{sid}.h5").unlink(missing_ok=True)
                console.print(f"[red]error[/red] {sid}: {errors[sid]} (left out of training)", highlight=False, soft_wrap=True)
            bar.update(task, advance=1)
    return errors


def sample_tiles(slides: pd.DataFrame, coords_dir: Path, tiles_per_slide: int | None, seed: int) -> list[TileDataset]:
    """One `TileDataset` per slide that has coords, holding at most `tiles_per_slide` of them.

    The sample of a slide depends only on (`seed`, slide id), drawn without replacement and kept
    in grid order (reads stay local); slides without a coords file (failed) are left out.
    """
    sources = []
    for sid, path in zip(slides["slide_id"], slides["path"]):
        f = coords_dir / f"{sid}.h5"
        if not f.exists():
            continue
        ds = TileDataset.from_coords_file(f, path)
        n = len(ds)
        if tiles_per_slide is not None and n > tiles_per_slide:
            rng = np.random.default_rng([seed, zlib.crc32(str(sid).encode())])
            keep = np.sort(rng.choice(n, size=tiles_per_slide, replace=False))  # (tiles_per_slide,)
            ds = TileDataset(path, ds.coords[keep], ds.size0, ds.tile_size, ds.level0_mpp)
        if len(ds):
            sources.append(ds)
    return sources


class MocoTiles(Dataset):
    """The sampled tiles of many slides; ``ds[i]`` is tile i, `(T, T, 3)` uint8 as read from its slide.

    Args:
        sources: one `TileDataset` per slide (`sample_tiles`); all share the tile size.
    """

    def __init__(self, sources: list[TileDataset]) -> None:
        self.sources = sources
        self.offsets = np.cumsum([0] + [len(s) for s in sources])  # (n_slides + 1,)
        self._open: OrderedDict[int, None] = OrderedDict()  # slides with an open handle, oldest first

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        s = int(np.searchsorted(self.offsets, i, side="right")) - 1
        self._open[s] = None
        self._open.move_to_end(s)
        if len(self._open) > MAX_OPEN:  # bound the open handles (and OpenSlide's caches) per worker
            self.sources[self._open.popitem(last=False)[0]].close()
        return self.sources[s][i - int(self.offsets[s])]  # (T, T, 3) uint8

    def __getstate__(self):  # workers start with no open handle (TileDataset drops its own)
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state


def collate_tiles(batch: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(batch))  # (B, T, T, 3) uint8


def select_splits(slides: pd.DataFrame, splits: tuple[str, ...] | None) -> pd.DataFrame:
    """The rows of `slides` that MoCo trains on: those whose ``split`` is in `splits`, or, with
    ``splits=None``, every row but the test split's (rows without a split are kept; a table without
    a split column keeps every row). Warns when the test split is chosen.

    Raises:
        OptionError: the selection leaves no slide.
    """
    split = slides["split"].fillna("").astype(str) if "split" in slides.columns else pd.Series("", index=slides.index)
    keep = split.isin(splits) if splits is not None else split != "test"
    if not keep.any():
        found = ", ".join(f"{n} {k or 'without a split'}" for k, n in split.value_counts().items()) or "no slides"
        want = ",".join(splits) if splits is not None else "(default: every split but test)"
        raise OptionError(f"expected --splits {want} to select at least one slide, got none of the manifest's ({found}) instead.")
    if splits is not None and "test" in splits:
        warnings.warn(
            f"--splits includes test: the test split's {int((split == 'test').sum())} slides are included in self-supervised "
            "pretraining, so an evaluation on them with this encoder is not independent.",
            stacklevel=2,
        )
    return slides[keep]
