"""The bag convention shared by every pooling operator, head and loss.

A batch of bags is ``X: (B, N, D)`` float with ``mask: (B, N)`` bool, True = real instance,
False = padding; ``mask=None`` means every instance is real. Padding must never change an
output. `check_bag` validates once at the boundary and returns the cleaned pair;
`masked_softmax` and `masked_fill_value` are the two primitives that make padding inert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mil.errors import BagError


@dataclass
class BagOutput:
    """What every head returns.

    Attributes:
        logits: ``(B,)`` bag logits (before the sigmoid).
        instance_scores: ``(B, N)`` instance logits (every head fills them; padded positions are finite but meaningless).
        attention: ``(B, N)`` attention weights summing to 1 over real instances (padding: 0), or None.
    """

    logits: torch.Tensor
    instance_scores: torch.Tensor | None = None
    attention: torch.Tensor | None = None


def check_bag(X: torch.Tensor, mask: torch.Tensor | None = None, *, input_name: str = "X") -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a batch of bags and return ``(X, mask)`` with a full bool mask.

    Args:
        X: ``(B, N, D)`` float tensor, or ``(N, D)`` for a single bag (a batch axis is added).
        mask: ``(B, N)`` (or ``(N,)``) bool, True = real instance; None = all real.

    Returns:
        ``X (B, N, D)`` floating, ``mask (B, N)`` bool on X's device.

    Raises:
        BagError: wrong shape/dtype, or a bag without any real instance (naming its index).
    """
    if not isinstance(X, torch.Tensor):
        raise BagError(f"expected {input_name} to be a torch.Tensor of shape (B, N, D), got {type(X).__name__} instead.")
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise BagError(f"expected mask to be a bool torch.Tensor of shape (B, N) or None, got {type(mask).__name__} instead.")
    if X.ndim == 2:
        X = X.unsqueeze(0)  # (1, N, D)
        mask = mask.unsqueeze(0) if mask is not None and mask.ndim == 1 else mask
    if X.ndim != 3:
        raise BagError(
            f"expected {input_name} of shape (batch_size, bag_size, in_dim), got shape {tuple(X.shape)} instead; "
            "a single bag of shape (N, D) is also accepted."
        )
    if not X.is_floating_point():
        raise BagError(f"expected {input_name} to be a floating-point tensor, got dtype {X.dtype} instead; use X.float().")
    B, N, _ = X.shape
    if mask is None:
        mask = torch.ones(B, N, dtype=torch.bool, device=X.device)  # (B, N)
    else:
        if tuple(mask.shape) != (B, N):
            raise BagError(f"expected mask of shape {(B, N)} to match {input_name}, got {tuple(mask.shape)} instead.")
        mask = mask.to(device=X.device, dtype=torch.bool)  # (B, N)
    if B and (N == 0 or not bool(mask.any(dim=1).all())):  # (a batch of no bags has no empty bag to name)
        empty = [i for i in range(B) if N == 0 or not bool(mask[i].any())]
        raise BagError(f"bag {empty[0]} of the batch has no real instance (mask all False or N = 0); drop empty bags before the model.")
    return X, mask


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over real instances only; padded positions get exactly 0.

    Args:
        scores: ``(B, N)`` (or any shape matching `mask`).
        mask: bool, True = real.
    """
    scores = scores.masked_fill(~mask, float("-inf"))  # (B, N)
    return torch.softmax(scores, dim=dim).masked_fill(~mask, 0.0)  # (B, N)


def masked_fill_value(x: torch.Tensor, mask: torch.Tensor, value: float) -> torch.Tensor:
    """Replace padded positions of ``x (B, N, …)`` by `value` (e.g. -inf before a max).

    Without padding (a CPU mask that is all True: one bag per batch) `x` itself is returned: no
    copy of the whole bag. (On a GPU the check would cost a device sync; the copy is cheap there.)
    """
    if mask.device.type == "cpu" and bool(mask.all()):
        return x  # (B, N, …) unchanged
    m = mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))  # (B, N, 1…)
    return x.masked_fill(~m, value)
