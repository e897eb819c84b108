"""The loss of `mil train features`: named recipes and the loss of one training step.

A recipe fills every loss option the user did not set (``TrainConfig``); each part keeps its own flag::

    recipe    bag BCE   max-instance BCE   ranking (k, margin)   hard negatives (neg_ratio, bank)
    bce       1.0       0.0                0.0                   off
    hnm-wsi   0.5       0.5                0.1 (10, 1.0)         on (0.2, 10 per step)

``hnm-wsi`` is the MIL loss of winston52/HNM-WSI ``train/utils.py:epoch_train`` (docs/stage-two.md, "Loss recipes"):
``0.5·[BCE(bag⁺) + BCE(bag⁻)]/2 + 0.5·[BCE(max s⁺) + BCE(max s⁻)]/2 + 0.1·relu(1 − topk(s⁺) + topk(s⁻))``
on one positive and one negative bag per step, with ``pos_weight = #neg / #pos`` in both BCEs.
DSMIL is always trained with its own two losses (bag branch and max instance, 0.5 each; its
prediction stays their mean): under ``bce`` too, unless the weights are set.

Multi-class runs (``head_kwargs["n_classes"] = C > 2``) train the bag loss only: softmax cross-entropy
(`mil.losses.BagCrossEntropyLoss`) weighted by the inverse class frequency of the training bags,
``n / (C · n_c)``; the ranking, max-instance, mining and instance parts are binary-only and refused
by ``TrainConfig``.

Instance scores ``s`` are the head's ``instance_scores``: DSMIL's instance classifier, Chowder's
and the instance heads' tile scores, and for ABMIL the bag classifier applied to each tile.
"""

from __future__ import annotations

import torch

from mil.errors import OptionError
from mil.losses import BagCrossEntropyLoss, create_loss
from mil.train.instances import InstanceLabels, instance_targets
from mil.train.mining import MinedSet

RECIPES: dict[str, dict] = {
    "bce": dict(
        bag_weight=1.0,
        max_instance_weight=0.0,
        ranking_weight=0.0,
        rank_k=10,
        rank_margin=1.0,
        hard_negatives=False,
        neg_ratio=0.2,
        hnm_bank=10,
    ),
    "hnm-wsi": dict(
        bag_weight=0.5,
        max_instance_weight=0.5,
        ranking_weight=0.1,
        rank_k=10,
        rank_margin=1.0,
        hard_negatives=True,
        neg_ratio=0.2,
        hnm_bank=10,
    ),
}
DUAL_LOSS_HEADS = {"dsmil": dict(bag_weight=0.5, max_instance_weight=0.5)}  # heads trained with their own two losses
ECE_REFERENCE_EPOCHS = 200  # NKI-AI/ece_loss anneals around epochs 50 and 150 (temperature 10): a ~200-epoch run


def recipe_defaults(recipe: str, head: str) -> dict:
    """The loss options `recipe` sets for `head` (see the module docstring)."""
    if recipe not in RECIPES:
        raise OptionError(f"expected --recipe to be one of {', '.join(RECIPES)}, got {recipe!r} instead.")
    return {**RECIPES[recipe], **(DUAL_LOSS_HEADS.get(head, {}) if recipe == "bce" else {})}


def bag_and_max_logits(out, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bag (B,), max instance (B,))`` logits: DSMIL's own branches where the head has them."""
    bag = getattr(out, "bag_branch_logits", None)
    top = getattr(out, "max_instance_logits", None)
    if top is None:
        top = out.instance_scores.masked_fill(~mask, float("-inf")).amax(dim=1)  # (B,)
    return (out.logits if bag is None else bag), top


class Objective:
    """The loss of one step, by parts (each part's mean is logged per epoch).

    Args:
        config: a `TrainConfig` (resolved: no None loss options).
        pos_weight: ``#negative / #positive`` training bags, for the bag and max-instance BCEs.
        annotations: sparse tile labels for the ``instance_loss`` (or None).
        seed: seeds the ECE background sampling and the draw from the mined bank.
        class_weights: ``(C,)`` weights of the multi-class cross-entropy (`config.n_classes > 2`), else unused.
    """

    def __init__(
        self, config, pos_weight: float, annotations: InstanceLabels | None, seed: int, class_weights: list[float] | None = None
    ) -> None:
        self.c, self.annotations = config, annotations
        self.ce = BagCrossEntropyLoss(weight=class_weights) if getattr(config, "n_classes", 2) > 2 else None
        self.bce = create_loss("bce", pos_weight=pos_weight)
        self.ranking = create_loss("ranking", k=config.rank_k, margin=config.rank_margin)
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.ece = None
        if annotations is not None and config.instance_loss == "ece":
            f = (config.ece_schedule_epochs or config.epochs) / ECE_REFERENCE_EPOCHS  # the reference schedule, stretched
            # Summed and divided by the number of labelled tiles: before the unannotated background terms are phased
            # in it equals the "bce" option on the labelled tiles.
            self.ece = create_loss("ece", reduction="sum", exclusivity_epoch=50 * f, background_epoch=150 * f, temperature=10 * f)

    def set_epoch(self, epoch: int) -> None:
        if self.ece is not None:
            self.ece.set_epoch(epoch - 1)  # the reference anneals from epoch 0

    def __call__(self, model, out, mask, y, ids, mined: MinedSet) -> tuple[torch.Tensor, dict[str, float]]:
        """Args: the head, its output on ``X (B, N, D)``, ``mask (B, N)``, ``y (B,)``, slide ids, the mined set.

        Returns: the scalar loss and its parts (weighted), ``{name: float}``.
        """
        c, s = self.c, out.instance_scores  # s (B, N)
        if self.ce is not None:  # multi-class: the bag cross-entropy only (TrainConfig refused the binary-only parts)
            bag = c.bag_weight * self.ce.compute(out.logits, y.long())  # logits (B, C)
            return bag, {"bag": float(bag.detach())}
        bag, top = bag_and_max_logits(out, mask)  # (B,), (B,)
        parts: dict[str, torch.Tensor] = {}
        if c.bag_weight > 0:
            parts["bag"] = c.bag_weight * self.bce.compute(bag, y)
        if c.max_instance_weight > 0:
            parts["max_instance"] = c.max_instance_weight * self.bce.compute(top, y)
        if c.ranking_weight > 0 and (y == 1).any() and (y == 0).any():
            parts["ranking"] = c.ranking_weight * self._ranking(model, s, mask, y, mined)
        if c.hnm_instance_weight > 0 and (len(mined) or mined.positives):
            inst = self._pseudo_labels(s, mask, ids, mined)
            if inst is not None:
                parts["hnm_instance"] = c.hnm_instance_weight * inst
        if self.annotations is not None:
            t = instance_targets(ids, y.cpu(), mask.cpu(), self.annotations).to(s.device)  # (B, N) 1 / 0 known, -1 unannotated
            known = t >= 0  # (B, N)
            if self.ece is not None:
                inst = self.ece(s, t, mask=mask, generator=self.gen) / known.sum().clamp_min(1)
            else:
                inst = _bce(s[known], t[known].float()) if known.any() else s.new_zeros(())
            parts["instance"] = c.instance_weight * inst
        loss = sum(parts.values()) if parts else 0.0 * s.sum()  # nothing to learn from this batch (TrainConfig checks weights)
        return loss, {k: float(v.detach()) for k, v in parts.items()}

    def _ranking(self, model, s, mask, y, mined: MinedSet) -> torch.Tensor:
        """MIRank over the batch's (positive, negative) pairs; the negative side is the top-k over every real
        instance of the negative bag, plus ``hnm_bank`` mined negatives of the whole training set scored now."""
        pos, neg = y == 1, y == 0  # (B,)
        s_neg, m_neg = s[neg], mask[neg]  # (Q, N)
        if mined.bank is not None and self.c.hnm_bank > 0:
            pick = torch.randperm(len(mined.bank), generator=self.gen)[: self.c.hnm_bank]  # (K,)
            s_bank = model(mined.bank[pick][None].to(s.device)).instance_scores[0]  # (K,) the current scores of the mined tiles
            q = s_neg.shape[0]
            s_neg = torch.cat([s_neg, s_bank.expand(q, -1)], dim=1)  # (Q, N + K)
            m_neg = torch.cat([m_neg, m_neg.new_ones(q, len(pick))], dim=1)  # (Q, N + K)
        return self.ranking.compute(s[pos], mask[pos], s_neg, m_neg)  # the batch was checked by the head

    @staticmethod
    def _pseudo_labels(s, mask, ids, mined: MinedSet) -> torch.Tensor | None:
        """Opt-in two-sided instance BCE: the batch's mined negatives → 0, its pseudo-positives → 1."""
        target = torch.full_like(s, -1.0)  # (B, N) -1 = no pseudo-label
        for b, sid in enumerate(ids):
            if sid in mined.negatives:
                target[b, mined.negatives[sid]] = 0.0
            if sid in mined.positives:
                target[b, mined.positives[sid]] = 1.0
        known = (target >= 0) & mask  # (B, N)
        return _bce(s[known], target[known]) if known.any() else None


def _bce(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean BCE of instance logits ``(M,)`` against targets ``(M,)``."""
    return torch.nn.functional.binary_cross_entropy_with_logits(scores, targets)
