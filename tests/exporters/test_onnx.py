"""ONNX export: registry, round trip through onnxruntime, fallback, problems, structure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgerep.errors import ConfigError, ExportError, UnsupportedError
from edgerep.exporters import (
    _REGISTRY,
    available_formats,
    get_exporter,
    register_exporter,
)
from edgerep.exporters.onnx import OnnxExporter
from edgerep.spec import example_inputs, parse_input_spec

# every registered format has a round-trip test ("module::test" or a test of this module);
# a new exporter without one fails here
ROUND_TRIP_TESTS = {
    "onnx": "test_round_trip_dynamic_batch",
    "openvino": "tests.exporters.test_openvino::test_round_trip_folded_and_unfolded",
    "coreml": "tests.exporters.test_coreml::test_conversion_and_spec",
    "tensorrt": "tests.exporters.test_tensorrt::test_offline_plan",
    "executorch": "tests.exporters.test_executorch::test_round_trip_dynamic_batch",
}


def _test_named(ref: str) -> object:
    import importlib

    module, sep, name = ref.partition("::")
    if not sep:
        return globals().get(ref)
    return getattr(importlib.import_module(module), name, None)


def _randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


class ConvBNHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class RepBlock(nn.Module):
    """RepVGG-style: 3x3 conv-BN + 1x1 conv-BN + BN identity, summed, then ReLU."""

    def __init__(self, c=6):
        super().__init__()
        self.c3 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.c1 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.id = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.c3(x) + self.c1(x) + self.id(x))


def _ort_run(path: Path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x.numpy()})[0]


def test_registry():
    assert "onnx" in available_formats()
    assert get_exporter("onnx") is get_exporter("onnx")
    with pytest.raises(ConfigError, match=r"unknown export format 'onx'; did you mean 'onnx'"):
        get_exporter("onx")
    with pytest.raises(ConfigError, match="already registered"):
        register_exporter(OnnxExporter())


def test_register_custom_exporter(monkeypatch):
    monkeypatch.setattr("edgerep.exporters._REGISTRY", dict(_REGISTRY))

    class Fake(OnnxExporter):
        format = "fake"

    fake = Fake()
    register_exporter(fake)
    assert get_exporter("fake") is fake
    with pytest.raises(ConfigError, match="already registered"):
        register_exporter(Fake())
    register_exporter(Fake(), replace=True)
    assert "fake" in available_formats()


def test_every_format_has_a_round_trip_test():
    missing = [f for f in available_formats() if f not in ROUND_TRIP_TESTS]
    assert not missing, f"formats without a round-trip test: {missing}"
    for ref in ROUND_TRIP_TESTS.values():
        assert callable(_test_named(ref)), ref


def test_round_trip_dynamic_batch(tmp_path):
    model = _randomize_bn(ConvBNHead())
    specs = [parse_input_spec("x:Nx3x8x8")]
    ex = example_inputs(specs, seed=0)
    exporter = get_exporter("onnx")
    assert exporter.check(model, ex, specs) == []
    art = exporter.export(model, ex, specs, tmp_path)
    assert art.path == tmp_path / "model.onnx" and art.files == ("model.onnx",)
    assert art.inputs[0].shape == ("N", 3, 8, 8)
    assert art.outputs[0].name == "output" and art.outputs[0].shape[0] == "N"
    assert art.metadata["exporter"] == "dynamo" and art.metadata["opset"] >= 17
    assert art.tool_versions["onnx"] == onnx.__version__
    onnx.checker.check_model(str(art.path), full_check=True)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            ref = model(x).numpy()
        got = _ort_run(art.path, x)
        assert got.shape == (batch, 5)
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_torchscript_fallback_is_recorded(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("torch.export cannot capture this")

    monkeypatch.setattr(OnnxExporter, "_export_dynamo", fail)
    model = _randomize_bn(ConvBNHead())
    specs = [parse_input_spec("x:Nx3x8x8")]
    art = OnnxExporter().export(model, example_inputs(specs, seed=0), specs, tmp_path)
    assert art.metadata["exporter"] == "torchscript"
    assert any("cannot capture this" in n and "TorchScript" in n for n in art.notes)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(_ort_run(art.path, x) - ref).max() <= 1e-4 * np.abs(ref).max()
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no scratch left


def test_both_exporters_failing(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("nope")

    monkeypatch.setattr(OnnxExporter, "_export_dynamo", fail)
    monkeypatch.setattr(OnnxExporter, "_export_torchscript", fail)
    specs = [parse_input_spec("x:1x3x8x8")]
    with pytest.raises(ExportError, match=r"both exporters.*RuntimeError: nope"):
        OnnxExporter().export(ConvBNHead().eval(), example_inputs(specs, seed=0), specs, tmp_path)


def test_simplifier_failure_keeps_the_graph(tmp_path, monkeypatch):
    import onnxslim

    def skip_dynamo(*args, **kwargs):  # the TorchScript path is faster and enough here
        raise RuntimeError("skipped")

    monkeypatch.setattr(OnnxExporter, "_export_dynamo", skip_dynamo)

    def fail(model):
        raise ValueError("slim broke")

    monkeypatch.setattr(onnxslim, "slim", fail)
    specs = [parse_input_spec("x:1x3x8x8")]
    art = OnnxExporter().export(ConvBNHead().eval(), example_inputs(specs, seed=0), specs, tmp_path)
    assert art.metadata["simplified"] is False
    assert any("slim broke" in n for n in art.notes)
    onnx.checker.check_model(str(art.path))


def test_large_weights_go_to_external_data(tmp_path, monkeypatch):
    def skip_dynamo(*args, **kwargs):  # the TorchScript path is faster and enough here
        raise RuntimeError("skipped")

    monkeypatch.setattr(OnnxExporter, "_export_dynamo", skip_dynamo)
    monkeypatch.setattr("edgerep.exporters.onnx.EXTERNAL_DATA_BYTES", 16)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 64), nn.ReLU()).eval()
    specs = [parse_input_spec("x:Nx3x8x8")]
    art = OnnxExporter().export(model, example_inputs(specs, seed=0), specs, tmp_path)
    assert art.files == ("model.onnx", "model.onnx.data") and art.metadata["external_data"]
    assert (tmp_path / "model.onnx.data").stat().st_size >= 3 * 8 * 8 * 64 * 4
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(_ort_run(art.path, x) - ref).max() <= 1e-4 * np.abs(ref).max()


class SVD(nn.Module):
    def forward(self, x):
        return torch.linalg.svdvals(x.flatten(1, 2))


def test_check_reports_ops_without_onnx_mapping(tmp_path):
    from edgerep.pipeline import convert

    specs = [parse_input_spec("x:1x3x4x4")]
    problems = OnnxExporter().check(SVD(), example_inputs(specs, seed=0), specs)
    assert problems and problems[0].kind == "unsupported-op"
    assert "svd" in problems[0].message
    with pytest.raises(UnsupportedError, match=r"(?s)1 problem.*svd"):
        convert(SVD(), specs, out_dir=tmp_path / "out", fold=False)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_folded_repblock_is_one_conv(tmp_path):
    """Structural check of fold + export: the three branches become one Conv, no BN, no Add."""
    from edgerep.pipeline import convert

    model = _randomize_bn(RepBlock())
    bundle, result = convert(model, [parse_input_spec("x:Nx6x8x8")], out_dir=tmp_path / "b")
    ops = [n.op_type for n in onnx.load(str(bundle / "onnx" / "model.onnx")).graph.node]
    assert ops.count("Conv") == 1, ops
    assert "BatchNormalization" not in ops and "Add" not in ops, ops
    assert result.formats[0].status == "verified"
