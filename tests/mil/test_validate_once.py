"""A training step validates its bags once: heads check at their public call, the pooling inside
them and the objective's losses do not check again (each check is a device→host sync on a GPU)."""

from __future__ import annotations

import pytest
import torch

import mil.bags
import mil.heads
import mil.pooling
from mil.heads import create_head, list_heads
from mil.losses import create_loss
from mil.pooling import create_pooling, list_poolings


@pytest.fixture
def count_checks(monkeypatch):
    calls = []
    real = mil.bags.check_bag

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    for module in (mil.heads, mil.pooling):
        monkeypatch.setattr(module, "check_bag", counting)
    return calls


@pytest.mark.parametrize("name", list_heads())
def test_a_head_call_validates_its_bag_once(name, count_checks):
    head = create_head(name, in_dim=6)
    head(torch.randn(2, 5, 6), torch.tensor([[True] * 5, [True, True, False, False, False]]))
    assert len(count_checks) == 1


@pytest.mark.parametrize("name", list_poolings())
def test_compute_is_forward_without_the_check(name):
    torch.manual_seed(0)
    pool = create_pooling(name, dim=4)
    X, mask = torch.randn(3, 7, 4), torch.rand(3, 7) > 0.3
    mask[:, 0] = True
    Z, w = pool(X, mask)
    Z2, w2 = pool.compute(X, mask)
    torch.testing.assert_close(Z, Z2, rtol=0, atol=0)
    assert (w is None) == (w2 is None)


def test_loss_compute_equals_forward():
    torch.manual_seed(0)
    logits, y = torch.randn(6), torch.tensor([0.0, 1, 1, 0, 1, 0])
    bce = create_loss("bce", pos_weight=2.0)
    assert bce.compute(logits, y) == bce(logits, y)
    rank = create_loss("ranking", k=3, margin=1.0)
    sp, sn = torch.randn(2, 8), torch.randn(3, 5)
    mp, mn = torch.ones(2, 8, dtype=torch.bool), torch.rand(3, 5) > 0.4
    mn[:, 0] = True
    assert rank.compute(sp, mp, sn, mn) == rank(sp, mp, sn, mn)
