"""TensorRT int8/fp16: Q/DQ checks and the Q/DQ recipe everywhere; engine builds with TensorRT."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgerep.errors import ConfigError
from edgerep.quantize import (
    OrtQuantConfig,
    TensorRTQuantConfig,
    build_tensorrt_engine,
    prepare_tensorrt_int8,
    quantize_onnx,
    tensorrt_qdq_problems,
)
from edgerep.quantize._metrics import sqnr_db
from edgerep.quantize._tensorrt import calibration_batches
from edgerep.spec import parse_input_spec, shape_profiles
from tests.quantize._digits import calib_feeds, export_onnx, trained_digits

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
NO_TRT = "tensorrt is not installed here (its wheels need NVIDIA's index and a GPU machine)"
SPECS = [parse_input_spec("x:N[1..4..8]x1x8x8")]


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"x": x})[0])


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict:
    model, x_tr, x_te, y_te = trained_digits()
    folder = tmp_path_factory.mktemp("trt")
    path = export_onnx(model, folder / "fp32.onnx")
    return {"x_tr": x_tr, "x_te": x_te.numpy(), "y_te": y_te.numpy(), "path": path, "dir": folder}


def _kinds(problems: list) -> set[str]:
    return {p.kind for p in problems}


def test_onnxruntime_defaults_are_reported(digits: dict) -> None:
    feeds = calib_feeds(digits["x_tr"], 64)
    u8 = quantize_onnx(digits["path"], digits["dir"] / "u8.onnx", OrtQuantConfig(), calib=feeds)
    problems = tensorrt_qdq_problems(u8.path)
    # uint8 asymmetric activations and int32 biases: all three are reported at once
    assert {"qdq-uint8", "qdq-zero-point", "qdq-int32-bias"} <= _kinds(problems)
    uint8 = [p for p in problems if p.kind == "qdq-uint8"]
    assert any("x_QuantizeLinear" in p.where for p in uint8)
    assert any("x_DequantizeLinear" in p.where for p in uint8)
    assert all("S8S8" in p.fix for p in uint8)
    s8 = quantize_onnx(
        digits["path"], digits["dir"] / "s8.onnx", OrtQuantConfig(types="S8S8"), calib=feeds
    )
    kinds = _kinds(tensorrt_qdq_problems(s8.path))
    assert "qdq-uint8" not in kinds and {"qdq-zero-point", "qdq-int32-bias"} <= kinds
    assert _kinds(tensorrt_qdq_problems(digits["path"])) == {"needs-quantization"}


def test_tensorrt_recipe_is_clean_and_accurate(digits: dict) -> None:
    art = prepare_tensorrt_int8(
        digits["path"], digits["dir"] / "trt.onnx", calib=calib_feeds(digits["x_tr"], 128)
    )
    assert tensorrt_qdq_problems(art.path) == []
    assert art.config.types == "S8S8" and art.calib_samples == 128
    proto = onnx.load(str(art.path))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == 3  # the inputs of conv, conv and gemm
    zero_points = [
        numpy_helper.to_array(t) for t in proto.graph.initializer if "zero_point" in t.name
    ]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    ref, got = _run(digits["path"], digits["x_te"]), _run(art.path, digits["x_te"])
    assert sqnr_db(ref, got) > 20.0  # measured 47.6 dB (onnxruntime CPU)
    top1_fp32 = float((ref.argmax(1) == digits["y_te"]).mean())
    top1_q = float((got.argmax(1) == digits["y_te"]).mean())
    assert top1_fp32 - top1_q <= 0.01 + 1e-12


def _qdq_model(*, act_scale_shape: tuple[int, ...], weight_axis: int, op: str) -> onnx.ModelProto:
    """x -> Q/DQ (activation) -> op with a per-channel DQ int8 weight."""
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, size=(4, 3, 1, 1) if op == "Conv" else (3, 4)).astype(np.int8)
    channels = w.shape[weight_axis]
    inits = [
        numpy_helper.from_array(np.full(act_scale_shape, 0.1, np.float32), "xs"),
        numpy_helper.from_array(np.zeros(act_scale_shape, np.int8), "xz"),
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.full(channels, 0.01, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(channels, np.int8), "wz"),
    ]
    act_axis = [helper.make_attribute("axis", 1)] if act_scale_shape else []
    q = helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q_x")
    dq = helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq_x")
    q.attribute.extend(act_axis)
    dq.attribute.extend(act_axis)
    dqw = helper.make_node(
        "DequantizeLinear", ["w", "ws", "wz"], ["wd"], name="dq_w", axis=weight_axis
    )
    shape = [1, 3, 2, 2] if op == "Conv" else [2, 3]
    out = helper.make_node(op, ["xd", "wd"], ["y"], name="op")
    graph = helper.make_graph(
        [q, dq, dqw, out],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_per_channel_rules() -> None:
    good_conv = _qdq_model(act_scale_shape=(), weight_axis=0, op="Conv")
    assert tensorrt_qdq_problems(good_conv) == []
    good_matmul = _qdq_model(act_scale_shape=(), weight_axis=1, op="MatMul")
    assert tensorrt_qdq_problems(good_matmul) == []
    wrong_axis = tensorrt_qdq_problems(_qdq_model(act_scale_shape=(), weight_axis=1, op="Conv"))
    assert [(p.kind, p.where) for p in wrong_axis] == [("qdq-per-channel-axis", "dq_w")]
    assert "output-channel axis 0" in wrong_axis[0].message
    per_channel_act = tensorrt_qdq_problems(
        _qdq_model(act_scale_shape=(3,), weight_axis=0, op="Conv")
    )
    assert _kinds(per_channel_act) == {"qdq-per-channel-activation"}
    assert {p.where for p in per_channel_act} == {"dq_x", "q_x"}


def test_calibration_batches_fill_the_opt_shape() -> None:
    profiles = shape_profiles(SPECS)  # opt batch 4
    feeds = [{"x": np.full((1, 1, 8, 8), i, np.float32)} for i in range(9)]
    batches = calibration_batches(feeds, profiles)
    assert [b["x"].shape for b in batches] == [(4, 1, 8, 8)] * 2  # the ninth is dropped
    np.testing.assert_array_equal(batches[1]["x"][:, 0, 0, 0], [4, 5, 6, 7])
    two = [{"x": np.zeros((2, 1, 8, 8), np.float32)}] * 2
    assert [b["x"].shape[0] for b in calibration_batches(two, profiles)] == [4]
    with pytest.raises(ConfigError, match="opt shape"):
        calibration_batches([{"x": np.zeros((1, 1, 9, 9), np.float32)}], profiles)
    with pytest.raises(ConfigError, match="lacks inputs"):
        calibration_batches([{"y": np.zeros((1, 1, 8, 8), np.float32)}], profiles)


def test_build_checks_run_before_tensorrt(digits: dict, tmp_path: Path) -> None:
    """Misuse is a ConfigError with or without TensorRT; a clean request needs TensorRT."""
    with pytest.raises(ConfigError, match="cannot be built as explicit int8"):
        build_tensorrt_engine(digits["path"], tmp_path, SPECS)  # float model, explicit int8
    feeds = calib_feeds(digits["x_tr"], 16)
    qdq = prepare_tensorrt_int8(digits["path"], tmp_path / "qdq.onnx", calib=feeds).path
    with pytest.raises(ConfigError, match="has Q/DQ nodes"):
        build_tensorrt_engine(qdq, tmp_path, SPECS, TensorRTQuantConfig(precision="fp16"))
    with pytest.raises(ConfigError, match="calibration feeds"):
        build_tensorrt_engine(
            digits["path"], tmp_path, SPECS, TensorRTQuantConfig(int8_mode="implicit")
        )
    if not HAVE_TRT:
        from edgerep.errors import MissingDependencyError

        with pytest.raises(MissingDependencyError, match="edgerep\\[tensorrt\\]"):
            build_tensorrt_engine(qdq, tmp_path / "engine", SPECS)


def test_config_validation_and_json_round_trip() -> None:
    config = TensorRTQuantConfig(int8_mode="explicit", strongly_typed=True, calibration="entropy")
    assert TensorRTQuantConfig.from_dict(config.to_dict()) == config
    assert config.name == "int8-explicit" and TensorRTQuantConfig(precision="fp16").name == "fp16"
    with pytest.raises(ConfigError) as err:
        TensorRTQuantConfig(precision="int4", int8_mode="implict", workspace_mib=0)
    msg = str(err.value)
    assert "'int4'" in msg and "did you mean 'implicit'" in msg and "workspace_mib" in msg
    with pytest.raises(ConfigError, match="strongly_typed applies to explicit int8"):
        TensorRTQuantConfig(precision="fp16", strongly_typed=True)


# --- builds: only with TensorRT and a GPU ---------------------------------------------------


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_TRT, reason=NO_TRT)
@pytest.mark.parametrize("mode", ["fp16", "int8-explicit", "int8-implicit"])
def test_engine_builds_and_runs(digits: dict, tmp_path: Path, mode: str) -> None:
    from edgerep.exporters.tensorrt import gpu_description
    from edgerep.runtimes import get_runtime

    if gpu_description() is None:
        pytest.skip("TensorRT builds need a CUDA GPU and none is visible")
    feeds = calib_feeds(digits["x_tr"], 128)
    onnx_path = digits["path"]
    if mode == "fp16":
        config = TensorRTQuantConfig(precision="fp16")
    elif mode == "int8-explicit":
        config = TensorRTQuantConfig()
        onnx_path = prepare_tensorrt_int8(onnx_path, tmp_path / "qdq.onnx", calib=feeds).path
    else:
        config = TensorRTQuantConfig(int8_mode="implicit")
    art = build_tensorrt_engine(onnx_path, tmp_path / "engine", SPECS, config, calib=feeds)
    if mode == "int8-implicit":
        assert (tmp_path / "engine" / "calibration.cache").stat().st_size > 0
    x = digits["x_te"][:8]
    ref = _run(digits["path"], x)
    with get_runtime("tensorrt").load(art.path, device="cuda:0") as s:
        (got,) = s.run({"x": x})
    assert sqnr_db(ref, got) > (40.0 if mode == "fp16" else 20.0)
