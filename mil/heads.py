"""MIL heads by name: a bag of instance features ``X (B, N, D)`` → one logit per bag.

Every head is an ``nn.Module`` with ``forward(X, mask=None) -> BagOutput`` (see `mil.bags`):

* ``logits``: ``(B,)`` bag logits for binary classification (before the sigmoid).
* ``instance_scores``: ``(B, N)`` per-instance scores, always present, so ranking losses,
  hard-negative mining and heatmaps work with any head; finite (but meaningless) on padding.
* ``attention``: ``(B, N)`` weights summing to 1 over real instances (0 on padding), or None.

Multi-class (``n_classes=C > 2``; `MULTICLASS_HEADS`: abmil, gated_abmil, maxpool, meanpool, lse): ``logits`` are
``(B, C)`` class logits (before the softmax) and ``instance_scores`` ``(B, N, C)``, one score per class and instance
(ABMIL: the bag classifier on each instance, so ``logits[b, c] = Σ_n a_n s[b, n, c]``; instance heads: the scores
that are pooled). ``n_classes=2`` (the default) is the binary single-logit head, unchanged: same modules, same
initialisation, same outputs, same state dict. The other heads refuse ``n_classes > 2`` in one line.

Heads are built by name so the CLI, configs and checkpoints speak the same names::

    head = create_head("abmil", in_dim=1024, hidden_dim=256, dropout=0.25)
    out = head(X, mask)                      # out.logits (B,), out.instance_scores (B, N)

Shared kwargs: ``hidden_dim`` (width of the input projection / instance MLP) and ``dropout``
(default 0.0). Padding never changes an output: every head first zeroes padded rows and then uses
only masked operations (`masked_softmax`, `masked_fill_value`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mil.bags import BagOutput, check_bag, masked_fill_value, masked_softmax
from mil.errors import OptionError
from mil.pooling import AttentionPool, check_dropout, check_option, create_pooling
from mil.registry import Registry

__all__ = [
    "HEADS",
    "MULTICLASS_HEADS",
    "ABMIL",
    "Chowder",
    "DSMIL",
    "DSMILOutput",
    "InstanceMIL",
    "Standardized",
    "create_head",
    "list_heads",
]

HEADS = Registry("head")
MULTICLASS_HEADS = ("abmil", "gated_abmil", "maxpool", "meanpool", "lse")  # heads that take n_classes > 2


def check_n_classes(owner: str, n_classes: object) -> int:
    """The head's output width: 1 for ``n_classes == 2`` (one logit), else ``n_classes``; `OptionError` unless an int >= 2."""
    check_option(
        owner, "n_classes", n_classes, isinstance(n_classes, int) and not isinstance(n_classes, bool) and n_classes >= 2, "an integer >= 2"
    )
    return 1 if n_classes == 2 else int(n_classes)


def refuse_multiclass(head: str, n_classes: object) -> None:
    """One-line `OptionError` for a binary-only head asked for more than two classes."""
    if n_classes != 2:
        raise OptionError(
            f"expected n_classes=2 for head {head!r} (a binary-only head), got {n_classes!r} instead; "
            f"for multi-class use one of {', '.join(MULTICLASS_HEADS)}."
        )


def _check_dim(owner: str, name: str, value: object) -> None:
    check_option(owner, name, value, isinstance(value, int) and value >= 1, "an integer >= 1")


def _projection(in_dim: int, hidden_dim: int, dropout: float) -> nn.Sequential:
    """``Linear(in_dim, hidden_dim) → ReLU → Dropout``: ``(B, N, in_dim) → (B, N, hidden_dim)``."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))


class ABMIL(nn.Module):
    """Attention-based deep MIL (Ilse, Tomczak & Welling, ICML 2018), plain or gated.

    ``h_n = ReLU(W x_n)``, ``a = softmax_n(w^T tanh(V h_n) [⊙ sigm(U h_n)])``, ``z = Σ_n a_n h_n``,
    ``logit = c^T z + b``. Instance scores are the same classifier applied to each instance,
    ``s_n = c^T h_n + b``; because pooling and classifier are both linear in ``h`` and ``Σ a_n = 1``,
    ``logit = Σ_n a_n s_n`` exactly.

    Args:
        in_dim: instance feature size ``D``.
        hidden_dim: size of the input projection (the paper's ``L``).
        attn_dim: attention hidden size (the paper's code uses 128).
        dropout: dropout after the projection and inside the attention network.
        gated: use gated attention.
        n_classes: 2 = one logit (binary); C > 2 = ``C`` logits, one attention shared by the classes.
    """

    def __init__(
        self, in_dim: int, hidden_dim: int = 256, attn_dim: int = 128, dropout: float = 0.0, gated: bool = False, n_classes: int = 2
    ) -> None:
        super().__init__()
        owner = "head gated_abmil" if gated else "head abmil"
        _check_dim(owner, "in_dim", in_dim)
        _check_dim(owner, "hidden_dim", hidden_dim)
        check_dropout(owner, dropout)
        width = check_n_classes(owner, n_classes)
        self.n_classes = n_classes
        self.project = _projection(in_dim, hidden_dim, dropout)
        self.pool = AttentionPool(hidden_dim, attn_dim=attn_dim, dropout=dropout, gated=gated)
        self.classifier = nn.Linear(hidden_dim, width)

    def forward(self, X: torch.Tensor, mask: torch.Tensor | None = None) -> BagOutput:
        """Args: ``X (B, N, D)`` (or ``(N, D)``), ``mask (B, N)`` or None. Returns a `BagOutput`."""
        X, mask = check_bag(X, mask)
        X = masked_fill_value(X, mask, 0.0)  # (B, N, D) garbage/NaN padding → 0
        H = self.project(X)  # (B, N, hidden_dim)
        Z, a = self.pool.compute(H, mask)  # (B, hidden_dim), (B, N)
        logits = self.classifier(Z)  # (B, 1) or (B, C)
        scores = self.classifier(H)  # (B, N, 1) or (B, N, C)
        if self.n_classes == 2:
            logits, scores = logits.squeeze(-1), scores.squeeze(-1)  # (B,), (B, N)
        return BagOutput(logits, scores, a)


class InstanceMIL(nn.Module):
    """Instance-level MIL (mi-Net / CLAM ``MIL_fc`` style): score each instance, pool the scores.

    ``s_n = MLP(x_n)`` with ``MLP = Linear → ReLU → Dropout → Linear(·, 1)``; ``logit = pool_n(s_n)``
    with pool = max, mean or logsumexp (log-mean-exp with temperature ``r``, see `LogSumExpPool`).

    Args:
        in_dim: instance feature size ``D``.
        pooling: ``"max"``, ``"mean"`` or ``"logsumexp"``.
        hidden_dim: hidden size of the instance MLP.
        dropout: dropout in the instance MLP.
        n_classes: 2 = one score per instance (binary); C > 2 = ``C`` scores per instance, each class pooled alone.
        **pool_kwargs: passed to the pooling (``r`` for logsumexp).
    """

    def __init__(
        self, in_dim: int, pooling: str = "max", hidden_dim: int = 128, dropout: float = 0.0, n_classes: int = 2, **pool_kwargs
    ) -> None:
        super().__init__()
        owner = f"instance head ({pooling} pooling)"
        _check_dim(owner, "in_dim", in_dim)
        _check_dim(owner, "hidden_dim", hidden_dim)
        check_dropout(owner, dropout)
        width = check_n_classes(owner, n_classes)
        self.n_classes = n_classes
        self.instance_mlp = nn.Sequential(_projection(in_dim, hidden_dim, dropout), nn.Linear(hidden_dim, width))
        self.pool = create_pooling(pooling, dim=1, **pool_kwargs)

    def forward(self, X: torch.Tensor, mask: torch.Tensor | None = None) -> BagOutput:
        """Args: ``X (B, N, D)`` (or ``(N, D)``), ``mask (B, N)`` or None. Returns a `BagOutput` (attention None)."""
        X, mask = check_bag(X, mask)
        X = masked_fill_value(X, mask, 0.0)  # (B, N, D) garbage/NaN padding → 0
        scores = self.instance_mlp(X)  # (B, N, 1) or (B, N, C)
        logits, _ = self.pool.compute(scores, mask)  # (B, 1) or (B, C): each class pooled over the real instances
        if self.n_classes == 2:
            logits, scores = logits.squeeze(-1), scores.squeeze(-1)  # (B,), (B, N)
        return BagOutput(logits, scores, None)


def _extremes(s: torch.Tensor, mask: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """The `k` largest (or smallest) real scores of each bag, most extreme first.

    A bag with fewer than `k` real instances repeats its least extreme real score in the missing
    slots (edge padding), so the result depends on the real scores only, never on padding.

    Args:
        s: ``(B, N)`` scores; ``mask``: ``(B, N)`` bool.

    Returns:
        ``(B, k)``.
    """
    B, N = s.shape
    fill = float("-inf") if largest else float("inf")
    vals = masked_fill_value(s, mask, fill).topk(min(k, N), dim=1, largest=largest).values  # (B, min(k, N))
    n_real = mask.sum(dim=1, keepdim=True)  # (B, 1)
    idx = torch.minimum(torch.arange(k, device=s.device).expand(B, k), n_real - 1)  # (B, k) only real slots
    return vals.gather(1, idx)  # (B, k)


class Chowder(nn.Module):
    """CHOWDER (Courtiol et al., 2018): top- and bottom-R instance scores → MLP.

    ``s_n = w^T x_n + b`` (the paper's 1-D convolution with one kernel; or a small MLP when
    ``hidden_dim`` is given, as in Owkin's later code), ``t = [top_R(s), bottom_R(s)] ∈ R^{2R}``,
    ``logit = MLP(t)`` with hidden sizes ``mlp_dims`` (200, 100), sigmoid activations and dropout.
    Bags with fewer than ``R`` real instances repeat their least extreme score (see `_extremes`).

    Args:
        in_dim: instance feature size ``D``.
        r: number of top and of bottom instances ``R``.
        mlp_dims: hidden sizes of the MLP on the ``2R`` extreme scores.
        hidden_dim: None for the paper's linear instance scorer, else the hidden size of an MLP scorer.
        dropout: dropout in the MLP (the paper uses 0.5).
    """

    def __init__(
        self, in_dim: int, r: int = 10, mlp_dims: Sequence[int] = (200, 100), hidden_dim: int | None = None, dropout: float = 0.0
    ) -> None:
        super().__init__()
        _check_dim("head chowder", "in_dim", in_dim)
        _check_dim("head chowder", "r", r)
        check_dropout("head chowder", dropout)
        if hidden_dim is None:
            self.score = nn.Linear(in_dim, 1)
        else:
            _check_dim("head chowder", "hidden_dim", hidden_dim)
            self.score = nn.Sequential(_projection(in_dim, hidden_dim, 0.0), nn.Linear(hidden_dim, 1))
        self.r = r
        layers: list[nn.Module] = []
        d = 2 * r
        for h in mlp_dims:
            _check_dim("head chowder", "mlp_dims", h)
            layers += [nn.Linear(d, h), nn.Sigmoid(), nn.Dropout(dropout)]
            d = h
        self.mlp = nn.Sequential(*layers, nn.Linear(d, 1))

    def forward(self, X: torch.Tensor, mask: torch.Tensor | None = None) -> BagOutput:
        """Args: ``X (B, N, D)`` (or ``(N, D)``), ``mask (B, N)`` or None. Returns a `BagOutput` (attention None)."""
        X, mask = check_bag(X, mask)
        X = masked_fill_value(X, mask, 0.0)  # (B, N, D) garbage/NaN padding → 0
        scores = self.score(X).squeeze(-1)  # (B, N)
        top = _extremes(scores, mask, self.r, largest=True)  # (B, R)
        bottom = _extremes(scores, mask, self.r, largest=False)  # (B, R)
        logits = self.mlp(torch.cat([top, bottom], dim=1)).squeeze(-1)  # (B,)
        return BagOutput(logits, scores, None)


@dataclass
class DSMILOutput(BagOutput):
    """`BagOutput` plus DSMIL's two branch logits, ``(B,)`` each (``logits`` is their mean)."""

    max_instance_logits: torch.Tensor | None = None
    bag_branch_logits: torch.Tensor | None = None


class DSMIL(nn.Module):
    """Dual-stream MIL (Li, Li & Eliceiri, CVPR 2021), binary.

    Instance stream: ``c_n = w_i^T x_n + b_i``; critical instance ``m = argmax_n c_n``.
    Bag stream: ``h_n = ReLU(W x_n)``, ``q_n = tanh(Q h_n)``, ``a_n = softmax_n(<q_n, q_m> / sqrt(attn_dim))``,
    ``b = Σ_n a_n V h_n``, ``bag = w_b^T b + c`` (the paper's ``Conv1d(1, 1, kernel=hidden)`` on ``b``
    is exactly this linear map). The head's logit is ``(c_m + bag) / 2``, DSMIL's prediction rule;
    both branch logits are returned too, for DSMIL's loss ``(BCE(bag) + BCE(c_m)) / 2``.

    Args:
        in_dim: instance feature size ``D``.
        hidden_dim: size of the projection and of ``V`` (None: ``in_dim``, as in the paper's code).
        attn_dim: size of the queries (128 in the paper's code).
        dropout: dropout after the projection.
    """

    def __init__(self, in_dim: int, hidden_dim: int | None = None, attn_dim: int = 128, dropout: float = 0.0) -> None:
        super().__init__()
        hidden_dim = in_dim if hidden_dim is None else hidden_dim
        for name, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("attn_dim", attn_dim)):
            _check_dim("head dsmil", name, value)
        check_dropout("head dsmil", dropout)
        self.instance_classifier = nn.Linear(in_dim, 1)
        self.project = _projection(in_dim, hidden_dim, dropout)
        self.q = nn.Sequential(nn.Linear(hidden_dim, attn_dim), nn.Tanh())
        self.v = nn.Linear(hidden_dim, hidden_dim)
        self.bag_classifier = nn.Linear(hidden_dim, 1)

    def forward(self, X: torch.Tensor, mask: torch.Tensor | None = None) -> DSMILOutput:
        """Args: ``X (B, N, D)`` (or ``(N, D)``), ``mask (B, N)`` or None. Returns a `DSMILOutput`."""
        X, mask = check_bag(X, mask)
        X = masked_fill_value(X, mask, 0.0)  # (B, N, D) garbage/NaN padding → 0
        c = self.instance_classifier(X).squeeze(-1)  # (B, N)
        c_max, crit = masked_fill_value(c, mask, float("-inf")).max(dim=1)  # (B,), (B,)
        H = self.project(X)  # (B, N, hidden_dim)
        Q = self.q(H)  # (B, N, attn_dim)
        q_crit = Q[torch.arange(Q.shape[0], device=Q.device), crit]  # (B, attn_dim)
        f = torch.einsum("bna,ba->bn", Q, q_crit) / math.sqrt(Q.shape[-1])  # (B, N)
        a = masked_softmax(f, mask)  # (B, N)
        b = torch.bmm(a.unsqueeze(1), self.v(H)).squeeze(1)  # (B, hidden_dim)
        bag = self.bag_classifier(b).squeeze(-1)  # (B,)
        logits = 0.5 * (c_max + bag)  # (B,)
        return DSMILOutput(logits, c, a, max_instance_logits=c_max, bag_branch_logits=bag)


@HEADS.register(name="abmil")
def _abmil(in_dim: int, hidden_dim: int = 256, attn_dim: int = 128, dropout: float = 0.0, n_classes: int = 2) -> ABMIL:
    """ABMIL with attention pooling."""
    return ABMIL(in_dim, hidden_dim=hidden_dim, attn_dim=attn_dim, dropout=dropout, gated=False, n_classes=n_classes)


@HEADS.register(name="gated_abmil")
def _gated_abmil(in_dim: int, hidden_dim: int = 256, attn_dim: int = 128, dropout: float = 0.0, n_classes: int = 2) -> ABMIL:
    """ABMIL with gated attention pooling."""
    return ABMIL(in_dim, hidden_dim=hidden_dim, attn_dim=attn_dim, dropout=dropout, gated=True, n_classes=n_classes)


@HEADS.register(name="maxpool")
def _maxpool(in_dim: int, hidden_dim: int = 128, dropout: float = 0.0, n_classes: int = 2) -> InstanceMIL:
    """Instance MLP, bag logit = max instance logit."""
    return InstanceMIL(in_dim, "max", hidden_dim=hidden_dim, dropout=dropout, n_classes=n_classes)


@HEADS.register(name="meanpool")
def _meanpool(in_dim: int, hidden_dim: int = 128, dropout: float = 0.0, n_classes: int = 2) -> InstanceMIL:
    """Instance MLP, bag logit = mean instance logit."""
    return InstanceMIL(in_dim, "mean", hidden_dim=hidden_dim, dropout=dropout, n_classes=n_classes)


@HEADS.register(name="lse")
def _lse(in_dim: int, hidden_dim: int = 128, dropout: float = 0.0, r: float = 5.0, n_classes: int = 2) -> InstanceMIL:
    """Instance MLP, bag logit = log-mean-exp of instance logits with temperature `r`."""
    return InstanceMIL(in_dim, "logsumexp", hidden_dim=hidden_dim, dropout=dropout, n_classes=n_classes, r=r)


@HEADS.register(name="chowder")
def _chowder(
    in_dim: int, r: int = 10, mlp_dims: Sequence[int] = (200, 100), hidden_dim: int | None = None, dropout: float = 0.0, n_classes: int = 2
) -> Chowder:
    """CHOWDER: top/bottom-R instance scores → MLP (binary only)."""
    refuse_multiclass("chowder", n_classes)
    return Chowder(in_dim, r=r, mlp_dims=mlp_dims, hidden_dim=hidden_dim, dropout=dropout)


@HEADS.register(name="dsmil")
def _dsmil(in_dim: int, hidden_dim: int | None = None, attn_dim: int = 128, dropout: float = 0.0, n_classes: int = 2) -> DSMIL:
    """DSMIL: max-instance stream + critical-instance attention stream (binary only)."""
    refuse_multiclass("dsmil", n_classes)
    return DSMIL(in_dim, hidden_dim=hidden_dim, attn_dim=attn_dim, dropout=dropout)


class Standardized(nn.Module):
    """A head behind per-feature standardisation ``(x − mean) / std`` of every instance.

    The statistics come from training instances only (`mil.data.feature_stats`) and are
    buffers, so they travel in the state dict and a checkpoint reproduces the same inputs.

    Args:
        head: any head (``forward(X (B, N, D), mask (B, N)) -> BagOutput``).
        mean: ``(D,)`` per-feature mean.
        std: ``(D,)`` per-feature standard deviation, > 0.
    """

    def __init__(self, head: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        if mean.shape != std.shape or mean.ndim != 1:
            raise ValueError(f"expected mean and std of the same shape (D,), got {tuple(mean.shape)} and {tuple(std.shape)} instead.")
        if not bool((std > 0).all()):
            raise ValueError("expected std > 0 for every feature, got zeros or negatives instead; clamp constant features to 1.")
        self.head = head
        self.register_buffer("mean", mean.detach().float().clone())  # (D,)
        self.register_buffer("std", std.detach().float().clone())  # (D,)

    def forward(self, X: torch.Tensor, mask: torch.Tensor | None = None) -> BagOutput:
        """``X (B, N, D)``, ``mask (B, N)`` → the wrapped head's output on standardised ``X``."""
        return self.head((X - self.mean) / self.std, mask)  # (B, N, D) standardised; padding stays masked


def create_head(name: str, in_dim: int, **kwargs) -> nn.Module:
    """Build the head called `name` for instance features of size `in_dim` (None kwargs are dropped).

    Raises:
        OptionError: unknown name (with a "did you mean" hint) or an argument out of range.
    """
    return HEADS.create(name, in_dim=in_dim, **kwargs)


def list_heads() -> list[str]:
    """Names of the registered heads, sorted."""
    return HEADS.names()
