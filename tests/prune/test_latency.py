"""Latency tables: widths, the no-slower-than-wider rule, the cache, one measured search."""

from __future__ import annotations

import pytest
import torch

from edgerep.bench.latency import LatencyConfig
from edgerep.prune import prune
from edgerep.prune._engine import _allocate
from edgerep.prune._latency import candidate_widths, pareto
from tests.prune._nets import chain


def test_candidate_widths_are_granular_and_bounded() -> None:
    assert candidate_widths(48) == [48, 40, 32, 24, 16, 8]
    assert candidate_widths(192)[:3] == [192, 176, 160] and len(candidate_widths(192)) == 12
    assert len(candidate_widths(1280)) <= 13 and candidate_widths(1280)[0] == 1280
    assert min(candidate_widths(96, min_width=30)) == 32
    assert candidate_widths(5) == [5, 4, 3, 2, 1]


def test_a_width_slower_than_a_wider_one_is_never_chosen() -> None:
    table = {64: 1.0, 56: 1.1, 48: 0.7, 40: 0.72, 32: 0.5, 24: 0.5, 16: 0.3}
    kept = pareto(table)
    assert kept == {64: 1.0, 48: 0.7, 32: 0.5, 16: 0.3}
    import numpy as np

    scores = {"g": np.linspace(1, 2, 64)}
    for need in (0.05, 0.3, 0.45, 0.7):
        widths, done = _allocate({"g": kept}, scores, {"g": 64}, need)
        assert widths["g"] in kept and done >= need


def test_latency_target_is_measured_and_tables_are_cached(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    model, x = chain(), torch.randn(32, 3, 16, 16)
    fast = LatencyConfig(
        warmup_iters=2, warmup_seconds=0.0, min_iters=10, min_seconds=0.02, repeats=2
    )
    big = torch.randn(1, 3, 96, 96)
    options = dict(
        target="latency=0.6",
        calib=x,
        latency_inputs=big,
        cache_dir=tmp_path,
        latency_config=fast,
        max_iters=2,
    )
    _, report = prune(model, x[:1], **options)
    assert report.backend == "onnxruntime" and report.iterations
    assert report.table["layers_measured"] > 0
    assert report.p50_before_ms and report.p50_after_ms
    assert report.achieved == pytest.approx(report.p50_after_ms / report.p50_before_ms)
    assert report.p50_after_ms < report.p50_before_ms  # never slower (else refused)
    assert report.status in ("met", "missed")
    _, again = prune(model, x[:1], **options)
    assert again.table["layers_measured"] == 0 and again.table["layers_from_cache"] > 0
