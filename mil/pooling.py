"""Pooling operators: a bag of instance embeddings ``X (B, N, D)`` → one embedding ``Z (B, D)``.

Every operator is an ``nn.Module`` with ``forward(X, mask=None) -> (Z, weights)``:

* ``X``: ``(B, N, D)`` float (or ``(N, D)`` for one bag); ``mask``: ``(B, N)`` bool, True = real
  instance, None = all real (the convention of `mil.bags`).
* ``Z``: ``(B, D)`` pooled embedding.
* ``weights``: ``(B, N)`` per-instance weights summing to 1 over the real instances of each bag and
  0 on padding, or None where the operator has no per-instance weights (max, logsumexp).

Padding never changes an output: padded rows are overwritten before any arithmetic, so even NaN or
1e6 in a padded row cannot leak into ``Z``. Operators are created by name and are shared by the MIL
heads (`mil.heads`) and the BagNet path::

    pool = create_pooling("gated_attention", dim=512, attn_dim=128)
    Z, a = pool(X, mask)                     # (B, 512), (B, N)

``forward`` validates its input (`check_bag`, the public boundary); ``compute(X, mask)`` is the same
operator on a bag that is already clean, which a head calls after its own single check, so a
training step validates once rather than once per module.
"""

from __future__ import annotations

import torch
from torch import nn

from mil.bags import check_bag, masked_fill_value, masked_softmax
from mil.errors import OptionError
from mil.registry import Registry

__all__ = [
    "POOLINGS",
    "AttentionPool",
    "LogSumExpPool",
    "MaxPool",
    "MeanPool",
    "check_dropout",
    "check_option",
    "create_pooling",
    "list_poolings",
]

POOLINGS = Registry("pooling")


def check_option(owner: str, name: str, value: object, ok: bool, expected: str) -> None:
    """Raise `OptionError` naming `owner`'s argument `name` unless `ok`.

    Example: ``check_option("logsumexp pooling", "r", r, r > 0, "a number > 0")``.
    """
    if not ok:
        raise OptionError(f"expected {name} of {owner} to be {expected}, got {value!r} instead.")


def check_dropout(owner: str, dropout: float) -> None:
    """Raise `OptionError` unless ``0 <= dropout < 1``."""
    check_option(owner, "dropout", dropout, 0.0 <= dropout < 1.0, "a probability in [0, 1)")


class MeanPool(nn.Module):
    """Mean over the real instances: ``Z = (1/n) Σ_n x_n``; weights are uniform, ``1/n``.

    Args:
        dim: embedding size ``D`` (unused; accepted so every pooling is built the same way).
    """

    def __init__(self, dim: int | None = None) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, X: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: ``X (B, N, D)``, ``mask (B, N)`` or None. Returns ``Z (B, D)``, ``weights (B, N)``."""
        return self.compute(*check_bag(X, mask))

    def compute(self, X: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` on a bag `check_bag` has cleaned already (heads call this: one check per step)."""
        X = masked_fill_value(X, mask, 0.0)  # (B, N, D) padding → 0, so 0 · NaN never happens
        m = mask.to(X.dtype)  # (B, N)
        weights = m / m.sum(dim=1, keepdim=True)  # (B, N)
        Z = torch.bmm(weights.unsqueeze(1), X).squeeze(1)  # (B, D)
        return Z, weights


class MaxPool(nn.Module):
    """Element-wise (channel-wise) max over the real instances: ``Z_d = max_n x_{n,d}``.

    Args:
        dim: embedding size ``D`` (unused; accepted so every pooling is built the same way).
    """

    def __init__(self, dim: int | None = None) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, X: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        """Args: ``X (B, N, D)``, ``mask (B, N)`` or None. Returns ``Z (B, D)`` and None (no per-instance weights)."""
        return self.compute(*check_bag(X, mask))

    def compute(self, X: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, None]:
        """`forward` on a bag `check_bag` has cleaned already."""
        Z = masked_fill_value(X, mask, float("-inf")).amax(dim=1)  # (B, D)
        return Z, None


class LogSumExpPool(nn.Module):
    """Log-mean-exp with temperature ``r``, channel-wise over the real instances.

    ``Z_d = (1/r) log( (1/n) Σ_n exp(r x_{n,d}) )``

    The mean (not the sum) inside the log makes this a smooth interpolation between mean pooling
    (``r → 0``) and max pooling (``r → ∞``), always with ``mean ≤ Z ≤ max``; the plain log-sum-exp
    of BagNet's code (``r = 1``, no ``-log n``) differs only by the constant ``log n``, which would
    make the output depend on the bag size. Computed stably with ``torch.logsumexp``; in float32
    the result loses about ``1e-7 / r`` absolute precision, so very small ``r`` (< 1e-3) is noisy.

    Args:
        dim: embedding size ``D`` (unused; accepted so every pooling is built the same way).
        r: temperature, > 0.
    """

    def __init__(self, dim: int | None = None, r: float = 1.0) -> None:
        super().__init__()
        check_option("logsumexp pooling", "r", r, r > 0, "a number > 0")
        self.dim = dim
        self.r = float(r)

    def forward(self, X: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        """Args: ``X (B, N, D)``, ``mask (B, N)`` or None. Returns ``Z (B, D)`` and None."""
        return self.compute(*check_bag(X, mask))

    def compute(self, X: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, None]:
        """`forward` on a bag `check_bag` has cleaned already."""
        n = mask.sum(dim=1, keepdim=True).to(X.dtype)  # (B, 1)
        S = masked_fill_value(self.r * X, mask, float("-inf"))  # (B, N, D) exp(-inf) = 0 drops padding
        Z = (torch.logsumexp(S, dim=1) - n.log()) / self.r  # (B, D)
        return Z, None


class AttentionPool(nn.Module):
    """Attention pooling of Ilse et al. (2018), plain or gated.

    ``a_n = softmax_n( w^T tanh(V h_n) )``  or, gated,  ``a_n = softmax_n( w^T (tanh(V h_n) ⊙ sigm(U h_n)) )``,
    ``Z = Σ_n a_n h_n``. ``V``, ``U`` and ``w`` carry biases, as in the authors' code.

    Args:
        dim: embedding size ``D``.
        attn_dim: hidden size of the attention network (128 in the authors' code).
        dropout: dropout on the attention hidden layer (CLAM places it there).
        gated: use the gated variant.
    """

    def __init__(self, dim: int, attn_dim: int = 128, dropout: float = 0.0, gated: bool = False) -> None:
        super().__init__()
        owner = "gated_attention pooling" if gated else "attention pooling"
        check_option(owner, "dim", dim, isinstance(dim, int) and dim >= 1, "an integer >= 1")
        check_option(owner, "attn_dim", attn_dim, isinstance(attn_dim, int) and attn_dim >= 1, "an integer >= 1")
        check_dropout(owner, dropout)
        self.V = nn.Linear(dim, attn_dim)
        self.U = nn.Linear(dim, attn_dim) if gated else None
        self.w = nn.Linear(attn_dim, 1)
        self.drop = nn.Dropout(dropout)

    def forward(self, X: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: ``X (B, N, D)``, ``mask (B, N)`` or None. Returns ``Z (B, D)``, attention ``a (B, N)``."""
        return self.compute(*check_bag(X, mask))

    def compute(self, X: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` on a bag `check_bag` has cleaned already."""
        X = masked_fill_value(X, mask, 0.0)  # (B, N, D) padding → 0, so 0 · NaN never happens
        H = torch.tanh(self.V(X))  # (B, N, attn_dim)
        if self.U is not None:
            H = H * torch.sigmoid(self.U(X))  # (B, N, attn_dim)
        f = self.w(self.drop(H)).squeeze(-1)  # (B, N) attention logits
        a = masked_softmax(f, mask)  # (B, N)
        Z = torch.bmm(a.unsqueeze(1), X).squeeze(1)  # (B, D)
        return Z, a


@POOLINGS.register(name="mean")
def _mean(dim: int) -> MeanPool:
    """Mean over real instances."""
    return MeanPool(dim)


@POOLINGS.register(name="max")
def _max(dim: int) -> MaxPool:
    """Channel-wise max over real instances."""
    return MaxPool(dim)


@POOLINGS.register(name="logsumexp")
def _logsumexp(dim: int, r: float = 1.0) -> LogSumExpPool:
    """Log-mean-exp with temperature `r` (mean as r → 0, max as r → ∞)."""
    return LogSumExpPool(dim, r=r)


@POOLINGS.register(name="attention")
def _attention(dim: int, attn_dim: int = 128, dropout: float = 0.0) -> AttentionPool:
    """Ilse et al. attention pooling."""
    return AttentionPool(dim, attn_dim=attn_dim, dropout=dropout, gated=False)


@POOLINGS.register(name="gated_attention")
def _gated_attention(dim: int, attn_dim: int = 128, dropout: float = 0.0) -> AttentionPool:
    """Ilse et al. gated attention pooling."""
    return AttentionPool(dim, attn_dim=attn_dim, dropout=dropout, gated=True)


def create_pooling(name: str, dim: int, **kwargs) -> nn.Module:
    """Build the pooling operator called `name` for embeddings of size `dim` (None kwargs are dropped).

    Raises:
        OptionError: unknown name (with a "did you mean" hint) or an argument out of range.
    """
    return POOLINGS.create(name, dim=dim, **kwargs)


def list_poolings() -> list[str]:
    """Names of the registered pooling operators, sorted."""
    return POOLINGS.names()
