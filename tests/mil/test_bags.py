"""The bag convention: validation at the boundary and the padding-safe primitives."""

from __future__ import annotations

import pytest
import torch

from mil.bags import BagError, check_bag, masked_fill_value, masked_softmax
from mil.errors import OptionError
from mil.registry import Registry


def test_check_bag_returns_full_mask_and_accepts_single_bag():
    X, mask = check_bag(torch.randn(2, 5, 3))
    assert mask.dtype == torch.bool and mask.shape == (2, 5) and mask.all()
    X, mask = check_bag(torch.randn(5, 3), torch.tensor([1, 1, 0, 1, 0]))
    assert X.shape == (1, 5, 3) and mask.tolist() == [[True, True, False, True, False]]


@pytest.mark.parametrize(
    "X, mask, match",
    [
        (torch.randn(2, 3, 4, 5), None, r"expected X of shape \(batch_size, bag_size, in_dim\), got shape \(2, 3, 4, 5\)"),
        (torch.ones(2, 3, 4, dtype=torch.long), None, "floating-point"),
        (torch.randn(2, 3, 4), torch.ones(3, 2, dtype=torch.bool), r"expected mask of shape \(2, 3\)"),
        (torch.randn(2, 3, 4), torch.tensor([[True, True, False], [False, False, False]]), "bag 1 of the batch has no real instance"),
        (torch.randn(2, 0, 4), None, "bag 0 of the batch has no real instance"),
        ([[1.0]], None, "torch.Tensor"),
    ],
)
def test_check_bag_errors(X, mask, match):
    with pytest.raises(BagError, match=match):
        check_bag(X, mask)
    assert issubclass(BagError, ValueError)


def test_masked_softmax_ignores_padding_even_when_it_is_nan():
    scores = torch.tensor([[1.0, 2.0, float("nan"), 1e9]])
    mask = torch.tensor([[True, True, False, False]])
    p = masked_softmax(scores, mask)
    assert torch.allclose(p, torch.tensor([[1 / (1 + torch.e), torch.e / (1 + torch.e), 0.0, 0.0]]))


def test_masked_fill_value_broadcasts_over_features():
    x = torch.ones(1, 3, 2)
    out = masked_fill_value(x, torch.tensor([[True, False, True]]), float("-inf"))
    assert out[0, 1].isinf().all() and out[0, 0].eq(1).all()


def test_masked_fill_value_without_padding_is_the_input_itself():
    x = torch.randn(2, 3, 4)
    assert masked_fill_value(x, torch.ones(2, 3, dtype=torch.bool), 0.0) is x  # no copy of the bag
    out = masked_fill_value(x, torch.tensor([[True, True, False], [True, True, True]]), 0.0)
    assert out is not x and out[0, 2].eq(0).all() and torch.equal(out[1], x[1])


def test_registry_create_drops_none_and_suggests_names():
    reg = Registry("thing")

    @reg.register
    def alpha(dim: int, scale: float = 2.0):
        return dim * scale

    assert reg.create("alpha", dim=3, scale=None) == 6.0  # None keeps the constructor's default
    assert reg.names() == ["alpha"] and reg.has("alpha")
    with pytest.raises(OptionError, match="did you mean 'alpha'"):
        reg.create("alpah", dim=1)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register(alpha)
