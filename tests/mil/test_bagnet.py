"""BagNet: measured receptive fields, output shapes per canvas and pooling, the bag view, options.

The receptive field is measured, not recomputed: the support of the input gradient of one output
position is the set of pixels that position depends on. Two things would blur that measurement and
are removed: InstanceNorm's statistics are taken over every position, so with it each output depends
on the whole image (shown by `test_instance_norm_couples_every_position`); and a ReLU that happens
to be off, or paths that happen to cancel, could hide a pixel that is connected. The measurement
therefore uses BatchNorm in eval mode (a per-channel affine map that mixes no positions), positive
random weights and a positive image: every activation is then positive, every ReLU passes, and the
gradient is a sum of positive path products, > 0 exactly on the connected pixels.
"""

from __future__ import annotations

import pytest
import torch

from mil import create_bagnet, list_bagnets
from mil.bagnet import BagNet, receptive_field
from mil.bags import BagError
from mil.errors import OptionError
from mil.pooling import list_poolings

W = 0.125  # 8 stem channels, embedding C = 256: small enough for 2 CPU cores
SIZE = {40: 5, 64: 8, 72: 9, 128: 16}  # canvas side → feature-map side: 3×3 stem (padding 0), then 3 stride-2 stages


def make(rf: int = 33, pooling: str = "max", seed: int = 0, **kw) -> BagNet:
    torch.manual_seed(seed)
    return create_bagnet(rf=rf, pooling=pooling, width=W, **kw)


def positive_weights(net: BagNet) -> BagNet:
    """Every conv weight ~ U(0, 1) / fan_in: positive, activations stay O(1) through 16 blocks."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_(torch.rand_like(m.weight) / m.weight[0].numel())
    return net


def input_gradient(net: BagNet, S: int, i: int) -> torch.Tensor:
    """``(S, S)`` gradient of ``Σ_c F[0, c, i, i]`` with respect to an ``S × S`` positive image."""
    x = (torch.rand(1, 1, S, S, dtype=torch.float64) + 0.5).requires_grad_()  # (1, 1, S, S)
    F = net.embed(x)  # (1, C, h, w)
    F[0, :, i, i].sum().backward()
    return x.grad[0, 0]  # (S, S)


@pytest.mark.parametrize("rf", [9, 33, 177])
def test_receptive_field_measured_from_input_gradient(rf):
    S = rf + 24  # the square of a central position fits with a margin: 33, 57, 201
    i = round((S / 2 - 1) / 8)  # the position centred nearest the image centre
    net = positive_weights(make(rf, norm="bn").double().eval())
    g = input_gradient(net, S, i)  # (S, S)
    rows = torch.nonzero(g.sum(dim=1) > 0).squeeze(1)  # (rf,)
    cols = torch.nonzero(g.sum(dim=0) > 0).squeeze(1)  # (rf,)
    assert len(rows) == len(cols) == rf == net.rf
    centre, half = 8 * i + 1, (rf - 1) // 2  # position i is centred on pixel 8i + 1
    assert 0 < centre - half and centre + half < S - 1  # the support is inside, not cut by the border
    square = torch.zeros(S, S, dtype=torch.bool)  # (S, S)
    square[centre - half : centre + half + 1, centre - half : centre + half + 1] = True
    assert torch.equal(g > 0, square)  # > 0 on the whole square, 0 outside it


def test_instance_norm_couples_every_position():
    """Why the measurement uses BatchNorm in eval mode: with InstanceNorm every pixel moves every output."""
    torch.manual_seed(0)
    net = create_bagnet(rf=9, width=W, norm="in_aff").double()
    g = input_gradient(net, 33, 2)  # (33, 33)
    assert (g != 0).float().mean() > 0.99  # far beyond the 9 × 9 square


def test_receptive_field_formula():
    assert [receptive_field(k) for k in [(1, 1, 0, 0), (1, 1, 1, 1), (3, 4, 6, 3), (1, 1, 1, 0), (0, 0, 0, 0)]] == [9, 33, 177, 17, 3]


@pytest.mark.parametrize("pooling", list_poolings())
@pytest.mark.parametrize("rf", [9, 33])
def test_output_shapes_per_canvas(rf, pooling):
    net = make(rf, pooling).eval()
    C = 2048 * W
    assert net.embed_dim == C
    for H, Wd in [(64, 64), (128, 128), (40, 72)]:
        x = torch.randn(2, 1, H, Wd)  # (B, 1, H, W)
        h, w = SIZE[H], SIZE[Wd]
        assert BagNet.feature_size(H, Wd) == (h, w)
        with torch.no_grad():
            assert net.embed(x).shape == (2, C, h, w)
            logits = net(x)  # (B,)
            out = net.forward_bag(x)
        assert logits.shape == (2,) and torch.isfinite(logits).all()
        assert out.instance_scores.shape == (2, h * w)
        assert (out.attention is None) == (pooling not in ("attention", "gated_attention"))
        if out.attention is not None:
            assert out.attention.shape == (2, h * w) and torch.allclose(out.attention.sum(1), torch.ones(2))


def test_rf177_runs_on_a_canvas_smaller_than_its_field():
    net = make(177, "mean").eval()
    with torch.no_grad():
        assert net(torch.randn(1, 1, 64, 64)).shape == (1,)


@pytest.mark.parametrize("pooling", list_poolings())
def test_gradients_reach_every_parameter(pooling):
    net = make(33, pooling).train()
    logits = net(torch.randn(2, 1, 40, 40))  # (B,)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([0.0, 1.0])).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bag_view_is_consistent_with_the_logits():
    x = torch.randn(2, 1, 64, 64)  # (B, 1, H, W)
    with torch.no_grad():
        mean = make(9, "mean").eval()
        out = mean.forward_bag(x)
        # pooling and classifier are both linear: the mean of the instance logits is the bag logit
        assert torch.allclose(out.logits, out.instance_scores.mean(1), atol=1e-5)
        assert torch.allclose(out.logits, mean(x), atol=1e-6)
        assert torch.equal(mean.saliency(x), out.instance_scores.reshape(2, 8, 8))
        att = make(9, "gated_attention").eval()
        out = att.forward_bag(x)
        assert torch.allclose(out.logits, (out.attention * out.instance_scores).sum(1), atol=1e-5)
        mx = make(9, "max").eval()
        out = mx.forward_bag(x)
        assert torch.allclose(out.logits, mx(x), atol=1e-6)


def bagnet_params_from_spec(kernel3, width=1.0, in_chans=1, compensate=True) -> int:
    """Parameters of the authors' BagNet (Pawlowski et al. 2020, `model/model.py`; methods.md §5.3), counted by hand.

    Stem: 1×1 conv in_chans → 64w and 3×3 conv 64w → 64w, no biases, one affine norm (2 per channel). Stages of
    [3, 4, 6, 3] bottlenecks, planes 64w·{1, 2, 4, 8}, expansion 4: 1×1 c_in → planes, k×k planes → mid
    (mid = planes for 3×3, 2.5·planes for a compensated 1×1), 1×1 mid → 4·planes, each conv followed by an
    affine norm; the first block of each stage changes the channels, so it has a 1×1 projection shortcut with
    its norm. Then max pooling (no parameters) and Linear(2048w, 1) with bias.
    """
    base = round(64 * width)
    total = in_chans * base + base * base * 9 + 2 * base  # stem
    c = base
    for s, (n_blocks, k3) in enumerate(zip((3, 4, 6, 3), kernel3)):
        planes = base * 2**s
        c_out = 4 * planes
        for b in range(n_blocks):
            k = 3 if b < k3 else 1
            mid = int(2.5 * planes) if k == 1 and compensate else planes
            total += c * planes + 2 * planes  # 1×1 reduce + norm
            total += planes * mid * k * k + 2 * mid  # middle conv + norm
            total += mid * c_out + 2 * c_out  # 1×1 expand + norm
            if b == 0:
                total += c * c_out + 2 * c_out  # projection shortcut + norm
            c = c_out
    return total + c + 1  # classifier


def test_compensation_evens_out_the_parameter_count():
    """Counts derived from the architecture (not copied from the code), and what compensation is for: the 2.5×
    wider 1×1 middle convs give rf 9 (two 3×3 blocks) about the parameters of rf 33 (four 3×3 blocks)."""
    kernel3 = {9: (1, 1, 0, 0), 33: (1, 1, 1, 1), 177: (3, 4, 6, 3)}  # 3×3 middle convs per stage (methods.md §5.3)
    n = {rf: sum(p.numel() for p in create_bagnet(rf=rf, width=1.0).parameters()) for rf in (9, 33, 177)}
    assert n == {rf: bagnet_params_from_spec(kernel3[rf]) for rf in (9, 33, 177)}
    assert n[177] == bagnet_params_from_spec((3, 4, 6, 3), compensate=False)  # all 3×3: compensation never applies
    # rf 177 is ResNet-50 (torchvision: 25,557,032 parameters, 23,508,032 without its 1000-class fc) with another
    # stem (1×1 + 3×3 conv from 1 channel instead of 7×7 from 3) and a one-logit classifier
    assert n[177] == 23_508_032 - 3 * 64 * 49 + (64 + 64 * 64 * 9) + 2049
    assert 0.99 < n[9] / n[33] < 1.0  # within 1 % of each other
    plain = sum(p.numel() for p in create_bagnet(rf=9, width=1.0, compensate=False).parameters())
    assert plain == bagnet_params_from_spec(kernel3[9], compensate=False)
    assert plain < 0.8 * n[33]  # without compensation rf 9 would have far fewer parameters
    half = sum(p.numel() for p in create_bagnet(rf=33, width=0.5, in_chans=3).parameters())
    assert half == bagnet_params_from_spec(kernel3[33], width=0.5, in_chans=3)


def test_registry_config_and_options():
    assert list_bagnets() == ["bagnet9", "bagnet33", "bagnet177"]
    net = make(33, "logsumexp", r=2.0, dropout=0.2, in_chans=3)
    assert net.config["rf"] == 33 and net.config["r"] == 2.0
    assert sum(isinstance(m, torch.nn.Dropout2d) for m in net.modules()) == 4  # first block of each stage
    twin = create_bagnet(**net.config)
    assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}
    rf17 = create_bagnet(rf=None, kernel3=(1, 1, 1, 0), width=W)
    assert rf17.rf == 17 and create_bagnet(**rf17.config).kernel3 == (1, 1, 1, 0)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(rf=5), "expected rf of bagnet to be one of 9, 33, 177"),
        (dict(pooling="avg"), "pooling name among"),
        (dict(width=0), "expected width of bagnet to be a number > 0"),
        (dict(norm="gn"), "expected norm of bagnet to be one of in_aff, in, bn"),
        (dict(dropout=1.0), "expected dropout of bagnet"),
        (dict(rf=None, kernel3=(4, 0, 0, 0)), "expected kernel3 of bagnet"),
        (dict(rf=33, kernel3=(1, 1, 0, 0)), "expected rf of bagnet to be None or 9"),
        (dict(pooling="mean", r=2.0), "expected only options that mean pooling takes"),
        (dict(pooling="logsumexp", r=0), "expected r of logsumexp pooling"),
    ],
)
def test_bad_options_raise_option_error(kw, message):
    with pytest.raises(OptionError, match=message.replace("(", r"\(")):
        create_bagnet(**{"width": W, **kw})


def test_bad_images_raise_bag_error():
    net = make(9).eval()
    for x in [torch.randn(1, 3, 64, 64), torch.randn(1, 1, 8, 64), torch.zeros(1, 1, 64, 64, dtype=torch.long), torch.randn(1, 64, 64)]:
        with pytest.raises(BagError, match=r"expected float images of shape \(B, 1, H, W\)"):
            net(x)
