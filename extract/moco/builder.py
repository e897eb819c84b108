"""MoCo v2, the method as one class, after facebookresearch/moco's ``builder.py``.

He et al., CVPR 2020; Chen et al., arXiv 2003.04297 for v2: a query encoder, its momentum copy
(the key encoder), a 2-layer MLP projection head and a queue of negative keys. `MoCo` knows
nothing of data, optimisers or checkpoints: the training run around it is `mil.extract.moco.train`.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class MoCo(nn.Module):
    """Momentum Contrast v2: query encoder, momentum key encoder, MLP head, queue of negatives.

    Args:
        backbone: a feature extractor ``(N, 3, S, S) → (N, C)``, e.g. a timm model made with
            ``num_classes=0``. The MLP head is put in its classifier slot (timm's
            ``pretrained_cfg["classifier"]``: ``fc`` for ResNets, ``head`` for ViTs), as builder.py
            does with torchvision's ``fc``, so ``backbone(x)`` then returns the projection
            ``(N, dim)``. The backbone is modified in place and becomes ``encoder_q``.
        dim: output size of the projection head (128).
        K: queue size, the number of negative keys (65536).
        m: momentum of the key encoder's update (0.999).
        T: softmax temperature (0.2 for MoCo v2; 0.07 in v1).
        bn_splits: sub-batches per forward, each with its own BatchNorm statistics. With one process
            per GPU (builder.py's setting) 1 is right and the keys are shuffled across processes;
            in a single process, splits > 1 with the keys shuffled between them play that part
            (the "SplitBatchNorm" of MoCo's CIFAR-10 demo).
    """

    def __init__(self, backbone: nn.Module, dim: int = 128, K: int = 65536, m: float = 0.999, T: float = 0.2, bn_splits: int = 1) -> None:
        super().__init__()
        self.K, self.m, self.T, self.bn_splits = K, m, T, bn_splits
        c = int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)  # feature size C

        # 2-layer MLP projection head (MoCo v2): C → C → ReLU → dim, in the backbone's classifier slot.
        self.head_name = classifier_name(backbone)
        parent, _, leaf = self.head_name.rpartition(".")
        setattr(backbone.get_submodule(parent), leaf, nn.Sequential(nn.Linear(c, c), nn.ReLU(inplace=True), nn.Linear(c, dim)))
        self.encoder_q = backbone
        # The key encoder starts as an exact copy and is never trained by gradients.
        self.encoder_k = copy.deepcopy(backbone)
        for p in self.encoder_k.parameters():
            p.requires_grad = False

        # The queue: K normalised keys, one per column (builder.py's layout), and the write position.
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))  # (dim, K)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))  # (1,)

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        """θ_k ← m θ_k + (1 − m) θ_q (buffers such as BN statistics are the key encoder's own)."""
        for p_q, p_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            p_k.mul_(self.m).add_(p_q.detach(), alpha=1 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        """Write this step's keys `(N, dim)` (of every process) over the oldest ones in the queue."""
        keys = concat_all_gather(keys)  # (N_all, dim)
        n = keys.shape[0]
        if n > self.K:
            raise ValueError(f"expected at most K={self.K} keys per step, got {n}; use a larger queue or a smaller batch")
        ptr = int(self.queue_ptr)
        idx = (ptr + torch.arange(n, device=keys.device)) % self.K  # (N_all,) wraps around the end
        self.queue[:, idx] = keys.T.to(self.queue.dtype)  # (dim, N_all)
        self.queue_ptr[0] = (ptr + n) % self.K

    @torch.no_grad()
    def _batch_shuffle(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shuffle a batch `(N, …)` across processes (builder.py's `_batch_shuffle_ddp`), or within
        this process when there is only one, so that no key shares its BatchNorm statistics with
        its own query. Returns the shuffled local batch `(N, …)` and the index that undoes it."""
        if not _distributed():
            idx_shuffle = torch.randperm(x.shape[0], device=x.device)  # (N,)
            return x[idx_shuffle], torch.argsort(idx_shuffle)  # (N, …), (N,)
        x_gather = concat_all_gather(x)  # (N_all, …)
        idx_shuffle = torch.randperm(x_gather.shape[0], device=x.device)  # (N_all,) drawn on rank 0 …
        dist.broadcast(idx_shuffle, src=0)  # … and used by every process
        idx_unshuffle = torch.argsort(idx_shuffle)  # (N_all,)
        idx_this = idx_shuffle.view(dist.get_world_size(), -1)[dist.get_rank()]  # (N,) equal batches (drop_last)
        return x_gather[idx_this], idx_unshuffle  # (N, …), (N_all,)

    @torch.no_grad()
    def _batch_unshuffle(self, x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
        """Undo `_batch_shuffle` on the keys `(N, dim)`."""
        if not _distributed():
            return x[idx_unshuffle]  # (N, dim)
        x_gather = concat_all_gather(x)  # (N_all, dim)
        idx_this = idx_unshuffle.view(dist.get_world_size(), -1)[dist.get_rank()]  # (N,)
        return x_gather[idx_this]  # (N, dim)

    def _encode(self, encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """`encoder` on `x` `(N, 3, S, S)` in `bn_splits` sub-batches → `(N, dim)`."""
        if self.bn_splits == 1:
            return encoder(x)  # (N, dim)
        return torch.cat([encoder(part) for part in x.chunk(self.bn_splits)])  # (N, dim)

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One contrastive step's logits; also updates the key encoder and the queue.

        Args:
            im_q, im_k: two augmented views of the same N tiles, `(N, 3, S, S)` normalised.

        Returns:
            logits `(N, 1 + K)`: column 0 the positive key, the others the queue, divided by T;
            labels `(N,)` zeros (the positive's column), for `F.cross_entropy(logits, labels)`.
        """
        q = F.normalize(self._encode(self.encoder_q, im_q), dim=1)  # queries: (N, dim)

        with torch.no_grad():  # no gradient to the keys
            self._momentum_update_key_encoder()
            im_k, idx_unshuffle = self._batch_shuffle(im_k)  # (N, 3, S, S), shuffled for BN
            k = F.normalize(self._encode(self.encoder_k, im_k), dim=1)  # keys: (N, dim)
            k = self._batch_unshuffle(k, idx_unshuffle)  # (N, dim), back in query order

        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # positive logits: (N, 1)
        l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach().to(q.dtype))  # negative logits: (N, K)
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T  # (N, 1 + K)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)  # (N,) positives in column 0

        self._dequeue_and_enqueue(k)
        return logits, labels

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The query encoder without its projection head, on CPU: what `--weights` needs."""
        head = self.head_name + "."
        return {k: v.detach().cpu().clone() for k, v in self.encoder_q.state_dict().items() if not k.startswith(head)}


def classifier_name(backbone: nn.Module) -> str:
    """Dotted name of a backbone's classifier module (timm's pretrained_cfg), default ``fc``."""
    name = (getattr(backbone, "pretrained_cfg", None) or {}).get("classifier") or "fc"
    return name[0] if isinstance(name, (tuple, list)) else name


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """All processes' `tensor` `(N, …)` stacked in rank order `(N · world, …)`; no gradient."""
    if not _distributed():
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)  # (N_all, …)
