"""Latency tables: widths, the no-slower-than-wider rule, the cache, one measured search."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgerep.bench.latency import LatencyConfig
from edgerep.prune import prune
from edgerep.prune._engine import _allocate
from edgerep.prune._latency import candidate_widths, detect_step, pareto, probe_widths
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
        min_ratio=0.5,  # a narrower step probe: fewer widths to time
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


def _staircase(step: int, widths, *, noise: float = 0.0, seed: int = 0):
    """A cost proportional to the width rounded up to `step` (a blocked kernel)."""
    rng = np.random.default_rng(seed)
    return {w: step * -(-w // step) * (1 + noise * rng.standard_normal()) for w in widths}


def test_the_channel_step_is_read_off_measurements() -> None:
    widths = probe_widths(96)
    assert widths == list(range(72, 31, -1)) and probe_widths(32, min_width=4) == list(
        range(32, 3, -1)
    )
    for step in (32, 16, 8, 4):
        assert detect_step(_staircase(step, widths)) == step
    # timing noise (1%) does not change it; a smooth cost gives a fine step
    assert detect_step(_staircase(16, widths, noise=0.01, seed=3)) == 16
    assert detect_step({w: float(w) for w in widths}) <= 4
    # the widths tried follow the measured step
    assert candidate_widths(96, step=16) == [96, 80, 64, 48, 32, 16]
    assert candidate_widths(48, step=4)[:3] == [48, 44, 40]


def test_a_latency_search_uses_the_measured_step(monkeypatch, tmp_path) -> None:
    """A backend whose layers cost a 16-channel staircase (a table standing in for the
    runtime: deterministic): the probe finds 16 and only multiples of 16 are chosen."""
    from edgerep.prune import _engine, _latency

    def staircase(self, shapes):
        return [s.macs() * 1e-6 * (-(-s.cout // 16) * 16 / s.cout) for s in shapes]

    monkeypatch.setattr(_latency.LatencyTables, "ms", staircase)
    monkeypatch.setattr(_engine, "measure_pair", lambda *a, **k: (1.0, 0.6))
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 64, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(64, 64, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(64, 10, 1),
    ).eval()
    _, report = prune(model, torch.randn(1, 3, 8, 8), target="latency=0.6", cache_dir=tmp_path)
    assert report.table["step"] == 16 and report.table["step_probe"]["group"] == "2"
    assert all(g.width % 16 == 0 for g in report.groups if g.prunable)
    assert any(g.width < g.size for g in report.groups)


def test_executorch_is_a_pruning_backend(tmp_path) -> None:
    """Layer tables and the end-to-end check run through edgerep's ExecuTorch exporter
    (XNNPACK) and runtime."""
    pytest.importorskip("executorch")
    from edgerep.prune._latency import LatencyTables, LayerShape, get_backend

    tables = LatencyTables(get_backend("executorch"), cache_dir=tmp_path)
    conv = LayerShape("Conv2d", (1, 8, 8), 16, 16, (3, 3), (1, 1), (1, 1), (1, 1))
    (ms,) = tables.ms([conv])
    assert tables.measured == 1 and ms > 0 and tables.path.is_file()
    _, report = prune(
        chain(), torch.randn(1, 3, 16, 16), target="widths=2:16", backend="executorch"
    )
    assert report.backend == "executorch" and report.p50_after_ms < report.p50_before_ms
