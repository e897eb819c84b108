"""Pooling operators: shapes, padding invariance, finiteness, gradients and each operator's maths.

Tests parametrised over `list_poolings()` cover a newly registered operator automatically.
"""

from __future__ import annotations

import pytest
import torch

from mil.bags import BagError
from mil.errors import OptionError
from mil.pooling import create_pooling, list_poolings

D = 6
LENGTHS = [1, 4, 9, 17]
GARBAGE = {
    "randn": lambda shape: 100 * torch.randn(shape),
    "huge": lambda shape: torch.full(shape, 1e6),
    "nan": lambda shape: torch.full(shape, float("nan")),
}


def make_pool(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_pooling(name, dim=D).eval()


def padded_batch(bags: list[torch.Tensor], garbage: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack bags ``(n_i, D)`` into ``X (B, N, D)`` with garbage rows and ``mask (B, N)``."""
    N = max(len(b) for b in bags)
    X = GARBAGE[garbage]((len(bags), N, D))  # (B, N, D)
    mask = torch.zeros(len(bags), N, dtype=torch.bool)  # (B, N)
    for i, b in enumerate(bags):
        X[i, : len(b)] = b
        mask[i, : len(b)] = True
    return X, mask


def test_registry_lists_the_documented_poolings():
    assert {"mean", "max", "logsumexp", "attention", "gated_attention"} <= set(list_poolings())


@pytest.mark.parametrize("name", list_poolings())
def test_shapes_and_weights_sum_to_one(name):
    pool = make_pool(name)
    Z, w = pool(torch.randn(3, 5, D))
    assert Z.shape == (3, D)
    if w is not None:
        assert w.shape == (3, 5) and torch.allclose(w.sum(1), torch.ones(3))
    Z1, _ = pool(torch.randn(5, D))  # a single bag (N, D) gets a batch axis
    assert Z1.shape == (1, D)


@pytest.mark.parametrize("garbage", sorted(GARBAGE))
@pytest.mark.parametrize("name", list_poolings())
def test_padding_changes_nothing(name, garbage):
    pool = make_pool(name)
    torch.manual_seed(1)
    bags = [torch.randn(n, D) for n in LENGTHS]
    X, mask = padded_batch(bags, garbage)
    Z, w = pool(X, mask)
    assert torch.isfinite(Z).all()
    for i, b in enumerate(bags):
        Zi, wi = pool(b.unsqueeze(0))
        assert torch.allclose(Z[i], Zi[0], atol=1e-5, rtol=1e-4)
        if w is not None:
            assert torch.allclose(w[i, : len(b)], wi[0], atol=1e-6)
    if w is not None:
        assert w[~mask].eq(0).all() and torch.allclose(w.sum(1), torch.ones(len(bags)))


@pytest.mark.parametrize("scale", [1.0, 1e3])
@pytest.mark.parametrize("name", list_poolings())
def test_outputs_finite_for_single_instance_and_large_inputs(name, scale):
    pool = make_pool(name)
    for X in (scale * torch.randn(2, 1, D), scale * torch.randn(2, 50, D)):
        Z, w = pool(X)
        assert torch.isfinite(Z).all() and (w is None or torch.isfinite(w).all())
    Z, w = pool(torch.randn(1, D))
    if w is not None:
        assert w.item() == pytest.approx(1.0)


@pytest.mark.parametrize("name", list_poolings())
def test_empty_bag_raises_naming_the_bag(name):
    mask = torch.tensor([[True, False], [False, False]])
    with pytest.raises(BagError, match="bag 1") as info:
        make_pool(name)(torch.randn(2, 2, D), mask)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("name", list_poolings())
def test_permutation_invariance(name):
    pool = make_pool(name)
    X = torch.randn(2, 11, D)
    perm = torch.randperm(11)
    Z, w = pool(X)
    Zp, wp = pool(X[:, perm])
    assert torch.allclose(Z, Zp, atol=1e-5)
    if w is not None:
        assert torch.allclose(w[:, perm], wp, atol=1e-6)


@pytest.mark.parametrize("name", list_poolings())
def test_gradients_reach_inputs_and_parameters_but_not_padding(name):
    pool = make_pool(name)
    bags = [torch.randn(n, D) for n in LENGTHS]
    X, mask = padded_batch(bags, "nan")
    X.requires_grad_(True)
    Z, _ = pool(X, mask)
    (Z * torch.randn_like(Z)).sum().backward()
    assert torch.isfinite(X.grad).all() and X.grad[~mask].eq(0).all() and X.grad[mask].abs().sum() > 0
    for pname, p in pool.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


def test_mean_and_max_match_their_definitions():
    X = torch.randn(1, 7, D)
    mask = torch.tensor([[True] * 4 + [False] * 3])
    Z, w = create_pooling("mean", dim=D)(X, mask)
    assert torch.allclose(Z[0], X[0, :4].mean(0), atol=1e-6) and torch.allclose(w[0, :4], torch.full((4,), 0.25))
    Z, w = create_pooling("max", dim=D)(X, mask)
    assert torch.equal(Z[0], X[0, :4].amax(0)) and w is None


def test_logsumexp_lies_between_mean_and_max_and_interpolates():
    torch.manual_seed(0)
    X = torch.randn(3, 20, D)
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[1, 5:] = False
    mean, _ = create_pooling("mean", dim=D)(X, mask)
    mx, _ = create_pooling("max", dim=D)(X, mask)
    for r in (1e-2, 0.5, 1.0, 5.0, 50.0):
        Z, w = create_pooling("logsumexp", dim=D, r=r)(X, mask)
        assert w is None and (Z >= mean - 1e-5).all() and (Z <= mx + 1e-5).all()
    small, _ = create_pooling("logsumexp", dim=D, r=1e-3)(X, mask)
    large, _ = create_pooling("logsumexp", dim=D, r=1e4)(X, mask)
    assert torch.allclose(small, mean, atol=5e-3) and torch.allclose(large, mx, atol=1e-3)
    # the mean form: r = 1 is log(mean(exp(x))), not log(sum(exp(x)))
    Z1, _ = create_pooling("logsumexp", dim=D)(X[:1], None)
    assert torch.allclose(Z1[0], X[0].exp().mean(0).log(), atol=1e-5)


def ilse_by_hand(pool, h: torch.Tensor, gated: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Ilse et al. (2018), written out from the module's weights in float64 for one bag ``h (n, D)``:
    ``a = softmax_n( w^T (tanh(V h_n + b_V) [⊙ sigmoid(U h_n + b_U)]) + b_w )``, ``z = Σ_n a_n h_n``."""
    h = h.double()
    W = {k: v.detach().double() for k, v in pool.state_dict().items()}
    hidden = torch.tanh(h @ W["V.weight"].T + W["V.bias"])  # (n, attn_dim)
    if gated:
        hidden = hidden * torch.sigmoid(h @ W["U.weight"].T + W["U.bias"])  # (n, attn_dim)
    logits = hidden @ W["w.weight"][0] + W["w.bias"][0]  # (n,)
    a = torch.exp(logits - logits.max())
    a = a / a.sum()  # (n,)
    return (a[:, None] * h).sum(0), a  # (D,), (n,)


@pytest.mark.parametrize("name", ["attention", "gated_attention"])
def test_attention_matches_ilse_formula_with_and_without_padding(name):
    """Each bag's weights and pooled embedding equal the formula over its real instances only, whatever the padding."""
    gated = name == "gated_attention"
    pool = make_pool(name)
    assert (pool.U is not None) == gated
    with torch.no_grad():  # a gate far from constant, so dropping or misplacing it changes the result
        for layer in [pool.V, pool.w] + ([pool.U] if gated else []):
            layer.weight.mul_(3.0)
    torch.manual_seed(1)
    bags = [torch.randn(n, D) for n in LENGTHS]
    for garbage in GARBAGE:
        X, mask = padded_batch(bags, garbage)
        Z, a = pool(X, mask)  # (B, D), (B, N)
        for i, h in enumerate(bags):
            z_ref, a_ref = ilse_by_hand(pool, h, gated)
            n = len(h)
            torch.testing.assert_close(a[i, :n].double(), a_ref, atol=1e-6, rtol=1e-5)
            assert (a[i, n:] == 0).all()
            torch.testing.assert_close(Z[i].double(), z_ref, atol=1e-5, rtol=1e-5)
    if gated:  # the gate matters: without it the weights of the longest bag differ clearly
        _, a_plain = ilse_by_hand(pool, bags[-1], gated=False)
        assert (a_plain - ilse_by_hand(pool, bags[-1], gated=True)[1]).abs().max() > 1e-2


def test_attention_dropout_is_active_in_training_only():
    pool = create_pooling("attention", dim=D, dropout=0.5)
    X = torch.randn(2, 30, D)
    assert torch.equal(pool.eval()(X)[1], pool(X)[1])
    pool.train()
    assert not torch.equal(pool(X)[1], pool.eval()(X)[1])


def test_unknown_name_and_bad_arguments_raise_option_errors():
    with pytest.raises(OptionError, match="did you mean 'gated_attention'"):
        create_pooling("gated_atention", dim=D)
    with pytest.raises(OptionError, match="r of logsumexp pooling"):
        create_pooling("logsumexp", dim=D, r=0.0)
    with pytest.raises(OptionError, match="dropout"):
        create_pooling("attention", dim=D, dropout=1.5)
    assert create_pooling("logsumexp", dim=D, r=None).r == 1.0  # None keeps the default
