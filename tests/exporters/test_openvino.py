"""OpenVINO IR export: round trip through the OpenVINO runtime, structure, options, shapes."""

from __future__ import annotations

import numpy as np
import openvino as ov
import pytest
import torch
from torch import nn

from edgerep.errors import ConfigError
from edgerep.exporters import get_exporter
from edgerep.exporters.openvino import OpenVinoExporter, partial_shapes
from edgerep.fold import fold
from edgerep.runtimes import get_runtime
from edgerep.spec import example_inputs, parse_input_spec
from edgerep.zoo import randomize_

SPECS = [parse_input_spec("x:N[1..2..4]x3x8x8")]


class ConvBNHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.side = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x)) + self.side(x)).mean((2, 3)))


@pytest.fixture(scope="module")
def nets():
    model = randomize_(ConvBNHead(), seed=0).eval()
    folded, report = fold(model, example_inputs(SPECS, seed=0))
    assert report.folded
    return model, folded


def _run(path, x, precision="f32"):
    with get_runtime("openvino").load(path, options={"inference_precision": precision}) as s:
        return s.run({"x": x.numpy()})[0], s.describe()


def _op_types(path) -> list[str]:
    return [op.get_type_name() for op in ov.Core().read_model(str(path)).get_ordered_ops()]


def test_round_trip_folded_and_unfolded(nets, tmp_path):
    model, folded = nets
    ex = example_inputs(SPECS, seed=0)
    exporter = get_exporter("openvino")
    assert exporter.check(folded, ex, SPECS) == []
    for name, subject in (("unfolded", model), ("folded", folded)):
        (tmp_path / name).mkdir()
        art = exporter.export(subject, ex, SPECS, tmp_path / name)
        assert art.files == ("model.xml", "model.bin") and art.precision == "fp32"
        assert art.inputs[0].shape == ("N", 3, 8, 8) and art.outputs[0].shape == ("N", 5)
        assert art.metadata["partial_shapes"] == {"x": "[1..4,3,8,8]"}
        assert art.tool_versions["openvino"] == ov.__version__.split("-")[0]
        for batch in (1, 2, 4):  # min, opt, max
            x = torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(batch))
            with torch.no_grad():
                ref = model(x).numpy()
            got, desc = _run(art.path, x)
            assert desc["inference_precision"] == "fp32"
            assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    # structure: the folded IR is one convolution, no BN-like op, no separate scale
    folded_ops = _op_types(tmp_path / "folded" / "model.xml")
    assert folded_ops.count("Convolution") == 1, folded_ops
    assert not {"BatchNormInference", "Multiply"} & set(folded_ops), folded_ops
    assert _op_types(tmp_path / "unfolded" / "model.xml").count("Convolution") == 2


def test_fp16_weights_and_via_onnx(nets, tmp_path):
    _, folded = nets
    ex = example_inputs(SPECS, seed=0)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        ref = folded(x).numpy()
    (tmp_path / "h").mkdir()
    half = OpenVinoExporter(compress_to_fp16=True).export(folded, ex, SPECS, tmp_path / "h")
    assert half.precision == "fp16" and half.metadata["weights"] == "f16"
    assert "Convert" in _op_types(half.path)  # f16 constants decompressed at load
    got, _ = _run(half.path, x)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert 1e-6 < err <= 1e-2  # rounded weights: not exact, within the fp16 tolerance
    (tmp_path / "o").mkdir()
    via = OpenVinoExporter(via="onnx").export(folded, ex, SPECS, tmp_path / "o")
    assert via.metadata["exporter"].startswith("onnx")
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["model.bin", "model.xml"]
    got, _ = _run(via.path, x)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_partial_shapes_follow_the_spec():
    specs = [parse_input_spec("x:N[1..8..64]x3xHxW"), parse_input_spec("m:NxH:int64")]
    shapes = [str(s) for s in partial_shapes(specs)]
    assert shapes == ["[1..64,3,1..,1..]", "[1..64,1..]"]


def test_bad_options():
    with pytest.raises(ConfigError, match="choose one of torch, onnx"):
        OpenVinoExporter(via="tflite")
