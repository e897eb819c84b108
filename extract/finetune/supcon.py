"""The supervised contrastive loss of the encoder fine-tuning, as ItS2CLR / HNM-WSI code it.

Kangningthu/ItS2CLR ``train/loss/losses.py:SupConLoss`` (used unchanged by winston52/HNM-WSI;
methods.md §1.4), Khosla et al.'s SupCon with the seeds' pair masks, for ``V`` views of ``B``
tiles (``2B`` anchors with two views)::

    logits_ij = z_i·z_j / τ                                   (no max-subtraction, as the seed)
    M_ij      = [y_i == y_j]; pair_mode 1 keeps only positive pairs, 2 only negative pairs
    L_ij      = 1 - δ_ij; with mask_uncertain_neg, L[:, j] = 0 where bag_j = 1 and y_j = 0
    log p_ij  = logits_ij - log(Σ_k L_ik exp(logits_ik) [+ 1e-10 with mask_uncertain_neg])
    ℓ_i       = -(τ / τ_base) Σ_j (M⊙L)_ij log p_ij / (Σ_j (M⊙L)_ij + 1e-10)
    loss      = mean over all anchors (an anchor without a positive adds 0 and still counts)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

PAIR_MODES = {"all": 0, "pos-pos": 1, "neg-neg": 2}


class SupConLoss(nn.Module):
    """Supervised contrastive loss with the ItS2CLR pair masks.

    Args:
        temperature: τ (the seeds: 0.07).
        base_temperature: τ_base (0.07).
        pair_mode: 'all' (plain SupCon), 'pos-pos' (only positive–positive pairs attract; the seed's
            step on self-paced positives) or 'neg-neg' (only negative–negative pairs; its hard-negative step).
        mask_uncertain_neg: drop tiles of positive slides pseudo-labelled 0 from every anchor's
            contrast set (they may be unlabelled lesion).
    """

    def __init__(
        self, temperature: float = 0.07, base_temperature: float = 0.07, pair_mode: str = "all", mask_uncertain_neg: bool = False
    ) -> None:
        super().__init__()
        if pair_mode not in PAIR_MODES:
            raise ValueError(f"expected pair_mode in {', '.join(PAIR_MODES)}, got {pair_mode!r} instead.")
        self.temperature, self.base_temperature = temperature, base_temperature
        self.pair_mode, self.mask_uncertain_neg = pair_mode, mask_uncertain_neg

    def forward(self, z: Tensor, labels: Tensor, bag_labels: Tensor | None = None) -> Tensor:
        """The loss of one batch.

        Args:
            z: ``(B, V, d)`` L2-normalised projections of ``V`` views of ``B`` tiles.
            labels: ``(B,)`` tile pseudo-labels 0/1.
            bag_labels: ``(B,)`` labels of the tiles' slides (needed with ``mask_uncertain_neg``).

        Returns:
            The scalar loss.
        """
        B, V = z.shape[:2]
        y = labels.view(-1, 1)  # (B, 1)
        mask = (y == y.T).float()  # (B, B) same pseudo-label
        if self.pair_mode == "pos-pos":
            mask[y[:, 0] == 0, :] = 0
            mask[:, y[:, 0] == 0] = 0
        elif self.pair_mode == "neg-neg":
            mask[y[:, 0] == 1, :] = 0
            mask[:, y[:, 0] == 1] = 0
        feats = torch.cat(torch.unbind(z, dim=1), dim=0)  # (V·B, d) view-major, as the seed
        logits = feats @ feats.T / self.temperature  # (V·B, V·B)
        mask = mask.repeat(V, V)  # (V·B, V·B)
        keep = 1.0 - torch.eye(V * B, device=z.device)  # (V·B, V·B) no self-contrast
        if self.mask_uncertain_neg:
            if bag_labels is None:
                raise ValueError("expected bag_labels with mask_uncertain_neg, got None instead.")
            uncertain = ((bag_labels == 1) & (labels == 0)).repeat(V)  # (V·B,)
            keep[:, uncertain] = 0
        mask = mask * keep  # (V·B, V·B)
        denom = (torch.exp(logits) * keep).sum(1, keepdim=True)  # (V·B, 1)
        log_prob = logits - torch.log(denom + 1e-10 if self.mask_uncertain_neg else denom)  # (V·B, V·B)
        mean_log_prob_pos = (mask * log_prob).sum(1) / (mask.sum(1) + 1e-10)  # (V·B,)
        return -(self.temperature / self.base_temperature) * mean_log_prob_pos.mean()
