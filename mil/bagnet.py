"""BagNet: an image classifier whose instances are the positions of its last feature map.

A ResNet-50-shaped network whose receptive field (RF) is set by how many bottleneck blocks use a
3×3 rather than a 1×1 middle convolution, as in the code of Pawlowski et al., *Needles in
Haystacks* (2020), itself adapted from Brendel & Bethge's BagNets. Each position of the final
feature map sees only an ``rf × rf`` patch of the image, so the map is a bag of local embeddings;
a shared pooling operator (`mil.pooling`) turns the bag into one embedding and a linear classifier
into one logit::

    net = create_bagnet(rf=33, pooling="max", width=0.25)     # 1-channel images by default
    F = net.embed(x)                         # x (B, 1, H, W) → F (B, C, h, w), C = net.embed_dim
    logits = net(x)                          # (B,)
    out = net.forward_bag(x)                 # BagOutput: logits (B,), instance_scores (B, h·w), attention
    S = net.saliency(x)                      # (B, h, w) instance logits as a map

Geometry (every RF, every canvas size): ``h = ceil((H − 2) / 8)`` (``w`` alike); position
``(i, j)`` is centred on input pixel ``(8i + 1, 8j + 1)`` and depends on the ``rf × rf`` square
around it (zero padding where that square leaves the image); `receptive_field` derives the RF.

Architecture, following the authors' ``model/model.py``:

* stem: ``conv 1×1 (C_in → 64w, no bias) → conv 3×3 (stride 1, padding 0) → norm → ReLU``;
* 4 stages of bottleneck blocks ``[3, 4, 6, 3]``, widths ``64w · {1, 2, 4, 8}``, expansion 4,
  strides ``[2, 2, 2, 1]`` in the middle conv of each stage's first block;
* ``kernel3 = (k1, k2, k3, k4)``: the first ``k_s`` blocks of stage ``s`` have a 3×3 middle conv
  (padding 1), the rest 1×1; rf 9 = (1, 1, 0, 0), rf 33 = (1, 1, 1, 1), rf 177 = (3, 4, 6, 3);
* ``compensate``: a 1×1 middle conv is ``int(2.5 · planes)`` wide, so the parameter count barely
  depends on the RF; norm = affine InstanceNorm by default; a shortcut ``conv 1×1 (stride s) → norm``
  wherever the shape changes; conv weights ``~ N(0, sqrt(2 / (k · k · C_out)))``, norm weight 1, bias 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from mil.bags import BagError, BagOutput
from mil.errors import OptionError
from mil.pooling import AttentionPool, check_dropout, check_option, create_pooling
from mil.registry import Registry

__all__ = ["BAGNETS", "BLOCKS", "KERNEL3", "NORMS", "STRIDES", "BagNet", "Bottleneck", "create_bagnet", "list_bagnets", "receptive_field"]

BAGNETS = Registry("bagnet")

BLOCKS = (3, 4, 6, 3)  # bottleneck blocks per stage (ResNet-50)
STRIDES = (2, 2, 2, 1)  # stride of each stage's first block
KERNEL3 = {9: (1, 1, 0, 0), 33: (1, 1, 1, 1), 177: (3, 4, 6, 3)}  # rf → 3×3 blocks per stage
EXPANSION = 4
STRIDE = 8  # total stride: one step on the feature map = 8 input pixels
OFFSET = 1  # position i is centred on input pixel STRIDE · i + OFFSET (the padding-0 3×3 stem)
MIN_SIZE = 11  # smallest H, W: the final map must have ≥ 2 positions per axis (InstanceNorm needs > 1)

NORMS: dict[str, Callable[[int], nn.Module]] = {
    "in_aff": lambda c: nn.InstanceNorm2d(c, affine=True),
    "in": lambda c: nn.InstanceNorm2d(c),
    "bn": lambda c: nn.BatchNorm2d(c),
}


def receptive_field(kernel3: Sequence[int]) -> int:
    """Receptive field (side, in input pixels) of one output position for a `kernel3` layout.

    Only the stem's 3×3 conv and the 3×3 middle convs grow the RF; a 3×3 conv met when one
    feature-map step spans ``j`` input pixels adds ``2j``; strides multiply ``j`` after the first
    block of stages 1–3. Padding does not change it: a padded position has no input behind it.
    So (1, 1, 0, 0) → 3 + 2·1 + 2·2 = 9; (1, 1, 1, 1) → 9 + 2·4 + 2·8 = 33;
    (3, 4, 6, 3) → 3 + (2 + 2·2·2) + (2·2 + 3·2·4) + (2·4 + 5·2·8) + 3·2·8 = 177.
    """
    rf, jump = 3, 1  # after the stem's 3×3 conv
    for k, n, s in zip(kernel3, BLOCKS, STRIDES):
        for b in range(n):
            if b < k:
                rf += 2 * jump  # 3×3 middle conv at the current spacing
            if b == 0:
                jump *= s  # the first block's stride takes effect after its middle conv
    return rf


def _conv(c_in: int, c_out: int, k: int = 1, stride: int = 1, padding: int = 0) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=k, stride=stride, padding=padding, bias=False)


class Bottleneck(nn.Module):
    """``1×1 → norm → ReLU → k×k (stride) → norm → [Dropout2d] → ReLU → 1×1 → norm``, + shortcut, → ReLU.

    ``(B, c_in, H, W) → (B, 4·planes, ceil(H/stride), ceil(W/stride))``. The middle conv is 3×3 with
    padding 1, or 1×1 (``int(2.5 · planes)`` wide when `compensate`).
    """

    def __init__(
        self, c_in: int, planes: int, stride: int, kernel: int, norm: Callable[[int], nn.Module], compensate: bool, dropout: float
    ) -> None:
        super().__init__()
        mid = int(2.5 * planes) if compensate and kernel == 1 else planes
        c_out = planes * EXPANSION
        self.conv1, self.norm1 = _conv(c_in, planes), norm(planes)
        self.conv2, self.norm2 = _conv(planes, mid, kernel, stride, (kernel - 1) // 2), norm(mid)
        self.drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv3, self.norm3 = _conv(mid, c_out), norm(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential(_conv(c_in, c_out, 1, stride), norm(c_out)) if stride != 1 or c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, c_in, H, W)`` → ``(B, 4·planes, H', W')``."""
        out = self.relu(self.norm1(self.conv1(x)))  # (B, planes, H, W)
        out = self.relu(self.drop(self.norm2(self.conv2(out))))  # (B, mid, H', W')
        out = self.norm3(self.conv3(out))  # (B, 4·planes, H', W')
        return self.relu(out + self.shortcut(x))  # (B, 4·planes, H', W')


class BagNet(nn.Module):
    """BagNet encoder + pooling over positions + ``Linear(C, 1)``; see the module docstring.

    Args:
        kernel3: 3×3 middle convs per stage, ``(k1, k2, k3, k4)`` with ``0 ≤ k_s ≤ (3, 4, 6, 3)_s``.
        pooling: a `mil.pooling` name (mean, max, logsumexp, attention, gated_attention).
        width: channel multiplier (the paper's ``2^w'``); stage widths ``round(64·width) · {1, 2, 4, 8}``.
        in_chans: image channels (1 for nMNIST, 3 for nCAMELYON).
        norm: ``"in_aff"`` (InstanceNorm2d, affine), ``"in"`` (not affine) or ``"bn"`` (BatchNorm2d).
        compensate: make 1×1 middle convs 2.5× wider.
        dropout: Dropout2d probability after the middle conv of each stage's first block (the
            authors' placement); 0 = none.
        pool_kwargs: passed to the pooling (``r`` for logsumexp, ``attn_dim`` for attention).

    Attributes:
        embed_dim: ``C = 32 · round(64·width)`` channels of the embedding (2048·width when 64·width is whole).
        rf: receptive field side in pixels; ``stride`` = 8, ``offset`` = 1 (see `feature_size`).
        config: the resolved arguments; ``create_bagnet(**net.config)`` rebuilds the same network.
    """

    stride = STRIDE
    offset = OFFSET

    def __init__(
        self,
        kernel3: Sequence[int],
        pooling: str = "max",
        width: float = 1.0,
        in_chans: int = 1,
        norm: str = "in_aff",
        compensate: bool = True,
        dropout: float = 0.0,
        **pool_kwargs,
    ) -> None:
        super().__init__()
        _check_kernel3(kernel3)
        check_option(
            "bagnet", "width", width, isinstance(width, (int, float)) and not isinstance(width, bool) and width > 0, "a number > 0"
        )
        check_option("bagnet", "in_chans", in_chans, isinstance(in_chans, int) and in_chans >= 1, "an integer >= 1")
        check_option("bagnet", "norm", norm, norm in NORMS, f"one of {', '.join(NORMS)}")
        check_dropout("bagnet", dropout)
        self.kernel3 = tuple(int(k) for k in kernel3)
        self.rf = receptive_field(self.kernel3)
        self.in_chans = in_chans
        self.config = dict(
            rf=self.rf if self.kernel3 == KERNEL3.get(self.rf) else None,
            kernel3=self.kernel3,
            pooling=pooling,
            width=float(width),
            in_chans=in_chans,
            norm=norm,
            compensate=bool(compensate),
            dropout=float(dropout),
            **pool_kwargs,
        )
        make_norm = NORMS[norm]
        base = max(1, round(64 * width))
        self.stem = nn.Sequential(_conv(in_chans, base), _conv(base, base, 3), make_norm(base), nn.ReLU(inplace=True))
        stages, c = [], base
        for s, (n, k3, stride) in enumerate(zip(BLOCKS, self.kernel3, STRIDES)):
            planes = base * 2**s
            blocks = []
            for b in range(n):
                blocks.append(
                    Bottleneck(c, planes, stride if b == 0 else 1, 3 if b < k3 else 1, make_norm, compensate, dropout if b == 0 else 0.0)
                )
                c = planes * EXPANSION
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.embed_dim = c
        self.pool = _make_pooling(pooling, c, pool_kwargs)
        self.classifier = nn.Linear(c, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            elif isinstance(m, (nn.InstanceNorm2d, nn.BatchNorm2d)) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @classmethod
    def feature_size(cls, H: int, W: int) -> tuple[int, int]:
        """Feature-map size ``(h, w) = (ceil((H − 2) / 8), ceil((W − 2) / 8))`` for an ``H × W`` image.

        Position ``(i, j)`` is centred on input pixel ``(8i + 1, 8j + 1)`` and sees the ``rf × rf``
        square around it; near the border part of that square is zero padding.
        """
        return -(-(H - 2) // STRIDE), -(-(W - 2) // STRIDE)

    def _check_image(self, x: torch.Tensor) -> None:
        ok = isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[1] == self.in_chans and x.is_floating_point()
        if not ok or min(x.shape[-2:]) < MIN_SIZE:
            found = f"shape {tuple(x.shape)}, dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise BagError(f"expected float images of shape (B, {self.in_chans}, H, W) with H, W >= {MIN_SIZE}, got {found} instead.")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Topological embedding: ``x (B, C_in, H, W)`` → ``F (B, C, h, w)`` (see `feature_size`)."""
        self._check_image(x)
        return self.stages(self.stem(x))  # (B, C, h, w)

    def _pool(self, F: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``F (B, C, h, w)`` → bag ``X (B, h·w, C)``, pooled ``Z (B, C)``, pooling weights ``(B, h·w)`` or None."""
        X = F.flatten(2).transpose(1, 2)  # (B, h·w, C) positions are the instances
        mask = X.new_ones(X.shape[:2], dtype=torch.bool)  # (B, h·w) every position is real: no check needed
        Z, weights = self.pool.compute(X, mask)  # (B, C), (B, h·w) | None
        return X, Z, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, C_in, H, W)`` → bag logits ``(B,)``."""
        _, Z, _ = self._pool(self.embed(x))  # (B, C)
        return self.classifier(Z).squeeze(-1)  # (B,)

    def forward_bag(self, x: torch.Tensor) -> BagOutput:
        """``x (B, C_in, H, W)`` → `BagOutput` over the ``h·w`` positions (row-major, as ``F.flatten(2)``).

        ``logits (B,)``; ``instance_scores (B, h·w)``: the classifier applied to each position's
        embedding; ``attention (B, h·w)``: the learned weights of attention poolings, else None
        (mean pooling's uniform weights carry no information and are not returned).
        """
        X, Z, weights = self._pool(self.embed(x))  # (B, h·w, C), (B, C), (B, h·w) | None
        logits = self.classifier(Z).squeeze(-1)  # (B,)
        scores = self.classifier(X).squeeze(-1)  # (B, h·w)
        return BagOutput(logits, scores, weights if isinstance(self.pool, AttentionPool) else None)

    def saliency(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, C_in, H, W)`` → instance-logit map ``(B, h, w)``; position ``(i, j)`` ↔ pixel ``(8i + 1, 8j + 1)``."""
        F = self.embed(x)  # (B, C, h, w)
        return self.classifier(F.permute(0, 2, 3, 1)).squeeze(-1)  # (B, h, w)


def _check_kernel3(kernel3: object) -> None:
    ok = (
        isinstance(kernel3, (tuple, list))
        and len(kernel3) == 4
        and all(isinstance(k, int) and not isinstance(k, bool) and 0 <= k <= n for k, n in zip(kernel3, BLOCKS))
    )
    check_option("bagnet", "kernel3", kernel3, ok, "4 integers (k1, k2, k3, k4) with 0 <= k_s <= (3, 4, 6, 3)_s")


def _make_pooling(name: str, dim: int, pool_kwargs: dict) -> nn.Module:
    """`create_pooling`, with an `OptionError` (not a TypeError) for a keyword the pooling does not take."""
    try:
        return create_pooling(name, dim=dim, **pool_kwargs)
    except TypeError as e:
        raise OptionError(f"expected only options that {name} pooling takes, got {sorted(pool_kwargs)} instead ({e}).") from None


def _register(rf: int) -> None:
    @BAGNETS.register(name=f"bagnet{rf}")
    def make(
        pooling: str = "max",
        width: float = 1.0,
        in_chans: int = 1,
        norm: str = "in_aff",
        compensate: bool = True,
        dropout: float = 0.0,
        **pool_kwargs,
    ) -> BagNet:
        return BagNet(
            KERNEL3[rf], pooling=pooling, width=width, in_chans=in_chans, norm=norm, compensate=compensate, dropout=dropout, **pool_kwargs
        )

    make.__doc__ = f"BagNet with receptive field {rf} (kernel3 = {KERNEL3[rf]})."


for _rf in KERNEL3:
    _register(_rf)


def create_bagnet(
    rf: int | None = 33,
    pooling: str = "max",
    width: float = 1.0,
    in_chans: int = 1,
    norm: str = "in_aff",
    compensate: bool = True,
    dropout: float = 0.0,
    kernel3: Sequence[int] | None = None,
    **pool_kwargs,
) -> BagNet:
    """Build a BagNet with receptive field `rf` (9, 33 or 177), or with an explicit `kernel3` layout.

    ``create_bagnet(rf=33, pooling="logsumexp", width=0.25, r=1.0)``; see `BagNet` for the arguments.
    With `kernel3`, `rf` may be None or must equal ``receptive_field(kernel3)`` (e.g. (1, 1, 1, 0) → 17).

    Raises:
        OptionError: an rf other than 9, 33, 177, a bad kernel3, width, norm, dropout or pooling option.
    """
    if kernel3 is not None:
        _check_kernel3(kernel3)
        got = receptive_field(kernel3)
        check_option("bagnet", "rf", rf, rf is None or rf == got, f"None or {got}, the receptive field of kernel3={tuple(kernel3)}")
        return BagNet(
            kernel3, pooling=pooling, width=width, in_chans=in_chans, norm=norm, compensate=compensate, dropout=dropout, **pool_kwargs
        )
    check_option("bagnet", "rf", rf, isinstance(rf, int) and rf in KERNEL3, f"one of {', '.join(map(str, KERNEL3))} (or give kernel3)")
    return BAGNETS.create(
        f"bagnet{rf}", pooling=pooling, width=width, in_chans=in_chans, norm=norm, compensate=compensate, dropout=dropout, **pool_kwargs
    )


def list_bagnets() -> list[str]:
    """Names of the registered BagNets, by receptive field: ``["bagnet9", "bagnet33", "bagnet177"]``."""
    return sorted(BAGNETS.names(), key=lambda n: int(n.removeprefix("bagnet")))
