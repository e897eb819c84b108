"""MIL heads: the BagOutput contract, padding invariance, gradients and each head's own identity.

Tests parametrised over `list_heads()` cover a newly registered head automatically (timm style).
"""

from __future__ import annotations

import pytest
import torch

from mil.bags import BagError, BagOutput
from mil.errors import OptionError
from mil.heads import create_head, list_heads

D = 12
LENGTHS = [1, 3, 14, 30]  # below, between and above chowder's R = 10 and 2R = 20
GARBAGE = {
    "randn": lambda shape: 100 * torch.randn(shape),
    "huge": lambda shape: torch.full(shape, 1e6),
    "nan": lambda shape: torch.full(shape, float("nan")),
}


def make_head(name: str, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_head(name, in_dim=D, **kw).eval()


def padded_batch(bags: list[torch.Tensor], garbage: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack bags ``(n_i, D)`` into ``X (B, N, D)`` with garbage rows and ``mask (B, N)``."""
    N = max(len(b) for b in bags)
    X = GARBAGE[garbage]((len(bags), N, D))  # (B, N, D)
    mask = torch.zeros(len(bags), N, dtype=torch.bool)  # (B, N)
    for i, b in enumerate(bags):
        X[i, : len(b)] = b
        mask[i, : len(b)] = True
    return X, mask


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_registry_lists_the_documented_heads():
    assert {"abmil", "gated_abmil", "maxpool", "meanpool", "lse", "chowder", "dsmil"} <= set(list_heads())


@pytest.mark.parametrize("name", list_heads())
def test_output_shapes(name):
    head = make_head(name)
    out = head(torch.randn(3, 7, D))
    assert isinstance(out, BagOutput)
    assert out.logits.shape == (3,) and out.instance_scores.shape == (3, 7)
    assert out.attention is None or out.attention.shape == (3, 7)
    assert head(torch.randn(7, D)).logits.shape == (1,)  # a single bag (N, D)
    assert make_head(name, hidden_dim=16)(torch.randn(2, 4, D)).logits.shape == (2,)  # the shared kwarg


@pytest.mark.parametrize("garbage", sorted(GARBAGE))
@pytest.mark.parametrize("name", list_heads())
def test_padding_changes_nothing(name, garbage):
    head = make_head(name)
    torch.manual_seed(1)
    bags = [torch.randn(n, D) for n in LENGTHS]
    X, mask = padded_batch(bags, garbage)
    out = head(X, mask)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.instance_scores).all()
    for i, b in enumerate(bags):
        alone = head(b)  # unpadded, mask=None
        n = len(b)
        assert close(out.logits[i], alone.logits[0])
        assert close(out.instance_scores[i, :n], alone.instance_scores[0])
        if out.attention is not None:
            assert close(out.attention[i, :n], alone.attention[0])
    if out.attention is not None:
        assert out.attention[~mask].eq(0).all() and close(out.attention.sum(1), torch.ones(len(bags)))


@pytest.mark.parametrize("scale", [1.0, 1e3])
@pytest.mark.parametrize("name", list_heads())
def test_outputs_finite_for_single_instance_and_large_inputs(name, scale):
    head = make_head(name)
    for X in (scale * torch.randn(2, 1, D), scale * torch.randn(2, 40, D)):
        out = head(X)
        for t in (out.logits, out.instance_scores, out.attention):
            assert t is None or torch.isfinite(t).all()
    out = head(torch.randn(1, D))
    assert out.attention is None or out.attention.item() == pytest.approx(1.0)


@pytest.mark.parametrize("name", list_heads())
def test_empty_bag_raises_naming_the_bag(name):
    mask = torch.tensor([[True, True, False], [True, False, False], [False, False, False]])
    with pytest.raises(BagError, match="bag 2") as info:
        make_head(name)(torch.randn(3, 3, D), mask)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("name", list_heads())
def test_permutation_invariance(name):
    head = make_head(name)
    X = torch.randn(2, 25, D)
    perm = torch.randperm(25)
    out, outp = head(X), head(X[:, perm])
    assert close(out.logits, outp.logits) and close(out.instance_scores[:, perm], outp.instance_scores)
    if out.attention is not None:
        assert close(out.attention[:, perm], outp.attention)


@pytest.mark.parametrize("name", list_heads())
def test_gradients_reach_every_parameter_through_nan_padding(name):
    head = make_head(name).train()
    torch.manual_seed(2)
    X, mask = padded_batch([torch.randn(n, D) for n in LENGTHS], "nan")
    X.requires_grad_(True)
    out = head(X, mask)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, torch.tensor([1.0, 0.0, 1.0, 0.0]))
    loss.backward()
    assert torch.isfinite(X.grad).all() and X.grad[~mask].eq(0).all()
    for pname, p in head.named_parameters():
        assert p.grad is not None, f"{pname} gets no gradient"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"{pname} has a zero or non-finite gradient"


@pytest.mark.parametrize("name", ["abmil", "gated_abmil"])
def test_abmil_logit_is_attention_weighted_sum_of_instance_scores(name):
    head = make_head(name, hidden_dim=32, dropout=0.3).train()  # the identity holds under dropout too
    X, mask = padded_batch([torch.randn(n, D) for n in LENGTHS], "randn")
    out = head(X, mask)
    assert close(out.logits, (out.attention * out.instance_scores).sum(1))


def test_instance_heads_pool_instance_scores_as_named():
    X, mask = padded_batch([torch.randn(n, D) for n in LENGTHS], "huge")
    s_max = make_head("maxpool")(X, mask)
    assert torch.equal(s_max.logits, s_max.instance_scores.masked_fill(~mask, float("-inf")).amax(1))
    s_mean = make_head("meanpool")(X, mask)
    assert close(s_mean.logits, (s_mean.instance_scores * mask).sum(1) / mask.sum(1))
    s_lse = make_head("lse", r=5.0)(X, mask)
    s = s_lse.instance_scores.masked_fill(~mask, float("-inf"))  # (B, N)
    expected = (torch.logsumexp(5.0 * s, dim=1) - mask.sum(1).log()) / 5.0  # (B,)
    assert close(s_lse.logits, expected)
    assert all(o.attention is None for o in (s_max, s_mean, s_lse))


def _chowder_with_scores(values: torch.Tensor, r: int = 3) -> tuple[torch.nn.Module, torch.Tensor]:
    """A chowder head whose instance score is feature 0, and bags whose feature 0 is `values (B, N)`."""
    head = create_head("chowder", in_dim=D, r=r).eval()
    with torch.no_grad():
        head.score.weight.zero_()
        head.score.weight[0, 0] = 1.0
        head.score.bias.zero_()
    X = torch.randn(*values.shape, D)  # (B, N, D)
    X[..., 0] = values
    return head, X


def test_chowder_uses_only_the_top_and_bottom_r_scores():
    torch.manual_seed(0)
    values = torch.randn(1, 10).sort(dim=1, descending=True).values  # (1, 10) N > 2R = 6
    head, X = _chowder_with_scores(values)
    out = head(X)
    assert torch.equal(out.instance_scores, values)
    Xm = X.clone()
    Xm[0, 4, 0] = 0.5 * (values[0, 3] + values[0, 5])  # a middle instance, still in the middle
    Xm[0, 4, 1:] = 1e3  # other features do not enter a linear score on feature 0
    assert torch.equal(head(Xm).logits, out.logits)
    Xt = X.clone()
    Xt[0, 0, 0] += 1.0  # the top instance moves: the output must follow
    assert not torch.equal(head(Xt).logits, out.logits)


def test_chowder_small_bag_repeats_its_least_extreme_score():
    values = torch.tensor([[3.0, -1.0]])  # 2 real instances, R = 3
    head, X = _chowder_with_scores(values)
    t = torch.tensor([[3.0, -1.0, -1.0, -1.0, 3.0, 3.0]])  # top (desc, edge-padded), bottom (asc, edge-padded)
    assert close(head(X).logits, head.mlp(t).squeeze(-1))


def test_dsmil_logit_is_mean_of_its_two_branches():
    head = make_head("dsmil")
    X, mask = padded_batch([torch.randn(n, D) for n in LENGTHS], "randn")
    out = head(X, mask)
    c_max = out.instance_scores.masked_fill(~mask, float("-inf")).amax(1)  # (B,)
    assert torch.equal(out.max_instance_logits, c_max)
    assert close(out.logits, 0.5 * (c_max + out.bag_branch_logits))
    i, n = 3, LENGTHS[3]  # recompute one bag's attention from its critical instance's query
    Q = head.q(head.project(X[i, :n]))  # (n, attn_dim)
    q_m = Q[out.instance_scores[i, :n].argmax()]  # (attn_dim,)
    assert close(out.attention[i, :n], torch.softmax(Q @ q_m / Q.shape[1] ** 0.5, dim=0))


def test_unknown_head_and_bad_arguments_raise_option_errors():
    with pytest.raises(OptionError, match="did you mean 'abmil'"):
        create_head("abmill", in_dim=D)
    with pytest.raises(OptionError, match="dropout"):
        create_head("abmil", in_dim=D, dropout=-0.1)
    with pytest.raises(OptionError, match="r of logsumexp pooling"):
        create_head("lse", in_dim=D, r=0)
    with pytest.raises(OptionError, match="r of head chowder"):
        create_head("chowder", in_dim=D, r=0)
    with pytest.raises(OptionError, match="in_dim"):
        create_head("dsmil", in_dim=0)
    assert create_head("dsmil", in_dim=D, hidden_dim=None).v.in_features == D  # None: the paper's in_dim


def test_standardized_head_is_the_head_on_standardised_input_and_ignores_padding():
    from mil.heads import Standardized

    torch.manual_seed(0)
    head = create_head("abmil", in_dim=6).eval()
    mean, std = torch.randn(6), torch.rand(6) + 0.5
    wrapped = Standardized(head, mean, std).eval()
    X = torch.randn(2, 5, 6) * 3 + 7  # (B, N, D)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])  # (B, N)
    out = wrapped(X, mask)
    torch.testing.assert_close(out.logits, head((X - mean) / std, mask).logits)
    torch.testing.assert_close(out.logits[1], wrapped(X[1:2, :3]).logits[0])
    assert set(wrapped.state_dict()) >= {"mean", "std"}
    with pytest.raises(ValueError, match="std > 0"):
        Standardized(head, mean, torch.zeros(6))
