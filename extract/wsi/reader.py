"""Reading tiles at the target resolution, one OpenSlide handle per worker process.

`TileDataset` is a map-style torch dataset over one slide's coords: ``ds[i]`` is tile ``i``
as an ``(tile_size, tile_size, 3)`` uint8 array at the target mpp. The slide is opened lazily,
so a DataLoader's worker processes each get their own handle (OpenSlide handles must not be
shared across a fork).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import openslide
from PIL import Image
from torch.utils.data import Dataset

from mil.errors import SlideError
from mil.slides import best_level, open_slide, rgba_to_rgb


class TileDataset(Dataset):
    """Tiles of one slide, read from the best pyramid level and resized to the target size.

    Args:
        slide_path: the slide file.
        coords: ``(N, 2)`` top-left (x, y) in level-0 px.
        size0: tile side in level-0 px.
        tile_size: tile side in px at the target resolution (the output size).
        level0_mpp: the slide's level-0 mpp as used for tiling (recorded in the coords file).
    """

    def __init__(self, slide_path: str | Path, coords: np.ndarray, size0: int, tile_size: int, level0_mpp: float) -> None:
        self.slide_path = str(slide_path)
        self.coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)  # (N, 2)
        self.size0 = int(size0)
        self.tile_size = int(tile_size)
        self.level0_mpp = float(level0_mpp)
        self._slide = None
        self._level = 0
        self._read = self.size0

    @classmethod
    def from_coords_file(cls, h5_path: str | Path, slide_path: str | Path) -> TileDataset:
        """Build from a coords file written by `mil extract tiles` (or a TRIDENT patches file)."""
        with h5py.File(h5_path, "r") as f:
            d = f["coords"]
            return cls(slide_path, d[:], int(d.attrs["patch_size_level0"]), int(d.attrs["patch_size"]), float(d.attrs["level0_mpp"]))

    def _open(self):
        self._slide = open_slide(self.slide_path)
        self._level = best_level(self._slide.level_downsamples, self.size0 / self.tile_size)
        self._read = max(1, round(self.size0 / self._slide.level_downsamples[self._level]))  # tile side at that level
        return self._slide

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, i: int) -> np.ndarray:
        slide = self._slide or self._open()
        x, y = self.coords[i]
        try:
            region = slide.read_region((int(x), int(y)), self._level, (self._read, self._read))  # RGBA
        except openslide.OpenSlideError as e:  # a corrupt or truncated tile: one line naming the file and tile
            raise SlideError(
                f"{self.slide_path}: could not read the tile at level-0 ({int(x)}, {int(y)}) from pyramid level "
                f"{self._level} ({' '.join(str(e).split())}); the slide file is corrupt or truncated."
            ) from None
        if self._read != self.tile_size:
            k = self._read / self.tile_size
            # Integer factors (448 → 224) use PIL's box reduction: area-averaging and ~free.
            if k.is_integer():
                region = region.reduce(int(k))
            else:
                region = region.resize((self.tile_size, self.tile_size), Image.BILINEAR, reducing_gap=2.0)
        return rgba_to_rgb(region)  # (T, T, 3)

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None

    def __getstate__(self):  # never pickle an open handle into a worker
        state = self.__dict__.copy()
        state["_slide"] = None
        return state
