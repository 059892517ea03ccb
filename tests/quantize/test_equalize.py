"""Cross-layer equalization is exact in float64 and balances per-channel ranges."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgerep.errors import ConfigError
from edgerep.fold import fold
from edgerep.quantize import _equalize, equalize
from edgerep.quantize._equalize import _ranges
from edgerep.zoo import demo_net, randomize_


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def _spread_channels(model: nn.Module, seed: int) -> nn.Module:
    """Give output channels very different scales, the case equalization targets."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(
                    torch.exp(3 * torch.randn(m.weight.shape[0], generator=gen))
                    .reshape(-1, 1, 1, 1)
                    .to(m.weight.dtype)
                )
    return model


def test_folded_demo_net_exact_in_float64() -> None:
    net = randomize_(demo_net(), seed=3).double().eval()
    x0 = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    folded, _ = fold(net, (torch.randn(1, 1, 16, 16, dtype=torch.float64),))
    assert _rel_err(folded(x0), net(x0)) < 1e-9  # fold itself is exact
    folded = _spread_channels(folded, seed=1)
    before = {k: v.clone() for k, v in folded.state_dict().items()}
    eq, report = equalize(folded, (torch.randn(1, 1, 16, 16, dtype=torch.float64),))
    # input untouched
    assert all(torch.equal(before[k], v) for k, v in folded.state_dict().items())
    # demo_net folds to six convs in a ReLU chain: five pairs, the depthwise one included
    assert len(report.pairs) == 5, report
    for size in (16, 23):
        x = torch.randn(
            4, 1, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(size)
        )
        assert _rel_err(eq(x), folded(x)) < 1e-9
    for pair in report.pairs:
        assert pair.imbalance_after < 1.01 or pair.imbalance_after < pair.imbalance_before
    worst_before = max(p.imbalance_before for p in report.pairs)
    worst_after = max(p.imbalance_after for p in report.pairs)
    assert worst_before > 100 and worst_after < 1.01, report


def test_sequential_with_groups_bias_and_linear() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=4, padding=2, dilation=2, bias=False),
        nn.ReLU(),
        nn.Conv2d(8, 6, 1),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 10),
        nn.ReLU(),
        nn.Linear(10, 5),
    ).double()
    _spread_channels(model, seed=2)
    with torch.no_grad():
        model[6].weight.mul_(  # type: ignore[operator]
            torch.logspace(-2, 2, 10, dtype=torch.float64)[:, None]
        )
    eq, report = equalize(model, (torch.randn(1, 3, 7, 7, dtype=torch.float64),))
    assert report.refused == "" and report.max_rel_error < 1e-9, report
    assert {(p.first, p.second) for p in report.pairs} == {("0", "2"), ("2", "4"), ("6", "8")}
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    assert _rel_err(eq(x), model(x)) < 1e-9
    for p in report.pairs:
        r1, r2 = _ranges(eq.get_submodule(p.first), eq.get_submodule(p.second))
        assert torch.allclose(r1, r2, rtol=1e-2), p


def test_declines_with_reason_when_output_is_shared() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(2, 4, 1)
            self.b = nn.Conv2d(4, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            return self.b(torch.relu(h)) + h

    _, report = equalize(Branchy())
    assert report.pairs == []
    assert report.declined and "other users" in report.declined[0][1]


def test_without_input_shape_asks_for_example_inputs() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3), nn.Flatten())
    model = nn.Sequential(*model, nn.Linear(2 * 5 * 5, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(ConfigError, match="example_inputs"):
        equalize(model)  # the 12x12 probe cannot run the 7x7-only head
    _, report = equalize(model, (torch.randn(1, 3, 9, 9),))
    assert len(report.pairs) == 2 and report.refused == ""


def test_float32_model_stays_float32_and_close() -> None:
    torch.manual_seed(4)
    model = _spread_channels(
        nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 3, 1)), seed=5
    )
    x = torch.randn(2, 2, 9, 9)
    eq, report = equalize(model, (x,))
    assert eq.get_submodule("0").weight.dtype == torch.float32 and report.max_rel_error < 1e-9
    assert _rel_err(eq(x), model(x)) < 1e-5


def test_gate_refuses_a_wrong_transform(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(first: nn.Module, second: nn.Module) -> torch.Tensor:
        s = torch.full((first.weight.shape[0],), 2.0, dtype=torch.float64)
        with torch.no_grad():
            first.weight.div_(2.0)  # forgets the bias and the second layer
        return s

    monkeypatch.setattr(_equalize, "_equalize_pair", broken)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    eq, report = equalize(model, (torch.randn(3, 4, dtype=torch.float64),))
    assert "differs" in report.refused and report.pairs == []
    assert all(torch.equal(a, b) for a, b in zip(eq.parameters(), model.parameters(), strict=True))


# --- bias absorption ---------------------------------------------------------------


def _always_on(model: nn.Module, layer: int, seed: int) -> nn.Module:
    """Raise half of a layer's biases so those channels never go negative on N(0,1) data."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bias = model[layer].bias
        lift = torch.where(torch.arange(bias.numel()) % 2 == 0, 8.0, 0.0).to(bias.dtype)
        bias.add_(lift + 0.1 * torch.randn(bias.shape, generator=gen, dtype=bias.dtype))
    return model


def test_absorb_linear_exact_on_data_and_only_there() -> None:
    torch.manual_seed(6)
    model = nn.Sequential(
        nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)
    ).double()
    _always_on(model, 0, seed=1)
    _always_on(model, 2, seed=2)
    calib = [torch.randn(32, 5, dtype=torch.float64) for _ in range(3)]
    eq_only, _ = equalize(model, calib=calib)
    eq, report = equalize(model, absorb_bias=True, calib=calib)
    assert report.refused == "" and len(report.absorbed) == 2, report
    for x in calib:
        assert _rel_err(eq(x), model(x)) < 1e-9
    first = report.absorbed[0]
    assert (first.first, first.second) == ("0", "2") and first.data_dependent
    assert first.source == "calibration" and "calibration samples" in first.condition
    # the shift is the per-channel minimum of the (equalized) pre-activation, clamped at 0
    pre = torch.cat([eq_only.get_submodule("0")(x) for x in calib])
    expected = pre.amin(dim=0).clamp_min(0)
    assert torch.allclose(torch.tensor(first.shift, dtype=torch.float64), expected, rtol=1e-12)
    assert first.channels == int((expected > 0).sum()) >= 4
    # the activation range shrank by the shift
    act_before = torch.relu(pre).amax(dim=0)
    act_after = torch.relu(torch.cat([eq.get_submodule("0")(x) for x in calib])).amax(dim=0)
    assert torch.allclose(act_after, act_before - expected, rtol=1e-9, atol=1e-12)
    # data-dependent: an input that drives an absorbed channel below its shift differs
    far = -50 * torch.sign(model[0].weight[0]).reshape(1, -1)
    assert _rel_err(eq(far), model(far)) > 1e-6


def test_absorb_conv_groups_bn_cap_and_padding_declined() -> None:
    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 6, 1, groups=2),
        nn.ReLU(),
        nn.Conv2d(6, 4, 3, padding=1),
    ).double()
    _always_on(model, 0, seed=3)
    _always_on(model, 2, seed=4)
    _spread_channels(model, seed=8)
    gen = torch.Generator().manual_seed(9)
    beta = 6 + torch.randn(8, generator=gen, dtype=torch.float64)
    gamma = (
        torch.rand(8, generator=gen, dtype=torch.float64)
        * torch.where(torch.rand(8, generator=gen) < 0.5, -1.0, 1.0).double()
    )
    calib = torch.randn(16, 3, 7, 7, dtype=torch.float64)
    eq, report = equalize(model, absorb_bias=True, calib=calib, bn_stats={"0": (beta, gamma)})
    assert [(a.first, a.second) for a in report.absorbed] == [("0", "2")], report
    assert any("pads with zeros" in r for w, r in report.declined if w == "absorb 2 -> 4")
    absorbed = report.absorbed[0]
    assert absorbed.source == "calibration+bn"
    x = calib
    assert _rel_err(eq(x), model(x)) < 1e-9
    # the shift never exceeds BN's 3-sigma bound, rescaled by the equalization
    eq_only, _ = equalize(model, calib=calib)
    scale = model[0].bias / eq_only.get_submodule("0").bias  # equalization divides channel i by s_i
    cap = (beta - 3 * gamma.abs()).clamp_min(0) / scale
    shift = torch.tensor(absorbed.shift, dtype=torch.float64)
    assert bool((shift <= cap * (1 + 1e-12)).all()) and bool((shift > 0).any())
    _, data_only = equalize(model, absorb_bias=True, calib=calib)
    assert float(shift.sum()) < sum(data_only.absorbed[0].shift)  # the cap binds somewhere
    with pytest.raises(ConfigError, match="did you mean '0'"):
        equalize(model, absorb_bias=True, calib=calib, bn_stats={"0.": (beta, gamma)})


def test_absorb_needs_data() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    _, report = equalize(model, absorb_bias=True)
    assert report.absorbed == []
    assert any("pass calib" in reason for _, reason in report.declined)
