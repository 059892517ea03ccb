"""The probe reads plain layers off functions exactly (float64, every geometry)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from edgerep.fold import probe, verify

CONV = {1: nn.Conv1d, 2: nn.Conv2d}
GEOMETRIES = [
    # nd, kernel, stride, dilation, padding, groups, bias
    (2, 3, 1, 1, 1, 1, True),
    (2, 3, 2, 1, 1, 1, False),
    (2, 3, 1, 2, 2, 1, True),
    (2, 5, 3, 1, 2, 2, True),
    (2, 3, 2, 2, 0, 4, True),
    (2, 1, 1, 1, 0, 1, False),
    (2, (1, 3), 1, 1, (0, 1), 1, True),
    (2, (3, 1), (2, 1), 1, (1, 0), 8, True),
    (1, 3, 1, 1, 1, 1, True),
    (1, 5, 2, 2, 4, 2, False),
]


def _random_conv(nd, kernel, stride, dilation, padding, groups, bias, channels=8):
    torch.manual_seed(0)
    conv = (
        CONV[nd](
            channels,
            channels,
            kernel,
            stride=stride,
            dilation=dilation,
            padding=padding,
            groups=groups,
            bias=bias,
        )
        .double()
        .eval()
    )
    return conv


@pytest.mark.parametrize("geo", GEOMETRIES, ids=lambda g: "nd{}-k{}-s{}-d{}-p{}-g{}-b{}".format(*g))
@pytest.mark.parametrize("size", [9, 12])
def test_probe_reads_conv_exactly(geo, size):
    nd = geo[0]
    conv = _random_conv(*geo)
    shape = (2, 8, *([size] * nd))
    found = probe.infer_conv_geometry(conv, shape)
    weight, bias, groups = probe.probe_conv(conv, found)
    rebuilt = probe.build_conv(found, weight, bias, groups)
    check = verify.compare(conv, rebuilt, verify.probe_shapes(shape, "conv"), rtol=1e-12)
    assert check.ok, check.reason
    assert len(check.shapes) == 3
    assert groups == conv.groups
    assert found.stride == conv.stride


def test_asymmetric_padding_becomes_pad_then_conv():
    torch.manual_seed(1)
    f = nn.Sequential(nn.ZeroPad2d((2, 0, 1, 0)), nn.Conv2d(4, 6, 3)).double()
    shape = (1, 4, 10, 11)
    geo = probe.infer_conv_geometry(f, shape)
    assert geo.pad_lo == (1, 2) and geo.pad_hi == (0, 0)
    w, b, g = probe.probe_conv(f, geo)
    rebuilt = probe.build_conv(geo, w, b, g)
    assert isinstance(rebuilt, nn.Sequential)
    assert verify.compare(f, rebuilt, verify.probe_shapes(shape, "conv")).ok


def test_biased_layer_before_zero_padded_conv_is_refused_with_reason():
    torch.manual_seed(2)
    f = nn.Sequential(nn.Conv2d(4, 4, 1, bias=True), nn.Conv2d(4, 4, 3, padding=1)).double()
    with torch.no_grad():
        f[0].bias.uniform_(1, 2)
    with pytest.raises(probe.ProbeFailure, match="border"):
        probe.infer_conv_geometry(f, (1, 4, 8, 8))


def test_probe_linear_on_last_dim_of_3d_input():
    torch.manual_seed(3)
    lin = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 7)).double()
    w, b = probe.probe_linear(lin, 6, 3)
    rebuilt = probe.build_linear(w, b)
    assert verify.compare(lin, rebuilt, verify.probe_shapes((2, 4, 6), "linear"), rtol=1e-12).ok


def test_probe_flat_linear():
    torch.manual_seed(4)

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2 * 3 * 3, 2 * 3 * 3)

        def forward(self, x):
            return self.fc(x.flatten(1)).view(-1, 2, 3, 3) + 0.5 * x

    f = Flat().double()
    w, b, out_rest = probe.probe_flat_linear(f, (1, 2, 3, 3))
    rebuilt = probe.build_flat_linear(w, b, out_rest)
    assert verify.compare(f, rebuilt, verify.probe_shapes((1, 2, 3, 3), "fixed"), rtol=1e-12).ok


def test_detect_groups_from_block_structure():
    w = torch.zeros(6, 6, 3)
    for _g, (i, _j) in enumerate(itertools.product(range(3), range(1))):
        w[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] = torch.randn(2, 2, 3)
    assert probe._detect_groups(w) == 3
    w[0, 5, 0] = 1.0
    assert probe._detect_groups(w) == 1


def test_verifier_rejects_a_wrong_replacement():
    torch.manual_seed(5)
    conv = nn.Conv2d(3, 3, 3, padding=1).double()
    wrong = nn.Conv2d(3, 3, 3, padding=1).double()
    with torch.no_grad():
        wrong.weight.copy_(conv.weight)
        wrong.bias.copy_(conv.bias + 1e-6)
    result = verify.compare(conv, wrong, [(1, 3, 8, 8)])
    assert not result.ok and "relative" in result.reason


def test_affinity_error_separates_affine_from_nonlinear():
    lin = nn.Linear(4, 4).double()
    assert verify.affinity_error(lin, (3, 4)) < 1e-14
    assert verify.affinity_error(nn.Sequential(lin, nn.GELU()), (3, 4)) > 1e-3


def test_verifier_inputs_are_reused_but_never_shared():
    """Small input sets are drawn once per (shapes, seed); a reference that writes into
    its input must not change what the next record sees (each gets a copy)."""
    shapes = [(2, 4, 7), (3, 7)]
    fresh = verify._draw(tuple(shapes), 0)

    def vandal(x):
        y = x * 2
        x.fill_(float("nan"))
        return y

    first = verify.record(vandal, shapes)
    second = verify.record(lambda x: x * 2, shapes)
    for x, f, y in zip(second.inputs, fresh, second.outputs):
        assert torch.equal(x, f) and torch.equal(y, 2 * f)
    assert all(torch.isnan(x).all() for x in first.inputs)  # its own copies were written
    big = [(1, 3, 200, 200)]  # above the cache size: drawn per call, same values
    assert torch.equal(verify.record(lambda x: x, big).inputs[0], verify._draw(tuple(big), 0)[0])
