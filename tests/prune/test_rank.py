"""Low-rank factorization: exact at full rank, best rank-r, kept only when measured faster."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgerep.errors import ConfigError
from edgerep.prune import prune
from edgerep.prune._rank import factorize
from tests.prune._calls import macs, prune_on


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 48, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(48, 64, 1, stride=2),  # 1x1, strided: factorizable
        nn.ReLU(),
        nn.Conv2d(64, 32, 3, padding=1),  # 3x3: not factorizable
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    ).eval()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_full_rank_svd_is_exact_and_truncation_is_the_best_rank_r(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for layer in (nn.Linear(24, 40), nn.Conv2d(40, 24, 1, stride=2)):
        layer = layer.double()
        with torch.no_grad():
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g, dtype=torch.float64))
        x = (
            torch.randn(
                (5, 24) if isinstance(layer, nn.Linear) else (5, 40, 7, 7),
                generator=g,
                dtype=torch.float64,
            )
            * 3
            + 1
        )
        full = factorize(layer, 24)
        with torch.no_grad():
            ref = layer(x)
            assert float((full(x) - ref).norm() / ref.norm()) < 1e-12
            w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
            sv = torch.linalg.svdvals(w)
            f8 = factorize(layer, 8)
            w8 = f8[1].weight.reshape(w.shape[0], 8) @ f8[0].weight.reshape(8, w.shape[1])
            # Eckart-Young: the truncated SVD's error is the tail of the singular values
            assert torch.allclose((w - w8).norm(), sv[8:].norm(), rtol=1e-10)
    with pytest.raises(ConfigError, match="outside"):
        factorize(nn.Linear(4, 6), 5)
    with pytest.raises(ConfigError, match="only Linear and 1x1"):
        factorize(nn.Conv2d(4, 4, 3), 2)


def test_a_factorization_measured_slower_is_not_kept() -> None:
    model = _mlp(0)
    x = torch.randn(32, 3, 8, 8)

    def factors_slow(shapes):  # every layer costs 1: two factors are slower than one layer
        return [1.0] * len(shapes)

    same, report = prune_on(model, x, "rank", layer_cost=factors_slow, rank_error=0.9)
    assert report.rank and all(r.rank is None for r in report.rank)
    assert any("measured 2 ms >= 1 ms unfactored" in r.reason for r in report.rank)
    assert not report.plan.ranks
    assert all(
        torch.equal(a, b) for a, b in zip(same.state_dict().values(), model.state_dict().values())
    )
    # the same model with a table where factors are cheaper: factorized
    pruned, report = prune_on(model, x, "rank", rank_error=0.9, keep=["10"])
    kept = {r.layer: r.rank for r in report.rank if r.rank is not None}
    assert set(kept) == {"2", "8"} and report.plan.ranks == kept  # "10" kept by keep=
    assert isinstance(pruned[2], nn.Sequential) and pruned[2][0].stride == (2, 2)
    assert all(r.ms_after < r.ms_before for r in report.rank if r.rank is not None)
    assert pruned(x).shape == (32, 10)


def test_rank_error_bounds_the_output_error() -> None:
    model = _mlp(1).double()
    x = torch.randn(64, 3, 8, 8, dtype=torch.float64) * 2 + 0.3
    _, tight = prune_on(model, x, "rank", rank_error=1e-06)
    assert all(r.rank is None and "within max_error" in r.reason for r in tight.rank)
    pruned, loose = prune_on(model, x, "rank", rank_error=0.3)
    layer = next(r for r in loose.rank if r.layer == "8")
    assert layer.rank is not None and layer.rel_error <= 0.3
    # the reported error is the layer's output error on the calibration data
    feats = model[:8](x)
    with torch.no_grad():
        err = (pruned[8](feats) - model[8](feats)).norm() / model[8](feats).norm()
    assert abs(float(err) - layer.rel_error) < 1e-8
    with pytest.raises(ConfigError, match="rank max_error"):
        prune(model, x[:1], method="rank", rank_error=0, layer_cost=macs, measure=False)
