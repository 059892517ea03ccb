"""Cross-layer equalization is exact in float64 and balances per-channel ranges."""

from __future__ import annotations

import torch
from torch import nn

from edgerep.fold import fold
from edgerep.quantize import equalize
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
    eq, report = equalize(model)
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
