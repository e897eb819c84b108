"""Bag and instance losses, created by name like heads: ``create_loss("ranking", k=10)``.

    bce         bag-level BCE with logits, optionally class-balanced (pos_weight = n_neg / n_pos)
    ranking     multiple-instance ranking loss (MIRank) of the HNM paper (Huang et al., MICCAI 2024)
    ece         exclusive cross-entropy (Panteli et al., ICCV 2021) as coded in NKI-AI/ece_loss@d9b109a
    grad_libra  EQL v2 gradient-ratio re-balancing times a per-sample hardness term. This is a reconstruction from
                the abstract, not the paper's formula (Grad-Libra's formula is unpublished in any source we could read).

`BagCrossEntropyLoss` (bag-level softmax cross-entropy over C classes, optionally class-weighted; the multi-class
heads' loss) is built directly, not yet by name.

Every loss is an ``nn.Module`` whose ``forward`` validates its inputs and returns a scalar. Bag tensors follow
`mil.bags`: scores ``(B, N)`` with ``mask (B, N)`` bool, True = real instance; padded slots never change a value.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mil.bags import BagError
from mil.errors import OptionError
from mil.registry import Registry

LOSSES = Registry("loss")


def create_loss(name: str, **kwargs) -> nn.Module:
    """Build the loss registered as `name` (None-valued kwargs fall back to the loss's defaults)."""
    return LOSSES.create(name, **kwargs)


def list_losses() -> list[str]:
    return LOSSES.names()


# ---------------------------------------------------------------------------------------------- validation helpers
def _check_option(owner: str, name: str, value, ok: bool, expected: str) -> None:
    if not ok:
        raise OptionError(f"expected {name!r} of {owner} to be {expected}, got {value!r} instead.")


def _check_scores(x, name: str, ndims: tuple[int, ...] = (1,)) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim not in ndims:
        got = f"shape {tuple(x.shape)}, dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected {name} to be a floating-point tensor with {' or '.join(map(str, ndims))} dims, got {got} instead.")
    return x


def _check_labels(y, like: torch.Tensor, name: str, allowed: tuple[int, ...]) -> torch.Tensor:
    y, values = torch.as_tensor(y, device=like.device), "{" + ", ".join(map(str, allowed)) + "}"
    if tuple(y.shape) != tuple(like.shape):
        raise ValueError(f"expected {name} of shape {tuple(like.shape)} to match the logits, got {tuple(y.shape)} instead.")
    if y.is_floating_point() and not bool((y == y.round()).all()):
        raise ValueError(f"expected {name} with integer values in {values}, got non-integer values instead.")
    bad = ~torch.isin(y.long(), torch.tensor(allowed, device=y.device))
    if bool(bad.any()):
        raise ValueError(f"expected {name} in {values}, got {y[bad].unique().tolist()} instead.")
    return y.long()


def _check_mask(mask, scores: torch.Tensor, name: str) -> torch.Tensor:
    if mask is None:
        return torch.ones_like(scores, dtype=torch.bool)  # (B, N)
    if tuple(mask.shape) != tuple(scores.shape):
        raise BagError(f"expected {name} of shape {tuple(scores.shape)}, got {tuple(mask.shape)} instead.")
    return mask.to(device=scores.device, dtype=torch.bool)  # (B, N)


# ---------------------------------------------------------------------------------------------- bce
@LOSSES.register(name="bce")
class BagBCELoss(nn.Module):
    """Bag-level ``BCEWithLogits``: ``mean_b  −[w·y_b·log σ(z_b) + (1 − y_b)·log(1 − σ(z_b))]``, w = `pos_weight`.

    Args:
        pos_weight: weight of the positive term; ``pos_weight_from_labels(train_labels)`` balances the classes as the
            HNM and DSMIL code do (``#negative bags / #positive bags``). None = 1.
    """

    def __init__(self, pos_weight: float | None = None) -> None:
        super().__init__()
        ok = pos_weight is None or (isinstance(pos_weight, (int, float)) and math.isfinite(pos_weight) and pos_weight > 0)
        _check_option("bce", "pos_weight", pos_weight, ok, "a finite float > 0 or None")
        self.pos_weight = pos_weight

    @staticmethod
    def pos_weight_from_labels(labels) -> float:
        """``n_neg / n_pos`` of bag labels in {0, 1}: weighting positives by it makes both classes weigh the same."""
        y = torch.as_tensor(labels).flatten()  # (B,)
        y = _check_labels(y, y, "labels", (0, 1))  # (B,)
        n_pos, n_neg = int(y.sum()), int((1 - y).sum())
        if n_pos == 0 or n_neg == 0:
            raise ValueError(f"expected labels with both classes, got {n_pos} positive and {n_neg} negative bags instead.")
        return n_neg / n_pos

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Args: logits ``(B,)`` bag logits; labels ``(B,)`` in {0, 1} (bool, int or float). Returns: scalar."""
        logits = _check_scores(logits, "logits")  # (B,)
        return self.compute(logits, _check_labels(labels, logits, "labels", (0, 1)))

    def compute(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """`forward` on inputs already checked (the training loop's labels are, by the manifest and `collate_bags`)."""
        labels = labels.to(logits.dtype)  # (B,)
        pw = None if self.pos_weight is None else logits.new_tensor(self.pos_weight)  # ()
        return F.binary_cross_entropy_with_logits(logits, labels, pos_weight=pw)


# ---------------------------------------------------------------------------------------------- cross-entropy
class BagCrossEntropyLoss(nn.Module):
    """Bag-level softmax cross-entropy: ``Σ_b w_{y_b}·(−log softmax(z_b)[y_b]) / Σ_b w_{y_b}``, w = `weight`.

    Args:
        weight: ``(C,)`` per-class weights (a sequence of floats > 0); ``class_weights_from_labels`` gives the
            inverse class frequency of the training bags, ``n / (C · n_c)`` (for two classes the same ratio as
            `BagBCELoss`'s ``pos_weight``). None = unweighted.
    """

    def __init__(self, weight=None) -> None:
        super().__init__()
        w = None if weight is None else [float(v) for v in weight]
        ok = w is None or (len(w) >= 2 and all(math.isfinite(v) and v > 0 for v in w))
        _check_option("ce", "weight", weight, ok, "a sequence of at least two finite floats > 0 or None")
        self.weight = w

    @staticmethod
    def class_weights_from_labels(labels, n_classes: int) -> list[float]:
        """``n / (C · n_c)`` for each class ``c`` of bag labels in ``0..C-1``; every class must be present."""
        y = torch.as_tensor(labels).flatten()  # (B,)
        y = _check_labels(y, y, "labels", tuple(range(n_classes)))  # (B,)
        counts = torch.bincount(y, minlength=n_classes)  # (C,)
        if bool((counts == 0).any()):
            raise ValueError(f"expected labels of every class 0..{n_classes - 1}, got counts {counts.tolist()} instead.")
        return [len(y) / (n_classes * int(c)) for c in counts]

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Args: logits ``(B, C)`` class logits; labels ``(B,)`` in ``0..C-1``. Returns: scalar."""
        logits = _check_scores(logits, "logits", (2,))  # (B, C)
        if self.weight is not None and logits.shape[1] != len(self.weight):
            raise ValueError(f"expected logits with {len(self.weight)} classes (one per weight), got shape {tuple(logits.shape)} instead.")
        like = logits[:, 0]  # (B,)
        return self.compute(logits, _check_labels(labels, like, "labels", tuple(range(logits.shape[1]))))

    def compute(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """`forward` on inputs already checked (the training loop's labels are)."""
        w = None if self.weight is None else logits.new_tensor(self.weight)  # (C,)
        return F.cross_entropy(logits.float(), labels.long(), weight=None if w is None else w.float())


# ---------------------------------------------------------------------------------------------- ranking
def topk_mean(scores: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the `k` largest real scores of each bag (``k`` clipped to the bag's real size).

    Args: scores ``(B, N)``; mask ``(B, N)`` bool, every bag with at least one real instance. Returns ``(B,)``.
    """
    scores = scores.masked_fill(~mask, float("-inf"))  # (B, N) padding (even NaN) can never be picked; grad 0 there
    top = scores.topk(min(k, scores.shape[1]), dim=1).values  # (B, k') descending, real instances first
    k_b = mask.sum(dim=1).clamp(max=k)  # (B,) how many of them are real
    keep = torch.arange(top.shape[1], device=top.device) < k_b[:, None]  # (B, k')
    return torch.where(keep, top, torch.zeros_like(top)).sum(dim=1) / k_b  # (B,) where, not *, so -inf·0 is no NaN


@LOSSES.register(name="ranking")
class MIRankingLoss(nn.Module):
    """Multiple-instance ranking loss of HNM-WSI (docs/stage-two.md, "Loss recipes"), averaged over all (positive, negative) pairs::

        s(bag)  = mean of the top-K instance logits of the bag (real instances only)
        L       = mean_{p, q}  max(0, margin − s(pos_p) + s(neg_q))

    The authors' code draws random one-to-one (positive, negative) pairs each step; the mean over all pairs is that
    loss's expectation over uniform pairings, without the randomness. It is zero once every positive bag's top-K
    mean beats every negative's by `margin`.

    Args:
        k: instances per bag in the top-K mean (``rank_k`` = 10 in the paper's code).
        margin: required gap between positive and negative top-K means (1.0 in the code).
    """

    def __init__(self, k: int = 10, margin: float = 1.0) -> None:
        super().__init__()
        _check_option("ranking", "k", k, isinstance(k, int) and k >= 1, "an int >= 1")
        _check_option("ranking", "margin", margin, isinstance(margin, (int, float)) and margin >= 0, "a float >= 0")
        self.k, self.margin = k, float(margin)

    def _bag_scores(self, scores, mask, name: str) -> torch.Tensor:
        scores = _check_scores(scores, name, (1, 2))
        if scores.ndim == 1:  # a single bag (N,)
            scores, mask = scores[None], None if mask is None else mask.reshape(1, -1)  # (1, N)
        mask = _check_mask(mask, scores, name.replace("scores", "mask"))  # (B, N)
        empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
        if scores.shape[0] == 0 or empty:
            raise BagError(f"expected every bag of {name} to have a real instance, got bags {empty or 'none at all'} instead.")
        if not bool(torch.isfinite(scores[mask]).all()):
            raise ValueError(f"expected finite instance logits in {name}, got NaN or inf on real instances instead.")
        return topk_mean(scores, mask, self.k)  # (B,)

    def forward(self, pos_scores, pos_mask=None, neg_scores=None, neg_mask=None) -> torch.Tensor:
        """Args:
            pos_scores: ``(P, N1)`` instance logits of positive bags (or ``(N1,)`` for one bag).
            pos_mask: ``(P, N1)`` bool, True = real instance; None = all real.
            neg_scores: ``(Q, N2)`` instance logits of negative bags (or ``(N2,)``).
            neg_mask: ``(Q, N2)`` bool or None.
        Returns: scalar, the hinge averaged over the P·Q pairs.
        """
        if neg_scores is None:
            raise ValueError("expected neg_scores, the instance logits of negative bags, got None instead.")
        s_pos = self._bag_scores(pos_scores, pos_mask, "pos_scores")  # (P,)
        s_neg = self._bag_scores(neg_scores, neg_mask, "neg_scores")  # (Q,)
        return self._hinge(s_pos, s_neg)

    def compute(self, pos_scores, pos_mask, neg_scores, neg_mask) -> torch.Tensor:
        """`forward` on ``(P, N1)``/``(Q, N2)`` scores with full bool masks already checked (every bag has a real instance)."""
        return self._hinge(topk_mean(pos_scores, pos_mask, self.k), topk_mean(neg_scores, neg_mask, self.k))

    def _hinge(self, s_pos: torch.Tensor, s_neg: torch.Tensor) -> torch.Tensor:
        return F.relu(self.margin - s_pos[:, None] + s_neg[None, :]).mean()  # (P, Q) -> ()


# ---------------------------------------------------------------------------------------------- ece
def _sigmoid(x: float) -> float:
    return 0.5 * (1.0 + math.tanh(0.5 * x))  # the logistic function without math.exp overflow


@LOSSES.register(name="ece")
class ExclusiveCrossEntropy(nn.Module):
    """Exclusive cross-entropy for sparsely annotated instances, exactly as ``NKI-AI/ece_loss`` computes it::

        ℓ_i   = BCEWithLogits(z_i, y_i)           unannotated instances are treated as negatives (y_i = 0)
        τ_x   = exclusivity_threshold · σ((e − exclusivity_epoch) / temperature)          (0.5, 50, 10)
        τ_b   = background_sampling_threshold · σ((e − background_epoch) / temperature)   (0.5, 150, 10)
        kept  = [U_i ≤ τ_b] · [c_i ≤ τ_x],  U_i ~ Uniform(0, 1)   random subsample of unannotated terms, minus the
                                                                   confident ones (likely unannotated positives)
        ECE_i = u_i · kept_i · α (1 − e^{−ℓ_i})^γ ℓ_i  +  (1 − u_i) · ℓ_i                    (α, γ) = (0.2, 0.1)

    u_i = 1 for unannotated instances. The confidence c_i is the raw logit z_i, as the reference
    ``BECEWithLogitsLoss`` does (``confidence="probability"`` uses σ(z_i), as ``BECELoss`` on probabilities does).
    Early in training (τ ≈ 0) only annotated terms count; unannotated ones are phased in around epochs 50-150.
    Call ``set_epoch(e)`` every epoch, or pass ``epoch=``. ``anneal=False`` uses the thresholds as they are.

    Args:
        reduction: "mean" over real instances (dropped terms count as 0, as in the reference's ``mean``), "sum",
            or "none" (per-instance terms, padded slots 0).
        epoch: the starting epoch.
    """

    def __init__(
        self,
        exclusivity_threshold: float = 0.5,
        background_sampling_threshold: float = 0.5,
        exclusivity_epoch: float = 50.0,
        background_epoch: float = 150.0,
        temperature: float = 10.0,
        focal_alpha: float = 0.2,
        focal_gamma: float = 0.1,
        anneal: bool = True,
        confidence: str = "logit",
        reduction: str = "mean",
        epoch: int = 0,
    ) -> None:
        super().__init__()
        for name, v in [
            ("focal_alpha", focal_alpha),
            ("focal_gamma", focal_gamma),
            ("background_sampling_threshold", background_sampling_threshold),
        ]:
            _check_option("ece", name, v, isinstance(v, (int, float)) and v >= 0, "a float >= 0")
        _check_option("ece", "temperature", temperature, isinstance(temperature, (int, float)) and temperature > 0, "a float > 0")
        _check_option("ece", "confidence", confidence, confidence in ("logit", "probability"), "'logit' or 'probability'")
        _check_option("ece", "reduction", reduction, reduction in ("mean", "sum", "none"), "'mean', 'sum' or 'none'")
        self.exclusivity_threshold, self.background_sampling_threshold = exclusivity_threshold, background_sampling_threshold
        self.exclusivity_epoch, self.background_epoch, self.temperature = exclusivity_epoch, background_epoch, temperature
        self.focal_alpha, self.focal_gamma, self.anneal = focal_alpha, focal_gamma, anneal
        self.confidence, self.reduction, self.epoch = confidence, reduction, epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def thresholds(self, epoch: float) -> tuple[float, float]:
        """``(τ_x, τ_b)`` at `epoch`: the exclusivity threshold and the background sampling rate."""
        if not self.anneal:
            return self.exclusivity_threshold, self.background_sampling_threshold
        return (
            self.exclusivity_threshold * _sigmoid((epoch - self.exclusivity_epoch) / self.temperature),
            self.background_sampling_threshold * _sigmoid((epoch - self.background_epoch) / self.temperature),
        )

    def terms(self, loss, unannotated, confidence, uniform, epoch: float) -> torch.Tensor:
        """The reference combination, for any base loss (BCE, CE …); all arguments of one shape, returned likewise.

        Args: loss element-wise base loss ℓ; unannotated bool u; confidence c; uniform U in [0, 1); epoch e.
        """
        tau_x, tau_b = self.thresholds(epoch)
        kept = unannotated & (uniform <= tau_b) & (confidence <= tau_x)  # (…) sampled, non-confident, unannotated
        # 1 − e^{−ℓ} through expm1 (and kept > 0) so that tiny ℓ of confident negatives gives no 0^0.1 NaN gradient
        p_err = (-torch.expm1(-loss)).clamp_min(torch.finfo(loss.dtype).tiny)  # (…)
        focal = self.focal_alpha * p_err**self.focal_gamma * loss  # (…)
        zero = torch.zeros_like(loss)  # (…)
        return torch.where(kept, focal, zero) + torch.where(unannotated, zero, loss)  # (…)

    def forward(self, logits, labels=None, epoch: float | None = None, *, mask=None, generator=None) -> torch.Tensor:
        """Args:
            logits: ``(M,)`` or ``(B, N)`` instance logits.
            labels: same shape; 1 = annotated positive, 0 = annotated negative, -1 = unannotated. None = all
                unannotated (the reference default).
            epoch: overrides the epoch set by ``set_epoch``.
            mask: ``(B, N)`` bool, True = real instance (padding never counts); None = all real.
            generator: ``torch.Generator`` for the background subsampling (reproducible runs).
        Returns: scalar (or per-instance terms like `logits` with ``reduction="none"``).
        """
        logits = _check_scores(logits, "logits", (1, 2))  # (…)
        mask = _check_mask(mask, logits, "mask")  # (…)
        if not bool(mask.any()):
            raise BagError("expected at least one real instance, got an all-False mask instead.")
        labels = torch.full_like(mask, -1, dtype=torch.long) if labels is None else _check_labels(labels, logits, "labels", (-1, 0, 1))
        logits = logits.masked_fill(~mask, 0.0)  # (…) NaN padding gets neither a value nor a gradient
        loss = F.binary_cross_entropy_with_logits(logits, (labels == 1).to(logits.dtype), reduction="none")  # (…)
        conf = logits if self.confidence == "logit" else logits.sigmoid()  # (…)
        dev = generator.device if generator is not None else logits.device
        uniform = torch.rand(logits.shape, generator=generator, device=dev).to(logits.device)  # (…)
        ece = self.terms(loss, labels == -1, conf, uniform, self.epoch if epoch is None else epoch)  # (…)
        ece = torch.where(mask, ece, torch.zeros_like(ece))  # (…)
        if self.reduction == "none":
            return ece
        return ece.sum() if self.reduction == "sum" else ece.sum() / mask.sum()


# ---------------------------------------------------------------------------------------------- grad_libra
@LOSSES.register(name="grad_libra")
class GradLibraLoss(nn.Module):
    """Gradient-rebalanced sigmoid loss for long-tailed classes: EQL v2 (verified) times a per-sample hardness term.

    A reconstruction from the abstract, not the paper's formula: Grad-Libra (Liu et al., MICCAI 2022) has no public
    code and its body was unavailable (docs/stage-two.md, "Grad-Libra"). What this computes, with p = σ(z), one-hot y, ``(M, C)``, where
    target C (background) is an all-zero row of y, as in EQL v2 (its one-hot of C + 1 columns minus the last)::

        g_ij   = |p_ij − y_ij|                       per-element gradient magnitude of BCE w.r.t. the logit
        r_j    = G⁺_j / (G⁻_j + 1e-10)               accumulated positive / negative gradient of class j   (EQL v2)
        w⁻_j   = 1 / (1 + exp(−gamma (r_j − mu))),   w⁺_j = 1 + alpha (1 − w⁻_j)                           (EQL v2)
        h_ij   = min(max_hardness, (g_ij / ḡ_j^±)^beta)                            per-sample hardness (reconstruction)
        L      = Σ_ij BCE(z_ij, y_ij) · (w⁺_j y_ij + w⁻_j (1 − y_ij)) · h_ij / M

    ḡ_j^± is an EMA (`momentum`) of the mean g of class j's positives (+) or negatives (−), so h calibrates a
    sample's hardness relative to its own category and sign (mean ≈ 1: it redistributes gradient towards hard samples
    without changing each category's total; beta = 0 gives plain EQL v2). Weights and h are constants for autograd.

    State: like EQL v2's code, statistics are updated in ``forward`` from the analytic gradient under no_grad (no
    backward hook), after the weights of this batch were read, and only in training mode: ``G⁺_j += Σ_i |∂L/∂z_ij| y_ij``,
    ``G⁻_j += Σ_i |∂L/∂z_ij| (1 − y_ij)`` with ``|∂L/∂z| = w·h·g``; background rows only add to G⁻ (and ḡ⁻) of every
    class. At the first step all weights are 1 and h = 1, so the loss equals ``BCEWithLogits(reduction="sum") / M``; it
    stays ≈ that while r_j ≳ 1.3 (balanced gradients). Buffers are per process (EQL v2 all-reduces them under DDP; we
    do not).

    Args:
        num_classes: C. gamma, mu, alpha: EQL v2's mapping (12, 0.8, 4). beta: hardness exponent (0 disables it).
        momentum: EMA momentum of ḡ. max_hardness: cap of h, so one outlier cannot dominate a batch.
    """

    def __init__(
        self,
        num_classes: int = 2,
        gamma: float = 12.0,
        mu: float = 0.8,
        alpha: float = 4.0,
        beta: float = 1.0,
        momentum: float = 0.9,
        max_hardness: float = 10.0,
    ) -> None:
        super().__init__()
        _check_option("grad_libra", "num_classes", num_classes, isinstance(num_classes, int) and num_classes >= 1, "an int >= 1")
        for name, v in [("gamma", gamma), ("alpha", alpha), ("beta", beta)]:
            _check_option("grad_libra", name, v, isinstance(v, (int, float)) and v >= 0, "a float >= 0")
        _check_option("grad_libra", "momentum", momentum, isinstance(momentum, (int, float)) and 0 <= momentum < 1, "in [0, 1)")
        _check_option("grad_libra", "max_hardness", max_hardness, isinstance(max_hardness, (int, float)) and max_hardness >= 1, ">= 1")
        self.num_classes, self.gamma, self.mu, self.alpha = num_classes, gamma, mu, alpha
        self.beta, self.momentum, self.max_hardness = beta, momentum, max_hardness
        for name in ("pos_grad", "neg_grad", "pos_mean", "neg_mean"):  # G⁺, G⁻ and ḡ⁺, ḡ⁻ (0 = not seen yet)
            self.register_buffer(name, torch.zeros(num_classes))  # (C,)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # ()

    def class_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """EQL v2's ``(w⁺, w⁻)``, each ``(C,)``, from the statistics so far (ones before the first update)."""
        if int(self.steps) == 0:  # no information about the gradients yet
            return torch.ones_like(self.pos_grad), torch.ones_like(self.neg_grad)  # (C,), (C,)
        ratio = self.pos_grad / (self.neg_grad + 1e-10)  # (C,)
        neg_w = torch.sigmoid(self.gamma * (ratio - self.mu))  # (C,)
        return 1 + self.alpha * (1 - neg_w), neg_w  # (C,), (C,)

    def hardness(self, g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``h (M, C)`` from gradient magnitudes ``g (M, C)`` and one-hot ``y (M, C)``; 1 where ḡ is not known yet."""
        ref = torch.where(y > 0, self.pos_mean, self.neg_mean)  # (M, C) running mean g of the sample's category and sign
        h = (g / ref.clamp_min(1e-12)) ** self.beta  # (M, C)
        return torch.where(ref > 0, h.clamp(max=self.max_hardness), torch.ones_like(h))  # (M, C)

    @torch.no_grad()
    def _update(self, g: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> None:
        self.pos_grad += (g * w * y).sum(dim=0)  # (C,) the gradient actually applied, as EQL v2 collects w·g
        self.neg_grad += (g * w * (1 - y)).sum(dim=0)  # (C,)
        for mean, sel in ((self.pos_mean, y), (self.neg_mean, 1 - y)):
            n = sel.sum(dim=0)  # (C,)
            batch = (g * sel).sum(dim=0) / n.clamp_min(1)  # (C,)
            new = torch.where(mean > 0, self.momentum * mean + (1 - self.momentum) * batch, batch)  # (C,)
            mean.copy_(torch.where(n > 0, new, mean))  # (C,) categories absent from the batch keep their mean
        self.steps += 1

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Args: logits ``(M, C)``; targets ``(M,)`` integer classes in [0, C], C = background. Returns: scalar."""
        logits = _check_scores(logits, "logits", (2,))  # (M, C)
        if logits.shape[1] != self.num_classes or logits.shape[0] == 0:
            raise ValueError(f"expected logits of shape (M >= 1, {self.num_classes}), got {tuple(logits.shape)} instead.")
        if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.shape != logits.shape[:1]:
            got = f"{tuple(targets.shape)} {targets.dtype}" if isinstance(targets, torch.Tensor) else type(targets).__name__
            raise ValueError(f"expected integer targets of shape ({logits.shape[0]},), got {got} instead.")
        if bool(((targets < 0) | (targets > self.num_classes)).any()):
            raise ValueError(
                f"expected targets in [0, {self.num_classes}] ({self.num_classes} = background), "
                f"got values {targets.unique().tolist()} instead."
            )
        y = F.one_hot(targets.long(), self.num_classes + 1)[:, :-1].to(logits.dtype)  # (M, C) background: all-zero row
        with torch.no_grad():
            g = (torch.sigmoid(logits) - y).abs()  # (M, C) |∂BCE/∂z|
            pos_w, neg_w = self.class_weights()  # (C,), (C,)
            w = pos_w * y + neg_w * (1 - y)  # (M, C)
            w = w * self.hardness(g, y)  # (M, C)
        loss = (F.binary_cross_entropy_with_logits(logits, y, reduction="none") * w).sum() / logits.shape[0]  # ()
        if self.training:
            self._update(g, y, w)
        return loss
