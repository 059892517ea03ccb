"""The OpenVINO runtime: sessions, precision hints, options and errors."""

from __future__ import annotations

import numpy as np
import openvino as ov
import pytest

from edgerep.errors import ConfigError, UnsupportedError
from edgerep.runtimes import get_runtime
from edgerep.runtimes.openvino import precision_name


@pytest.fixture(scope="module")
def matmul_ir(tmp_path_factory):
    """y = x @ W on float32 [N, 64] (a matmul, where a lower default precision shows)."""
    from openvino import opset13 as ops

    rng = np.random.default_rng(0)
    x = ops.parameter(ov.PartialShape([ov.Dimension(1, 8), 64]), ov.Type.f32, name="x")
    w = ops.constant(rng.standard_normal((64, 32)).astype(np.float32))
    y = ops.matmul(x, w, False, False)
    y.output(0).get_tensor().set_names({"y"})
    model = ov.Model([y], [x], "mm")
    path = tmp_path_factory.mktemp("ov") / "mm.xml"
    ov.save_model(model, str(path), compress_to_fp16=False)
    return path


def test_session_and_precisions(matmul_ir):
    path = matmul_ir
    rt = get_runtime("openvino")
    assert rt.is_available() and rt.unavailable_reason() == "" and "cpu" in rt.devices()
    caps = rt.capabilities("cpu")
    assert caps["default_inference_precision"] in ("fp32", "bf16", "fp16")
    w = ov.Core().read_model(str(path)).get_ordered_ops()[1].get_data()
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    with rt.load(path, options={"inference_precision": "f32", "threads": 1}) as s:
        assert s.input_names == ["x"] and s.output_names == ["y"]
        (y,) = s.run({"x": x})
        np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-4)
        assert s.describe()["inference_precision"] == "fp32"
        assert s.describe()["requested_precision"] == "f32"
        with pytest.raises(ConfigError, match=r"expects float32, got float64"):
            s.run({"x": x.astype(np.float64)})
        with pytest.raises(ConfigError, match="missing 'x'"):
            s.run({"z": x})
    with pytest.raises(ConfigError, match="closed"):
        s.run({"x": x})
    with rt.load(path) as s:  # the device's default precision, reported as such
        assert s.describe()["inference_precision"] == caps["default_inference_precision"]
        (y,) = s.run({"x": x})
        assert np.abs(y - x @ w).max() <= 3e-2 * np.abs(x @ w).max()


def test_load_errors(matmul_ir, tmp_path):
    path = matmul_ir
    rt = get_runtime("openvino")
    with pytest.raises(ConfigError, match=r"unknown OpenVINO option 'thread'; did you mean"):
        rt.load(path, options={"thread": 1})
    with pytest.raises(ConfigError, match="unknown inference_precision 'fp32'"):
        rt.load(path, options={"inference_precision": "fp32"})
    with pytest.raises(ConfigError, match="performance_hint"):
        rt.load(path, options={"performance_hint": "fast"})
    with pytest.raises(UnsupportedError, match="no device 'tpu'"):
        rt.load(path, device="tpu")
    with pytest.raises(ConfigError, match="does not exist"):
        rt.load(tmp_path / "missing.xml")
    (tmp_path / "bad.xml").write_text("<net/>")
    with pytest.raises(UnsupportedError, match="cannot compile"):
        rt.load(tmp_path / "bad.xml")


def test_precision_names():
    assert [precision_name(p) for p in ("f32", "f16", "bf16", "i8")] == [
        "fp32",
        "fp16",
        "bf16",
        "i8",
    ]


def test_static_shape_streams_timer_and_output_order(matmul_ir, tmp_path):
    from openvino import opset13 as ops

    rt = get_runtime("openvino")
    w = ov.Core().read_model(str(matmul_ir)).get_ordered_ops()[1].get_data()
    x = np.random.default_rng(2).standard_normal((2, 64)).astype(np.float32)
    opts = {"inference_precision": "f32", "threads": 2, "num_streams": 2, "shape": {"x": [2, 64]}}
    with rt.load(matmul_ir, options=opts) as s:
        assert s.describe()["num_streams"] == 2
        assert s.runtime_ms() is not None
        (y,) = s.run({"x": x})
        np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-4)
        assert 0 < s.runtime_ms() < 1000  # OpenVINO's own timer of that call, in ms
        with pytest.raises(RuntimeError):  # compiled for [2, 64] only
            s.run({"x": np.zeros((3, 64), np.float32)})
        assert s.device_memory_bytes() is None  # CPU
    with pytest.raises(ConfigError, match="num_streams"):
        rt.load(matmul_ir, options={"num_streams": 0})
    # several outputs come back in the compiled model's order, each a fresh copy
    p = ops.parameter(ov.PartialShape([-1, 3]), ov.Type.f32, name="a")
    first = ops.multiply(p, ops.constant(np.float32(2)))
    second = ops.add(p, ops.constant(np.float32(1)))
    first.output(0).get_tensor().set_names({"double"})
    second.output(0).get_tensor().set_names({"plus_one"})
    path = tmp_path / "two.xml"
    ov.save_model(ov.Model([first, second], [p], "two"), str(path), compress_to_fp16=False)
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    with rt.load(path, options={"inference_precision": "f32"}) as s:
        assert s.output_names == ["double", "plus_one"]
        d, e = s.run({"a": a})
        np.testing.assert_array_equal(d, 2 * a)
        np.testing.assert_array_equal(e, a + 1)
        s.run({"a": a[:1] * 0})  # a new shape: the request's tensors change
        np.testing.assert_array_equal(d, 2 * a)
        big = np.ones((6000, 3), np.float32)  # above the zero-copy threshold
        np.testing.assert_array_equal(s.run({"a": big})[1], big + 1)
        np.testing.assert_array_equal(s.run({"a": a})[0], 2 * a)
