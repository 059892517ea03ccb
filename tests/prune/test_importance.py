"""Importance criteria: output reconstruction on calibration data, BN scale."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgerep.errors import ConfigError
from edgerep.prune import prune
from edgerep.prune._groups import build_groups
from edgerep.prune._importance import channel_importance
from tests.prune._nets import chain, coupled


def _brute_force(
    model: nn.Module, group_consumers: list[str], size: int, x: torch.Tensor
) -> torch.Tensor:
    """Sum over consumers of ||y - y(channel c zeroed at the input)||^2 / ||y||^2."""
    modules = dict(model.named_modules())
    out = torch.zeros(size, dtype=torch.float64)
    for name in group_consumers:
        layer = modules[name]
        seen: list[torch.Tensor] = []
        h = layer.register_forward_pre_hook(lambda _m, a, seen=seen: seen.append(a[0]))
        with torch.no_grad():
            model(x)
        h.remove()
        inp = seen[0]
        with torch.no_grad():
            y = layer(inp)
            for c in range(size):
                z = inp.clone()
                z[:, c] = 0.0
                out[c] += (layer(z) - y).pow(2).sum() / y.pow(2).sum()
    return out


def test_reconstruction_matches_zeroing_each_channel() -> None:
    model = coupled().double()
    x = torch.randn(6, 3, 10, 10, dtype=torch.float64)
    _, groups = build_groups(model, [x[:1]])
    prunable = [g for g in groups if g.prunable]
    notes: list[str] = []
    scores = channel_importance("reconstruction", model, prunable, calib=[x], notes=notes)
    modules = dict(model.named_modules())
    checked = 0
    for g in prunable:
        # consumers reading the group's channels one to one (a concatenation's consumer
        # reads more channels than the group has: not scored, and the notes say so)
        direct = [
            m.name
            for m in g.consumers
            if modules[m.name].weight.shape[1] * getattr(modules[m.name], "groups", 1) == g.size
        ]
        if len(direct) < len(g.consumers):
            assert any(g.name in n and "not scored" in n for n in notes)
        ref = _brute_force(model, direct, g.size, x)
        assert torch.allclose(torch.as_tensor(scores[g.name]), ref, rtol=1e-9, atol=1e-15)
        checked += 1
    assert checked >= 2


def test_reconstruction_ranks_a_dead_channel_lowest_and_prunes_it() -> None:
    model = chain().double()
    x = torch.randn(16, 3, 12, 12, dtype=torch.float64)
    # channel 7 of layer 2's output reaches layer 4 but layer 4 ignores it: its filter is
    # live (l2 keeps it) yet it contributes nothing to any consumer's output
    with torch.no_grad():
        model[4].weight[:, 7] = 0.0
        model[2].weight[7] *= 10.0
    _, groups = build_groups(model, [x[:1]])
    g = next(g for g in groups if g.name == "2")
    rec = channel_importance("reconstruction", model, [g], calib=[x])["2"]
    l2 = channel_importance("l2", model, [g])["2"]
    assert rec.argmin() == 7 and rec[7] == 0.0
    assert l2.argmax() == 7
    pruned, report = prune(
        model,
        x[:1],
        target="widths=2:31",
        importance="reconstruction",
        calib=x,
        recovery="none",
        measure=False,  # which channel goes, not speed (31 of 32 is slower on onnxruntime)
    )
    assert 7 not in report.plan.kept["2"]
    with torch.no_grad():
        assert (pruned(x) - model(x)).abs().max() <= 1e-9 * model(x).abs().max()


def test_reconstruction_needs_calibration_data() -> None:
    model = chain()
    x = torch.randn(2, 3, 12, 12)
    with pytest.raises(ConfigError, match=r"reconstruction.*calib"):
        prune(model, x[:1], target="macs=0.6", importance="reconstruction")


def test_reconstruction_through_a_flatten_scores_each_channels_feature_block() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 5),
    ).double()
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    _, groups = build_groups(model, [x[:1]])
    g = next(g for g in groups if g.name == "2")
    got = torch.as_tensor(channel_importance("reconstruction", model, [g], calib=[x])["2"])
    with torch.no_grad():
        feats = model[:5](x)
        y = model[5](feats)
        ref = torch.zeros(6, dtype=torch.float64)
        for c in range(6):
            z = feats.clone()
            z[:, c * 16 : (c + 1) * 16] = 0.0
            ref[c] = (model[5](z) - y).pow(2).sum() / y.pow(2).sum()
    assert torch.allclose(got, ref, rtol=1e-9)


class _BNNet(nn.Module):
    """Conv-BN stem, a RepVGG-like two-branch conv-BN block, a conv-BN, a conv without BN."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.c1 = nn.Conv2d(8, 16, 3, padding=1)
        self.b1 = nn.BatchNorm2d(16)
        self.c1x = nn.Conv2d(8, 16, 1)
        self.b1x = nn.BatchNorm2d(16)
        self.c2 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.plain = nn.Conv2d(16, 12, 1)  # no BN: scored l2, and named
        self.head = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(self.b1(self.c1(x)) + self.b1x(self.c1x(x)))
        x = torch.relu(self.plain(self.c2(x)))
        return self.head(x.mean((2, 3)))


SMALL = [1, 4, 9, 12]


def _bn_net() -> _BNNet:
    torch.manual_seed(0)
    model = _BNNet()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        for bn in (model.b1, model.b1x):
            bn.weight[SMALL] = 0.01
            # tiny variance: the folded filters of these channels are the largest, so a
            # magnitude criterion on the folded model keeps exactly the channels BN drops
            bn.running_var[SMALL] = 1e-6
    return model.eval()


def test_bn_importance_read_before_folding_drops_the_small_gamma_channels() -> None:
    from edgerep.fold import fold
    from edgerep.prune import bn_scales_for_folded

    model = _bn_net()
    x = torch.randn(2, 3, 8, 8)
    folded, fold_report = fold(model, x[:1])
    scales, skipped = bn_scales_for_folded(model, folded, fold_report)
    assert skipped == []
    (layer,) = [n for n, v in scales.items() if len(v) == 16 and v[SMALL].max() < 0.1]
    expected = (model.b1.weight + model.b1x.weight).detach().double().abs().numpy()
    assert torch.allclose(torch.as_tensor(scales[layer]), torch.as_tensor(expected))
    target = f"widths={layer}:12"
    # which channels go, not speed: these tiny nets are not timed
    _, rep = prune(folded, x[:1], target=target, importance="bn", bn_scales=scales, measure=False)
    assert sorted(set(range(16)) - set(rep.plan.kept[layer])) == SMALL
    # the check can fail: the folded weights rank those channels highest
    _, rep_l2 = prune(folded, x[:1], target=target, importance="l2", measure=False)
    assert not set(SMALL) - set(rep_l2.plan.kept[layer])
    # the conv with no BN is scored l2, and the report says so
    assert any("plain" in n and "fell back to l2" in n for n in rep.notes)


def test_bn_importance_on_the_unfolded_model_and_without_any_bn() -> None:
    model = _bn_net()
    x = torch.randn(2, 3, 8, 8)
    _, rep = prune(model, x[:1], target="widths=c1x:12", importance="bn", measure=False)
    assert sorted(set(range(16)) - set(rep.plan.kept["c1x"])) == SMALL
    with pytest.raises(ConfigError, match=r"importance='bn'.*none.*bn_scales"):
        prune(chain(), x[:1], target="macs=0.6", importance="bn")
