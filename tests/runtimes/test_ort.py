"""Runtimes: registry, onnxruntime sessions, torch eager sessions."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from edgerep.errors import ConfigError, UnsupportedError
from edgerep.runtimes import _REGISTRY, available_runtimes, get_runtime, register_runtime
from edgerep.runtimes.ort import OrtRuntime
from edgerep.runtimes.torch_eager import TorchEagerRuntime, TorchEagerSession

# every registered runtime has a test that runs a model through it ("module::test" or a
# test of this module); Core ML and TensorRT's skip where they cannot run, saying why
RUN_TESTS = {
    "onnxruntime": "test_ort_session",
    "torch": "test_torch_eager_pt2",
    "openvino": "tests.runtimes.test_openvino::test_session_and_precisions",
    "executorch": "tests.runtimes.test_executorch::test_session",
    "coreml": "tests.exporters.test_coreml::test_predict_on_macos",
    "tensorrt": "tests.exporters.test_tensorrt::test_build_and_run_engine",
    "coreml-reference": "tests.runtimes.test_coreml_reference::test_fp32_programs_match_torch",
}


def _test_named(ref: str) -> object:
    import importlib

    module, sep, name = ref.partition("::")
    if not sep:
        return globals().get(ref)
    return getattr(importlib.import_module(module), name, None)


@pytest.fixture
def add_one(tmp_path):
    """y = x + 1 on float32 [N, 3]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    graph = helper.make_graph([helper.make_node("Add", ["x", "one"], ["y"])], "g", [x], [y], [one])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "add.onnx"
    onnx.save(model, str(path))
    return path


def test_registry(monkeypatch):
    assert {"onnxruntime", "torch"} <= set(available_runtimes())
    assert get_runtime("onnxruntime") is get_runtime("onnxruntime")
    with pytest.raises(
        ConfigError, match=r"unknown runtime 'onnxruntim'; did you mean 'onnxruntime'"
    ):
        get_runtime("onnxruntim")
    with pytest.raises(ConfigError, match="already registered"):
        register_runtime(OrtRuntime())
    monkeypatch.setattr("edgerep.runtimes._REGISTRY", dict(_REGISTRY))

    class Other(OrtRuntime):
        name = "other"

    register_runtime(Other())
    assert get_runtime("other").name == "other"


def test_every_runtime_has_a_run_test():
    missing = [r for r in available_runtimes() if r not in RUN_TESTS]
    assert not missing, f"runtimes without a test: {missing}"
    for ref in RUN_TESTS.values():
        assert callable(_test_named(ref)), ref


def test_ort_session(add_one):
    rt = get_runtime("onnxruntime")
    assert rt.is_available() and "cpu" in rt.devices()
    assert rt.capabilities("cpu")["provider"] == "CPUExecutionProvider"
    with rt.load(add_one, options={"threads": 1, "optimization": "basic"}) as s:
        assert s.input_names == ["x"] and s.output_names == ["y"]
        assert s.providers == ["CPUExecutionProvider"]
        assert s.describe()["providers"] == ["CPUExecutionProvider"]
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        (y,) = s.run({"x": x})
        np.testing.assert_array_equal(y, x + 1)
        with pytest.raises(ConfigError, match=r"missing 'x'.*unexpected 'z'"):
            s.run({"z": x})
        with pytest.raises(ConfigError, match=r"expects float32, got float64"):
            s.run({"x": x.astype(np.float64)})
    with pytest.raises(ConfigError, match="closed"):
        s.run({"x": x})


def test_ort_load_errors(add_one, tmp_path):
    rt = get_runtime("onnxruntime")
    with pytest.raises(
        ConfigError, match=r"unknown onnxruntime option 'thread'; did you mean 'threads'"
    ):
        rt.load(add_one, options={"thread": 2})
    with pytest.raises(ConfigError, match="optimization level"):
        rt.load(add_one, options={"optimization": "max"})
    with pytest.raises(UnsupportedError, match="no provider for device 'tpu'"):
        rt.load(add_one, device="tpu")
    with pytest.raises(ConfigError, match="does not exist"):
        rt.load(tmp_path / "missing.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"garbage")
    with pytest.raises(UnsupportedError, match="cannot load"):
        rt.load(tmp_path / "bad.onnx")


def test_torch_eager_session_flattens_outputs():
    class Two(torch.nn.Module):
        def forward(self, a, b):
            return {"sum": a + b, "prod": (a * b, a - b)}

    s = TorchEagerSession(Two(), ["a", "b"])
    a = np.ones((2, 2), np.float32)
    outs = s.run({"a": a, "b": 2 * a})
    assert len(outs) == 3 and s.output_names == ["output_0", "output_1", "output_2"]
    np.testing.assert_array_equal(outs[0], 3 * a)
    with pytest.raises(ConfigError, match="missing 'b'"):
        s.run({"a": a})
    s.close()
    with pytest.raises(ConfigError, match="closed"):
        s.run({"a": a, "b": a})


def test_torch_eager_pt2(tmp_path):
    model = torch.nn.Linear(3, 2).eval()
    program = torch.export.export(model, (torch.randn(2, 3),))
    torch.export.save(program, str(tmp_path / "m.pt2"))
    rt = TorchEagerRuntime()
    with rt.load(tmp_path / "m.pt2") as s:
        x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
        (y,) = s.run({s.input_names[0]: x})
        np.testing.assert_allclose(y, model(torch.from_numpy(x)).detach().numpy(), rtol=1e-6)
        assert s.describe()["runtime"] == "torch"
    with pytest.raises(ConfigError, match="no options"):
        rt.load(tmp_path / "m.pt2", options={"threads": 1})
    with pytest.raises(UnsupportedError):
        rt.load(tmp_path / "m.pt2", device="tpu")
