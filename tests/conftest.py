"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest


@pytest.fixture
def torchscript_onnx(monkeypatch):
    """Use the TorchScript ONNX exporter (10x faster) where the export path is not under test."""
    from edgerep.exporters.onnx import OnnxExporter

    def skip_dynamo(*args, **kwargs):
        raise RuntimeError("torch.export-based exporter skipped for speed in this test")

    monkeypatch.setattr(OnnxExporter, "_export_dynamo", skip_dynamo)


@pytest.fixture(autouse=True)
def _short_prune_timing(monkeypatch):
    """Pruning times every result end to end (0.5 s x 4 rounds per model by default);
    tests' tiny models settle in far less, so each round is shortened here. Tests of
    the timing itself pass their own ``latency_config``."""
    from edgerep.bench.latency import LatencyConfig
    from edgerep.prune import _engine

    monkeypatch.setattr(
        _engine,
        "E2E_LATENCY",
        LatencyConfig(
            warmup_iters=2, warmup_seconds=0.01, min_iters=10, min_seconds=0.03, repeats=3
        ),
    )
