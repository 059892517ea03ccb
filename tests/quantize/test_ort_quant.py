"""onnxruntime quantization: SQNR and held-out top-1 on a net trained on digits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edgerep.errors import ConfigError
from edgerep.fold import fold
from edgerep.quantize import OrtQuantConfig, equalize, quantize_onnx
from edgerep.quantize._metrics import sqnr_db
from edgerep.zoo import accuracy, demo_net, randomize_
from tests.quantize._digits import calib_feeds, export_onnx, trained_digits


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"x": x})[0])


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict:
    model, x_tr, x_te, y_te = trained_digits()
    path = export_onnx(model, tmp_path_factory.mktemp("digits") / "fp32.onnx")
    return {"model": model, "x_tr": x_tr, "x_te": x_te, "y_te": y_te, "path": path}


@pytest.mark.parametrize(
    ("config", "min_sqnr_db", "ops"),
    [
        (OrtQuantConfig(types="U8S8"), 20.0, {"QuantizeLinear", "DequantizeLinear"}),
        (OrtQuantConfig(types="S8S8", per_channel=False), 20.0, {"QuantizeLinear"}),
        (OrtQuantConfig(calibration="percentile"), 20.0, {"QuantizeLinear"}),
        (OrtQuantConfig(mode="int8-dynamic"), 20.0, {"DynamicQuantizeLinear"}),
        (OrtQuantConfig(mode="fp16"), 50.0, {"Cast"}),
    ],
    ids=lambda v: v.name if isinstance(v, OrtQuantConfig) else None,
)
def test_quantized_digits_sqnr_and_top1(
    digits: dict, tmp_path: Path, config: OrtQuantConfig, min_sqnr_db: float, ops: set[str]
) -> None:
    x_te = digits["x_te"].numpy()
    art = quantize_onnx(
        digits["path"], tmp_path / "q.onnx", config, calib=calib_feeds(digits["x_tr"])
    )
    assert art.path.exists() and not list(tmp_path.glob("tmp*"))
    assert ops <= {n.op_type for n in onnx.load(str(art.path)).graph.node}
    ref, out = _run(digits["path"], x_te), _run(art.path, x_te)
    assert sqnr_db(ref, out) > min_sqnr_db
    top1_fp32 = accuracy(digits["model"], digits["x_te"], digits["y_te"])
    assert top1_fp32 > 0.9  # the model really learned something
    top1_q = float((out.argmax(1) == digits["y_te"].numpy()).mean())
    assert top1_fp32 - top1_q <= 0.01 + 1e-12, (top1_fp32, top1_q)


def test_static_without_calibration_is_a_config_error(digits: dict, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="calibration feeds"):
        quantize_onnx(digits["path"], tmp_path / "q.onnx")


def test_config_reports_every_problem_with_suggestions() -> None:
    with pytest.raises(ConfigError) as err:
        OrtQuantConfig(mode="int9", types="U8U8", calibration="minmx")
    msg = str(err.value)
    assert "'int9'" in msg and "did you mean 'int8'" in msg and "'minmax'" in msg
    assert "'U8U8'" in msg
    with pytest.raises(ConfigError, match="int8-dynamic"):
        OrtQuantConfig(mode="int8-dynamic", types="S8S8")


def _folded_demo_net(spread: float) -> torch.nn.Module:
    """A folded RepVGG-style zoo net; ``spread`` > 0 makes channel ranges unequal."""
    net = randomize_(demo_net(), seed=0).eval()
    folded, _ = fold(net, (torch.zeros(1, 1, 16, 16),))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in folded.modules():
            if isinstance(m, torch.nn.Conv2d):
                scale = torch.exp(spread * torch.randn(m.weight.shape[0], generator=gen))
                m.weight.mul_(scale.reshape(-1, 1, 1, 1))
    return folded


def _export_16(model: torch.nn.Module, path: Path) -> Path:
    torch.onnx.export(
        model,
        (torch.zeros(1, 1, 16, 16),),
        str(path),
        dynamo=False,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
    )
    return path


def test_zoo_net_sqnr_and_equalization_gain(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal((1, 1, 16, 16)).astype(np.float32)} for _ in range(32)]
    x = rng.standard_normal((64, 1, 16, 16)).astype(np.float32)
    per_tensor = OrtQuantConfig(types="U8S8", per_channel=False)

    def sqnr(model: torch.nn.Module, config: OrtQuantConfig, tag: str) -> float:
        fp32 = _export_16(model, tmp_path / f"{tag}.onnx")
        art = quantize_onnx(fp32, tmp_path / f"{tag}-q.onnx", config, calib=calib)
        return sqnr_db(_run(fp32, x), _run(art.path, x))

    assert sqnr(_folded_demo_net(0.0), OrtQuantConfig(), "balanced") > 20.0
    imbalanced = _folded_demo_net(2.0)
    plain = sqnr(imbalanced, per_tensor, "plain")
    equalized = sqnr(equalize(imbalanced)[0], per_tensor, "cle")
    # measured 5.8 dB -> 17.8 dB: equalization repairs per-tensor int8 on unequal channels
    assert equalized > plain + 6.0, (plain, equalized)


def test_config_json_round_trip() -> None:
    config = OrtQuantConfig(types="S8S8", per_channel=False, calibration="entropy")
    assert OrtQuantConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="did you mean 'per_channel'"):
        OrtQuantConfig.from_dict({"per_chanel": True})


def test_importing_quantize_loads_no_onnxruntime() -> None:
    import subprocess
    import sys

    code = "import sys, edgerep.quantize; print('onnxruntime' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_missing_model_and_overwriting_the_input_are_refused(tmp_path):
    from edgerep.errors import ConfigError
    from edgerep.quantize import OrtQuantConfig, quantize_onnx

    config = OrtQuantConfig(mode="int8-dynamic")
    with pytest.raises(ConfigError, match="does not exist"):
        quantize_onnx(tmp_path / "nope.onnx", tmp_path / "q.onnx", config)
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not read")
    with pytest.raises(ConfigError, match="is the input model"):
        quantize_onnx(model, model, config)
    assert model.read_bytes() == b"not read"


def test_node_selection_config_round_trip_and_old_versions() -> None:
    config = OrtQuantConfig(
        nodes_to_exclude=["/2/Conv"],  # type: ignore[arg-type]  # a list (JSON) becomes a tuple
        op_types_to_quantize=("Conv", "Gemm"),
    )
    assert config.nodes_to_exclude == ("/2/Conv",) and hash(config)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["version"] == 2 and data["nodes_to_exclude"] == ["/2/Conv"]
    assert OrtQuantConfig.from_dict(data) == config
    # a version-1 dictionary (written before node selection existed) still loads
    old = {"mode": "int8", "types": "S8S8", "per_channel": False, "calibration": "minmax"}
    loaded = OrtQuantConfig.from_dict({**old, "max_calib_samples": 64, "version": 1})
    assert loaded == OrtQuantConfig(types="S8S8", per_channel=False, max_calib_samples=64)
    assert OrtQuantConfig.from_dict(old).version == 2
    with pytest.raises(ConfigError, match="unknown keys"):
        OrtQuantConfig.from_dict({**old, "version": 1, "nodes_to_exclude": []})
    with pytest.raises(ConfigError, match="version 3"):
        OrtQuantConfig.from_dict({**old, "version": 3})
    # names stay the same without a selection and differ between selections
    assert OrtQuantConfig().name == "int8-U8S8-pc"
    names = {
        OrtQuantConfig(nodes_to_exclude=("/0/Conv",)).name,
        OrtQuantConfig(nodes_to_exclude=("/2/Conv",)).name,
        OrtQuantConfig(nodes_to_quantize=("/2/Conv",)).name,
    }
    assert len(names) == 3 and all(n.startswith("int8-U8S8-pc-") for n in names)


def test_node_selection_problems_are_reported_together() -> None:
    with pytest.raises(ConfigError) as err:
        OrtQuantConfig(
            nodes_to_quantize=("/0/Conv", "/0/Conv"),
            nodes_to_exclude=("/0/Conv",),
            op_types_to_quantize="Conv",  # type: ignore[arg-type]
        )
    msg = str(err.value)
    assert "more than once" in msg and "both in" in msg and "list of names" in msg
    with pytest.raises(ConfigError, match="leave it out"):
        OrtQuantConfig(version=1)


@pytest.mark.parametrize("mode", ["int8", "int8-dynamic", "fp16"])
def test_excluded_node_stays_float_in_every_mode(digits: dict, tmp_path: Path, mode: str) -> None:
    config = OrtQuantConfig(mode=mode, nodes_to_exclude=("/2/Conv",))
    art = quantize_onnx(
        digits["path"], tmp_path / "q.onnx", config, calib=calib_feeds(digits["x_tr"], 32)
    )
    model = onnx.load(str(art.path))
    inits = {i.name: i.data_type for i in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    excluded = by_name["/2/Conv"]
    assert excluded.op_type == "Conv" and inits[excluded.input[1]] == onnx.TensorProto.FLOAT
    if mode == "int8":  # the first conv reads int8 weights through DequantizeLinear
        dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        assert by_name["/0/Conv"].input[1] in dq
    elif mode == "int8-dynamic":  # onnxruntime renames the quantized conv
        assert "/0/Conv" not in by_name and "ConvInteger" in {n.op_type for n in model.graph.node}
    else:
        assert inits[by_name["/0/Conv"].input[1]] == onnx.TensorProto.FLOAT16
    ref, out = _run(digits["path"], digits["x_te"].numpy()), _run(art.path, digits["x_te"].numpy())
    assert sqnr_db(ref, out) > 20.0


def test_unknown_op_type_and_calibration_cache_reuse(digits: dict, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'Conv'"):
        quantize_onnx(
            digits["path"],
            tmp_path / "q.onnx",
            OrtQuantConfig(op_types_to_quantize=("Cnv",)),
            calib=calib_feeds(digits["x_tr"], 8),
        )
    cache = tmp_path / "ranges.json"
    calib = calib_feeds(digits["x_tr"], 64)
    first = quantize_onnx(digits["path"], tmp_path / "a.onnx", calib=calib, calibration_cache=cache)
    assert cache.is_file() and first.calib_samples == 64
    # the cache alone (no feeds) reproduces the same ranges, hence the same model
    again = quantize_onnx(digits["path"], tmp_path / "b.onnx", calibration_cache=cache)
    x = digits["x_te"].numpy()
    np.testing.assert_array_equal(_run(first.path, x), _run(again.path, x))
