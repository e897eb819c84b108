"""Batches that hold both classes, for losses that compare positive with negative bags (ranking).

HNM-WSI trains its ranking loss on random (positive, negative) bag pairs: each epoch both classes
are shuffled and paired one to one, ``min(#pos, #neg)`` steps, the majority class's leftover bags
unseen that epoch (``get_random_pair`` in winston52/HNM-WSI ``train/utils.py``; docs/stage-two.md, "Pairing").
`BalancedBatchSampler` does exactly that with ``batch_size=1`` (each step is one pair), and with
``batch_size >= 2`` keeps every bag once per epoch in shuffled batches, swapping in a bag of the
missing class wherever a batch would hold only one class.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from mil.errors import OptionError


class BalancedBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices, each with at least one bag of label 0 and one of label 1.

    Args:
        labels: the bag labels (0/1), one per dataset index; both classes present.
        batch_size: 1 = the seed's pairing (batches of one positive and one negative bag);
            B >= 2 = shuffled batches of B bags (the last may be smaller, never a single bag).
        generator: the ``torch.Generator`` of the shuffles (reproducible epochs).
    """

    def __init__(self, labels: Sequence[int], batch_size: int, generator: torch.Generator) -> None:
        self.labels = [int(y) for y in labels]
        self.pos = [i for i, y in enumerate(self.labels) if y == 1]
        self.neg = [i for i, y in enumerate(self.labels) if y == 0]
        if not self.pos or not self.neg:
            raise OptionError(
                f"expected training bags of both labels for a loss that pairs them (ranking), got {len(self.pos)} positive "
                f"and {len(self.neg)} negative bags instead."
            )
        self.batch_size, self.generator = batch_size, generator

    def _perm(self, idx: list[int]) -> list[int]:
        return [idx[i] for i in torch.randperm(len(idx), generator=self.generator).tolist()]

    def __iter__(self) -> Iterator[list[int]]:
        if self.batch_size == 1:  # the seed: one positive with one negative bag, min(#pos, #neg) steps
            yield from ([p, q] for p, q in zip(self._perm(self.pos), self._perm(self.neg)))
            return
        order = self._perm(list(range(len(self.labels))))
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if len(batches) > 1 and len(batches[-1]) == 1:  # a lone bag cannot hold both classes: join the one before
            batches[-2] += batches.pop()
        for b in batches:
            classes = {self.labels[i] for i in b}
            if len(classes) == 1:  # swap the batch's last bag for a random bag of the missing class
                missing = self.neg if 1 in classes else self.pos
                b[-1] = missing[int(torch.randint(len(missing), (1,), generator=self.generator))]
            yield b

    def __len__(self) -> int:
        if self.batch_size == 1:
            return min(len(self.pos), len(self.neg))
        n = -(-len(self.labels) // self.batch_size)
        return n - 1 if n > 1 and len(self.labels) % self.batch_size == 1 else n
