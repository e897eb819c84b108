"""Tiles for MoCo pretraining: the tiles stage's coords, a seeded sample per slide, two views per tile.

Nothing is dumped to image files. Coords come from the tiles stage (slides without a coords file
are tiled first, as `mil extract features` does); tiles are read from the slides in DataLoader
worker processes with `TileDataset` (one OpenSlide handle per slide and worker, at most `MAX_OPEN`
open at once), as in feature extraction; the training process receives ``(B, T, T, 3)`` uint8
batches and makes two views of each tile with `Augment`, batched, on its device.
"""

from __future__ import annotations

import json
import math
import warnings
import zlib
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mil.errors import OptionError, SettingsMismatchError
from mil.extract.reader import TileDataset
from mil.extract.tiles import TilingConfig, check_existing, failed, tile_slide

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


@dataclass(frozen=True)
class Augment:
    """MoCo v2's "aug+" for H&E tiles, as batched tensor ops on the training device.

    Random resized crop (area ``crop_scale``, aspect ``crop_ratio``), colour jitter (``p_jitter``:
    brightness, contrast, saturation, hue), grayscale (``p_gray``), Gaussian blur (``p_blur``, σ in px
    of a 224 px view, scaled with the view's side), and a uniformly drawn flip/90° turn (tissue has no
    orientation). Every draw is per tile, from torch's random generator on the tiles' device.

    Running on the device, not per tile in the DataLoader workers, keeps the workers' cost to reading
    (torchvision's per-image ops cost ~30 ms per 224 px view on one CPU core, ~60 ms per tile).
    Two departures from torchvision's ops, both cheaper and batched: the four jitter ops run in a
    fixed order (torchvision shuffles it), and hue is a rotation about the grey axis of RGB space by
    up to ±``jitter[3]`` of a turn (HSV's hue is the hexagonal version of the same angle).
    """

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    p_jitter: float = 0.8
    p_gray: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # px of a 224 px view
    p_blur: float = 0.5
    dihedral: bool = True  # flips and 90° turns

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """One augmented view of each tile: `(B, 3, S, S)` float in [0, 1] → `(B, 3, S, S)` in [0, 1]."""
        return self.blur(self.colour(self.geometry(x)))

    def geometry(self, x: torch.Tensor) -> torch.Tensor:
        """Crop a random rectangle, resize it to S × S, flip and turn it: one `grid_sample`."""
        B, dev = x.shape[0], x.device
        area = self.crop_scale[0] + (self.crop_scale[1] - self.crop_scale[0]) * torch.rand(B, device=dev)  # (B,)
        lo, hi = math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])
        ratio = torch.exp(lo + (hi - lo) * torch.rand(B, device=dev))  # (B,) width / height
        w = torch.sqrt(area * ratio).clamp(max=1.0)  # (B,) crop width, fraction of the side
        h = torch.sqrt(area / ratio).clamp(max=1.0)  # (B,)
        cx = (1 - w) * (2 * torch.rand(B, device=dev) - 1)  # (B,) centre in [-1, 1] coords, crop inside
        cy = (1 - h) * (2 * torch.rand(B, device=dev) - 1)  # (B,)
        k = torch.randint(4, (B,), device=dev) if self.dihedral else torch.zeros(B, dtype=torch.long, device=dev)  # (B,)
        f = 1.0 - 2.0 * (torch.rand(B, device=dev) < 0.5).float() if self.dihedral else torch.ones(B, device=dev)  # (B,) ±1
        c = torch.tensor([1.0, 0.0, -1.0, 0.0], device=dev)[k]  # (B,) cos(k·90°)
        s = torch.tensor([0.0, 1.0, 0.0, -1.0], device=dev)[k]  # (B,) sin(k·90°)
        # input (x, y) = centre + diag(w, h) · rotation(k) · flip(f) · output (u, v)
        theta = torch.stack([torch.stack([w * c * f, -w * s, cx], 1), torch.stack([h * s * f, h * c, cy], 1)], 1)  # (B, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, S, S, 2)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)  # (B, 3, S, S)

    def colour(self, x: torch.Tensor) -> torch.Tensor:
        """Colour jitter on a random ``p_jitter`` of the tiles, then grayscale on ``p_gray``."""
        B, dev = x.shape[0], x.device
        jb, jc, js, jh = self.jitter
        b, c, s = (1 + j * (2 * torch.rand(B, 1, 1, 1, device=dev) - 1) for j in (jb, jc, js))  # (B, 1, 1, 1) each
        y = (x * b).clamp(0, 1)  # brightness, (B, 3, S, S)
        y = (c * y + (1 - c) * _gray(y).mean((-2, -1), keepdim=True)).clamp(0, 1)  # contrast
        y = (s * y + (1 - s) * _gray(y)).clamp(0, 1)  # saturation
        angle = 2 * math.pi * jh * (2 * torch.rand(B, device=dev) - 1)  # (B,) hue, radians
        y = torch.einsum("bij,bjhw->bihw", _hue_rotation(angle), y).clamp(0, 1)  # (B, 3, S, S)
        x = torch.where(torch.rand(B, 1, 1, 1, device=dev) < self.p_jitter, y, x)  # (B, 3, S, S)
        return torch.where(torch.rand(B, 1, 1, 1, device=dev) < self.p_gray, _gray(x).expand_as(x), x)  # (B, 3, S, S)

    def blur(self, x: torch.Tensor) -> torch.Tensor:
        """Gaussian blur with a random σ on a random ``p_blur`` of the tiles (separable, per-tile kernels)."""
        B, _, H, W = x.shape
        chosen = torch.nonzero(torch.rand(B, device=x.device) < self.p_blur).squeeze(1)  # (b,)
        if chosen.numel() == 0:
            return x
        lo, hi = (sigma * W / 224 for sigma in self.blur_sigma)
        r = max(1, min(math.ceil(3 * hi), H - 1, W - 1))  # kernel radius: 3 σ, inside the image for reflect padding
        sigma = lo + (hi - lo) * torch.rand(chosen.numel(), 1, device=x.device)  # (b, 1)
        t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)  # (2r + 1,)
        kern = torch.exp(-(t**2) / (2 * sigma**2))  # (b, 2r + 1)
        kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(3, 0)  # (3b, 2r + 1), one per channel
        y = F.pad(x[chosen].reshape(1, -1, H, W), (r, r, r, r), mode="reflect")  # (1, 3b, H + 2r, W + 2r)
        y = F.conv2d(y, kern.view(-1, 1, 1, 2 * r + 1), groups=kern.shape[0])  # (1, 3b, H + 2r, W)
        y = F.conv2d(y, kern.view(-1, 1, 2 * r + 1, 1), groups=kern.shape[0])  # (1, 3b, H, W)
        x = x.clone()
        x[chosen] = y.view(-1, 3, H, W)
        return x  # (B, 3, S, S)

    def as_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma `(B, 1, S, S)` of RGB `(B, 3, S, S)` (torchvision's grayscale weights)."""
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]  # (B, 1, S, S)


def _hue_rotation(angle: torch.Tensor) -> torch.Tensor:
    """Rotations of RGB space about the grey axis (1, 1, 1)/√3 by `angle` `(B,)` → `(B, 3, 3)` (Rodrigues)."""
    cos, sin = torch.cos(angle).view(-1, 1, 1), torch.sin(angle).view(-1, 1, 1)  # (B, 1, 1)
    eye = torch.eye(3, device=angle.device)  # (3, 3)
    cross = torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]], device=angle.device) / math.sqrt(3)  # [a]×
    outer = torch.full((3, 3), 1 / 3, device=angle.device)  # a aᵀ
    return cos * eye + sin * cross + (1 - cos) * outer  # (B, 3, 3)


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
