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
