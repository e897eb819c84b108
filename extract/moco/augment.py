"""MoCo v2's "aug+" augmentations for H&E tiles, batched on the training device."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


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
