"""TensorRT: offline checks and the trtexec plan everywhere; engine build/run with TensorRT + GPU."""

from __future__ import annotations

import importlib.util
import json
import shlex

import numpy as np
import pytest
import torch
from torch import nn

from edgerep.errors import ConfigError, ExportError, UnsupportedError
from edgerep.exporters import get_exporter
from edgerep.exporters.tensorrt import TensorRTExporter, gpu_description, trtexec_command
from edgerep.runtimes import get_runtime
from edgerep.runtimes.tensorrt import engine_mismatch
from edgerep.spec import example_inputs, parse_input_spec, shape_profiles

SPECS = [parse_input_spec("x:N[1..2..4]x3x8x8")]
HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
NO_TRT = "tensorrt is not installed here (its wheels need NVIDIA's index and a GPU machine)"


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(512, 5)
    ).eval()


def test_trtexec_command_from_the_spec():
    specs = [parse_input_spec("x:N[1..8..64]x3x224x224"), parse_input_spec("s:1")]
    argv = trtexec_command(shape_profiles(specs), precision="fp16", workspace_mib=512)
    assert argv == [
        "trtexec",
        "--onnx=model.onnx",
        "--saveEngine=model.engine",
        "--timingCacheFile=timing.cache",
        "--memPoolSize=workspace:512M",
        "--minShapes=x:1x3x224x224",
        "--optShapes=x:8x3x224x224",
        "--maxShapes=x:64x3x224x224",
        "--fp16",
        "--skipInference",
    ]
    fp32 = trtexec_command(shape_profiles([parse_input_spec("x:Nx3")]))
    assert "--noTF32" in fp32 and "--maxShapes=x:16x3" in fp32  # unbounded: default max
    assert "--int8" in trtexec_command(shape_profiles(SPECS), precision="int8")


@pytest.mark.skipif(HAVE_TRT and gpu_description() is not None, reason="builds here instead")
def test_offline_plan(tmp_path):
    """No TensorRT here: ONNX + checks + the exact trtexec command, status not built."""
    model = _net()
    ex = example_inputs(SPECS, seed=0)
    exporter = get_exporter("tensorrt")
    assert exporter.check(model, ex, SPECS) == []
    art = exporter.export(model, ex, SPECS, tmp_path)
    assert not art.built and "tensorrt is not installed" in art.not_built_reason
    assert art.path == tmp_path / "build_plan.json"
    assert set(art.files) == {"model.onnx", "build_engine.sh", "build_plan.json"}
    assert art.tool_versions["tensorrt"] is None and art.tool_versions["onnx"]
    plan = json.loads(art.path.read_text())
    assert plan["profiles"] == [
        {"input": "x", "min": [1, 3, 8, 8], "opt": [2, 3, 8, 8], "max": [4, 3, 8, 8]}
    ]
    assert plan["status"].startswith("not built here")
    script = (tmp_path / "build_engine.sh").read_text().splitlines()
    assert script[0] == "#!/bin/sh" and script[-1].startswith("exec trtexec ")
    assert shlex.split(script[-1])[1:] == plan["trtexec"]
    assert "--minShapes=x:1x3x8x8" in art.not_built_reason
    assert (tmp_path / "build_engine.sh").stat().st_mode & 0o111


def test_offline_checks_report_what_tensorrt_lacks(tmp_path):
    class Det(nn.Module):
        def forward(self, x):
            return torch.linalg.det(x)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = Det()

        def forward(self, x):
            return self.head(x * 2)

    specs = [parse_input_spec("x:2x3x3")]
    problems = get_exporter("tensorrt").check(Wrap().eval(), (torch.randn(2, 3, 3),), specs)
    assert [(p.format, p.kind, p.where) for p in problems] == [
        ("tensorrt", "unsupported-op", "head")
    ]
    assert "ONNX Det" in problems[0].message and "plugin" in problems[0].fix
    assert get_exporter("onnx").check(Wrap().eval(), (torch.randn(2, 3, 3),), specs) == []
    int8 = TensorRTExporter(precision="int8").check(_net(), example_inputs(SPECS), SPECS)
    assert [p.kind for p in int8] == ["needs-quantization"]
    with pytest.raises(ExportError, match=r"explicitly quantized graph \(QuantizeLinear"):
        TensorRTExporter(precision="int8").export(_net(), example_inputs(SPECS), SPECS, tmp_path)


def test_options_are_checked():
    with pytest.raises(ConfigError, match="choose one of fp32, fp16, int8"):
        TensorRTExporter(precision="tf32")
    with pytest.raises(ConfigError, match="workspace_mib"):
        TensorRTExporter(workspace_mib=0)
    with pytest.raises(ConfigError, match=r"0\.\.5"):
        TensorRTExporter(builder_optimization_level=7)


def test_engine_mismatch_names_both_sides():
    built = {"tensorrt": "10.3.0", "compute_capability": "8.9", "gpu": "NVIDIA L4"}
    here = {"tensorrt": "10.7.0", "compute_capability": "9.0", "gpu": "NVIDIA H100"}
    msg = engine_mismatch(built, here)
    assert "built with TensorRT 10.3.0 but this machine has TensorRT 10.7.0" in msg
    assert "compute capability 8.9 (NVIDIA L4) but this GPU has 9.0 (NVIDIA H100)" in msg
    assert engine_mismatch(built, {**built, "gpu": "other name"}) == ""
    assert engine_mismatch({}, here) == ""


@pytest.mark.skipif(HAVE_TRT, reason="tensorrt is installed here")
def test_runtime_without_tensorrt(tmp_path):
    rt = get_runtime("tensorrt")
    assert not rt.is_available() and rt.devices() == []
    assert "tensorrt is not installed" in rt.unavailable_reason()
    (tmp_path / "model.engine").write_bytes(b"\0")
    with pytest.raises(
        UnsupportedError, match="TensorRT cannot run here: tensorrt is not installed"
    ):
        rt.load(tmp_path / "model.engine")


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_TRT, reason=NO_TRT)
@pytest.mark.skipif(HAVE_TRT and gpu_description() is None, reason="no CUDA GPU visible")
def test_build_and_run_engine(tmp_path):
    model = _net()
    ex = example_inputs(SPECS, seed=0)
    rt = get_runtime("tensorrt")
    for precision, tol in (("fp32", 1e-4), ("fp16", 1e-2)):
        out = tmp_path / precision
        out.mkdir()
        art = TensorRTExporter(precision=precision).export(model, ex, SPECS, out)
        assert art.built and art.path.name == "model.engine" and (out / "timing.cache").is_file()
        info = json.loads((out / "model.engine.json").read_text())
        assert info["tensorrt"] and info["compute_capability"]
        with rt.load(art.path) as s:
            for batch in (1, 2, 4):
                x = torch.randn(batch, 3, 8, 8)
                with torch.no_grad():
                    ref = model(x).numpy()
                (got,) = s.run({"x": x.numpy()})
                assert np.abs(got - ref).max() <= tol * np.abs(ref).max()
            with pytest.raises(UnsupportedError, match="optimization profile"):
                s.run({"x": np.zeros((5, 3, 8, 8), np.float32)})
    (tmp_path / "fp32" / "model.engine.json").write_text(json.dumps({**info, "tensorrt": "1.0.0"}))
    with pytest.raises(UnsupportedError, match=r"built with TensorRT 1\.0\.0 but this machine has"):
        rt.load(tmp_path / "fp32" / "model.engine")
