"""Core ML export: conversion and spec inspection here; predictions only on macOS."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn

from edgerep.errors import ConfigError, UnsupportedError
from edgerep.exporters import get_exporter
from edgerep.exporters.coreml import CoreMLExporter
from edgerep.fold import fold
from edgerep.runtimes import get_runtime
from edgerep.runtimes.coreml import package_dir
from edgerep.spec import example_inputs, parse_input_spec
from edgerep.zoo import randomize_

SPECS = [parse_input_spec("x:N[1..2..4]x3x8x8")]
ON_MAC = sys.platform == "darwin"
NOT_MAC = "Core ML predicts only on macOS; coremltools converts on Linux but cannot run models"


class ConvBNHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


@pytest.fixture(scope="module")
def nets():
    model = randomize_(ConvBNHead(), seed=0).eval()
    folded, _ = fold(model, example_inputs(SPECS, seed=0))
    return model, folded


@pytest.fixture(scope="module")
def package(nets, tmp_path_factory):
    _, folded = nets
    out = tmp_path_factory.mktemp("coreml")
    art = get_exporter("coreml").export(folded, example_inputs(SPECS, seed=0), SPECS, out)
    return art


def _spec(path):
    import coremltools as ct

    return ct.utils.load_spec(str(path))


def test_conversion_and_spec(nets, package):
    """Input names, the RangeDim of N in the spec, and the ML Program's ops."""
    _, folded = nets
    assert get_exporter("coreml").check(folded, example_inputs(SPECS, seed=0), SPECS) == []
    art = package
    assert art.path.name == "model.mlpackage" and art.path.is_dir()
    assert "model.mlpackage/Manifest.json" in art.files
    # coremltools' save adds ExecuTorch's debug-handle map after a torch.export conversion
    assert not any(f.endswith("executorch_debug_handle_mapping.json") for f in art.files)
    assert not (art.path / "executorch_debug_handle_mapping.json").exists()
    assert art.precision == "fp32" and art.metadata["exporter"] == "torch.export"
    assert art.inputs[0].name == "x" and art.inputs[0].shape == ("N", 3, 8, 8)
    assert [o.name for o in art.outputs] == ["output"] and art.outputs[0].dtype == "float32"
    spec = _spec(art.path)
    assert spec.WhichOneof("Type") == "mlProgram"
    assert spec.specificationVersion == 8  # iOS17
    (x,) = spec.description.input
    ranges = [(r.lowerBound, r.upperBound) for r in x.type.multiArrayType.shapeRange.sizeRanges]
    assert x.name == "x" and ranges == [(1, 4), (3, 3), (8, 8), (8, 8)]
    assert list(x.type.multiArrayType.shape) == [2, 3, 8, 8]  # the default is opt
    ops = art.metadata["op_types"]
    assert ops["conv"] == 1 and ops["linear"] == 1 and "batch_norm" not in ops, ops
    assert art.tool_versions["coremltools"]


def test_options_fp16_enumerated_target(nets, tmp_path):
    _, folded = nets
    exporter = CoreMLExporter(
        compute_precision="fp16", shapes="enumerated", minimum_deployment_target="iOS16"
    )
    art = exporter.export(folded, example_inputs(SPECS, seed=0), SPECS, tmp_path)
    spec = _spec(art.path)
    assert spec.specificationVersion == 7 and art.precision == "fp16"
    enumerated = spec.description.input[0].type.multiArrayType.enumeratedShapes.shapes
    assert sorted(tuple(s.shape) for s in enumerated) == [(1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8)]
    assert art.outputs[0].dtype == "float32"  # outputs stay float32 at fp16 compute
    assert "cast" in art.metadata["op_types"]


def test_check_and_options(nets):
    _, folded = nets
    with pytest.raises(ConfigError, match="not a Core ML target"):
        CoreMLExporter(minimum_deployment_target="ios17")
    with pytest.raises(ConfigError, match="choose one of fp32, fp16"):
        CoreMLExporter(compute_precision="int8")
    with pytest.raises(ConfigError, match="has no deployment target 'iOS99'"):
        CoreMLExporter(minimum_deployment_target="iOS99").check(
            folded, example_inputs(SPECS, seed=0), SPECS
        )
    specs = [parse_input_spec("x:1x4:float64")]
    problems = get_exporter("coreml").check(nn.Linear(4, 2), (torch.randn(1, 4).double(),), specs)
    assert [p.kind for p in problems] == ["unsupported-dtype"]
    assert "float64" in problems[0].message and "'x'" in problems[0].where


def test_runtime_off_macos(package):
    rt = get_runtime("coreml")
    assert package_dir(package.path / "Manifest.json") == package.path
    if ON_MAC:
        pytest.skip("this test checks the message given off macOS")
    assert not rt.is_available() and rt.devices() == []
    assert "macOS" in rt.unavailable_reason()
    with pytest.raises(UnsupportedError, match="only on macOS"):
        rt.load(package.path)


@pytest.mark.coreml_predict
@pytest.mark.skipif(not ON_MAC, reason=NOT_MAC)
def test_predict_on_macos(nets, package):
    model, _ = nets
    with get_runtime("coreml").load(package.path / "Manifest.json", device="cpu") as s:
        assert s.input_names == ["x"] and s.output_names == ["output"]
        for batch in (1, 2, 4):
            x = torch.randn(batch, 3, 8, 8)
            with torch.no_grad():
                ref = model(x).numpy()
            (got,) = s.run({"x": x.numpy()})
            assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
