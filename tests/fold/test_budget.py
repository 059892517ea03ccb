"""Cost guards and the fold budget: nothing too large is probed, and a fold stopped
by its time budget still returns a correct model that names what it skipped."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgerep.errors import ConfigError
from edgerep.fold import _budget, _collapse, fold
from edgerep.zoo import GhostModuleV3, RepViTBlock, randomize_

RTOL = 1e-9


def _batch_norms(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _rel(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        ya, yb = a(x), b(x)
    return ((ya - yb).abs().max() / ya.abs().max()).item()


def test_flat_probe_problem_compares_the_dense_weight_with_what_it_replaces():
    # 8 features -> 8 outputs: 72 weights for a block with 40 parameters is within 4x
    assert _budget.flat_probe_problem((1, 2, 2, 2), (1, 2, 2, 2), 40, 2**30) is None
    too_big = _budget.flat_probe_problem((1, 16, 112, 112), (1, 16, 112, 112), 736, 2**30)
    assert too_big is not None and "200,704 input features" in too_big and "736" in too_big
    no_memory = _budget.flat_probe_problem((1, 64, 8, 8), (1, 64, 8, 8), 10**9, 2**20)
    assert no_memory is not None and "memory budget" in no_memory


def test_ghostnetv3_block_at_112_is_not_offered_to_the_flat_probe(monkeypatch):
    """The module is affine as a whole but not one conv (border effect): before the
    guard, a dense Linear over 16x112x112 features was probed (>24 GiB)."""
    offered: list[tuple[int, ...]] = []
    real = _collapse._SIGNATURES["flat"]

    def spy(f, in_shape):
        offered.append(tuple(in_shape))
        return real(f, in_shape)

    monkeypatch.setitem(_collapse._SIGNATURES, "flat", spy)
    block = randomize_(GhostModuleV3(16, 16, act=False), seed=0).double().eval()
    x = torch.randn(1, 16, 112, 112, dtype=torch.float64)

    folded, report = fold(block, x)

    assert offered == [], f"the flat probe was offered {offered}"
    reasons = " ".join(k.reason for k in report.kept)
    assert "not probed" in reasons and "200,704" in reasons
    assert _rel(block, folded, x) <= RTOL
    # what the guard declined is still folded part by part: no BatchNorm left
    assert _batch_norms(folded) == []


def _repvit_net() -> nn.Module:
    net = nn.Sequential(
        RepViTBlock(8, 8), RepViTBlock(8, 12, stride=2, hidden=16), RepViTBlock(12, 12)
    )
    return randomize_(net, seed=3).double().eval()


def test_budget_limited_fold_returns_a_correct_model_and_names_what_it_skipped():
    net = _repvit_net()
    x = torch.randn(2, 8, 10, 9, dtype=torch.float64)

    folded, report = fold(net, x, time_budget_s=1e-9)

    assert report.folded == []
    skipped = [k for k in report.kept if "time budget" in k.reason]
    assert skipped, report.to_text()
    assert all(k.path or k.modules for k in skipped)
    assert any("time budget" in n for n in report.notes)
    assert _rel(net, folded, x) <= RTOL
    assert _rel(net, folded, torch.randn(1, 8, 7, 12, dtype=torch.float64)) <= RTOL


def test_unlimited_fold_of_the_same_net_leaves_no_batchnorm():
    net = _repvit_net()
    x = torch.randn(2, 8, 10, 9, dtype=torch.float64)

    folded, report = fold(net, x)

    assert _batch_norms(folded) == []
    assert report.peak_rss_mib > 0
    assert set(report.stage_seconds) >= {"prepare", "capture", "graph pass", "end-to-end check"}
    assert _rel(net, folded, torch.randn(1, 8, 11, 8, dtype=torch.float64)) <= RTOL


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf")])
def test_budgets_must_be_positive_and_finite(bad):
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)).eval()
    with pytest.raises(ConfigError, match="time_budget_s"):
        fold(model, torch.randn(1, 2, 4, 4), time_budget_s=bad)
    with pytest.raises(ConfigError, match="memory_budget_mib"):
        fold(model, torch.randn(1, 2, 4, 4), memory_budget_mib=bad)


def test_ledger_rows_name_what_was_folded_inside_a_kept_region():
    from edgerep.fold import FoldReport, KeptRegion
    from edgerep.pipeline import _fold_rows

    report = FoldReport(
        kept=[
            KeptRegion("blk", ("blk.a", "blk.b"), "2 activation inputs", ("blk.a -> Conv2d(4, 4)",))
        ]
    )
    (row,) = _fold_rows(report)
    assert (
        row["action"] == "kept"
        and "folded inside it instead: blk.a -> Conv2d(4, 4)" in row["detail"]
    )
