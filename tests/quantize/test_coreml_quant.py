"""Core ML compression with coremltools' engines: ops and sizes here, accuracy off macOS
from the decompressed weights, predictions only on macOS."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgerep.errors import ConfigError, UnsupportedError
from edgerep.quantize import CoreMLQuantConfig, CoreMLWeightQuant, dense_weights, quantize_coreml
from edgerep.quantize._coreml import _torch_ptq
from edgerep.quantize._metrics import sqnr_db
from edgerep.runtimes import get_runtime
from edgerep.spec import example_inputs, parse_input_spec
from tests.quantize._digits import calib_feeds, trained_digits

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("coremltools") is None,
    reason="coremltools is not installed (pip install 'edgerep[coreml]')",
)

SPECS = [parse_input_spec("x:N[1..1..8]x1x8x8")]
ON_MAC = sys.platform == "darwin"
NOT_MAC = "Core ML predicts only on macOS; coremltools converts on Linux but cannot run models"
ALL = 0  # weight_threshold: compress every weight of the tiny net


@pytest.fixture(scope="module")
def digits() -> dict:
    model, x_tr, x_te, y_te = trained_digits()
    with torch.no_grad():
        ref = model(x_te).numpy()
    return {"model": model, "x_tr": x_tr, "x_te": x_te, "y_te": y_te, "ref": ref}


def _with_package_weights(model: torch.nn.Module, package: Path) -> torch.nn.Module:
    """A copy of `model` computing with the package's decompressed weights (what Core ML
    computes with at fp32), matched through torch.export's ``p_<param>`` const names."""
    clone = copy.deepcopy(model)
    keys = {k.replace(".", "_"): k for k in clone.state_dict()}
    dense = {}
    for name, value in dense_weights(package).items():
        key = name.removeprefix("p_").removesuffix("_quantized").removesuffix("_palettized")
        if key in keys:
            dense[keys[key]] = torch.from_numpy(value.copy())
    assert set(dense) == set(keys.values()), sorted(dense)
    clone.load_state_dict(dense)
    return clone


@pytest.mark.parametrize(
    ("config", "ops", "min_sqnr_db"),
    [
        (  # int8 per channel; from iOS18 coremltools writes the blockwise op for it
            CoreMLQuantConfig(weights=CoreMLWeightQuant(weight_threshold=ALL)),
            {"constexpr_blockwise_shift_scale": 3},
            40.0,  # measured 56.7 dB
        ),
        (  # iOS17 has the older affine op
            CoreMLQuantConfig(
                weights=CoreMLWeightQuant(weight_threshold=ALL), minimum_deployment_target="iOS17"
            ),
            {"constexpr_affine_dequantize": 3},
            40.0,
        ),
        (  # int4 per block (input channels of the 16-channel conv and the linear layer)
            CoreMLQuantConfig(
                weights=CoreMLWeightQuant(
                    nbits=4, granularity="per_block", block_size=16, weight_threshold=ALL
                )
            ),
            {"constexpr_blockwise_shift_scale": 2},
            25.0,  # measured 31.8 dB
        ),
        (  # 4-bit k-means palettes
            CoreMLQuantConfig(
                weights=CoreMLWeightQuant(method="palettize", nbits=4, weight_threshold=ALL)
            ),
            {"constexpr_lut_to_dense": 3},
            25.0,  # measured 31.1 dB
        ),
        (  # precedence: global palettes, linear ops int8, the first conv kept float by name
            CoreMLQuantConfig(
                weights=CoreMLWeightQuant(
                    method="palettize",
                    nbits=4,
                    granularity="per_grouped_channel",
                    group_size=8,
                    weight_threshold=ALL,
                ),
                op_type={"linear": CoreMLWeightQuant(weight_threshold=ALL)},
                op_name={"conv2d": CoreMLWeightQuant(method="none")},
            ),
            {"constexpr_lut_to_dense": 1, "constexpr_blockwise_shift_scale": 1},
            25.0,
        ),
    ],
    ids=["w8-ios18", "w8-ios17", "w4-block", "p4", "mixed"],
)
def test_weight_compression_ops_size_and_accuracy(
    digits: dict, tmp_path: Path, config: CoreMLQuantConfig, ops: dict, min_sqnr_db: float
) -> None:
    model = digits["model"]
    art = quantize_coreml(model, example_inputs(SPECS, seed=0), SPECS, tmp_path, config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.mlpackage"]
    op_types = art.metadata["op_types"]
    constexpr = {k: v for k, v in op_types.items() if k.startswith("constexpr_")}
    assert constexpr == ops
    q = art.metadata["quantization"]
    assert q["size_bytes"] < 0.6 * q["float_size_bytes"], q
    out = _with_package_weights(model, art.path)(digits["x_te"]).detach().numpy()
    assert sqnr_db(digits["ref"], out) > min_sqnr_db
    top1_fp32 = float((digits["ref"].argmax(1) == digits["y_te"].numpy()).mean())
    top1_q = float((out.argmax(1) == digits["y_te"].numpy()).mean())
    assert top1_fp32 - top1_q <= 0.01 + 1e-12, (top1_fp32, top1_q)


def test_w8a8_through_coremltools_optimize_torch(digits: dict, tmp_path: Path) -> None:
    """Activations calibrated in PyTorch (any OS); the program gets quantize/dequantize ops."""
    model, feeds = digits["model"], calib_feeds(digits["x_tr"], 128)
    config = CoreMLQuantConfig(activations="int8")
    art = quantize_coreml(
        model, example_inputs(SPECS, seed=0), SPECS, tmp_path, config, calib=feeds
    )
    ops = art.metadata["op_types"]
    assert ops["quantize"] >= 3 and ops["dequantize"] >= 3  # the inputs of conv, conv, linear
    assert ops["constexpr_blockwise_shift_scale"] == 3  # int8 weights
    assert art.precision == "w8a8" and art.metadata["quantization"]["calib_samples"] == 128
    # the calibrated fake-quant model is what the package encodes; check its accuracy
    args = [(torch.from_numpy(f["x"]),) for f in feeds]
    fq = _torch_ptq(model, example_inputs(SPECS, seed=0), args, config)
    with torch.no_grad():
        out = fq(digits["x_te"]).numpy()
    assert sqnr_db(digits["ref"], out) > 15.0
    top1_fp32 = float((digits["ref"].argmax(1) == digits["y_te"].numpy()).mean())
    top1_q = float((out.argmax(1) == digits["y_te"].numpy()).mean())
    assert top1_fp32 - top1_q <= 0.01 + 1e-12, (top1_fp32, top1_q)


def test_coreml_activation_route_needs_macos(digits: dict, tmp_path: Path) -> None:
    if ON_MAC:
        pytest.skip("this test checks the error given off macOS")
    config = CoreMLQuantConfig(activations="int8", activation_route="coreml")
    with pytest.raises(UnsupportedError, match=r"only on macOS.*activation_route='torch'"):
        quantize_coreml(
            digits["model"], example_inputs(SPECS, seed=0), SPECS, tmp_path, config, calib=[]
        )
    assert list(tmp_path.iterdir()) == []


def test_checks_before_work(digits: dict, tmp_path: Path) -> None:
    model, ex = digits["model"], example_inputs(SPECS, seed=0)
    old = CoreMLQuantConfig(
        weights=CoreMLWeightQuant(nbits=4, granularity="per_block"),
        op_type={"conv": CoreMLWeightQuant(method="palettize", granularity="per_grouped_channel")},
        minimum_deployment_target="iOS17",
    )
    with pytest.raises(ConfigError) as err:
        quantize_coreml(model, ex, SPECS, tmp_path, old)
    assert "global (linear 4-bit per_block)" in str(err.value)
    assert "op_type 'conv'" in str(err.value) and "iOS18" in str(err.value)
    with pytest.raises(ConfigError, match="calibration feeds"):
        quantize_coreml(model, ex, SPECS, tmp_path, CoreMLQuantConfig(activations="int8"))
    assert list(tmp_path.iterdir()) == []


def test_config_validation_and_json_round_trip() -> None:
    config = CoreMLQuantConfig(
        weights=CoreMLWeightQuant(method="palettize", nbits=6),
        op_type={"linear": CoreMLWeightQuant(nbits=4, granularity="per_block")},
        op_name={"conv2d": CoreMLWeightQuant(method="none")},
        compute_precision="fp16",
    )
    assert CoreMLQuantConfig.from_dict(config.to_dict()) == config
    assert config.name == "p6-mixed"
    with pytest.raises(TypeError):
        config.op_type["conv"] = CoreMLWeightQuant()  # type: ignore[index]
    with pytest.raises(ConfigError) as err:
        CoreMLWeightQuant(method="palettize", nbits=5, granularity="per_block")
    assert "nbits" in str(err.value) and "'per_block'" in str(err.value)
    with pytest.raises(ConfigError, match="did you mean 'linear'"):
        CoreMLWeightQuant(method="lineer")
    with pytest.raises(ConfigError, match="quantizes the weights itself"):
        CoreMLQuantConfig(activations="int8", weights=CoreMLWeightQuant(nbits=4))
    with pytest.raises(ConfigError, match="did you mean 'op_name'"):
        CoreMLQuantConfig.from_dict({"op_names": {}})


@pytest.mark.coreml_predict
@pytest.mark.skipif(not ON_MAC, reason=NOT_MAC)
def test_predict_on_macos(digits: dict, tmp_path: Path) -> None:
    config = CoreMLQuantConfig(weights=CoreMLWeightQuant(weight_threshold=ALL))
    art = quantize_coreml(digits["model"], example_inputs(SPECS, seed=0), SPECS, tmp_path, config)
    x_te = digits["x_te"].numpy()
    with get_runtime("coreml").load(art.path, device="cpu") as s:
        got = np.concatenate([s.run({"x": x_te[i : i + 8]})[0] for i in range(0, len(x_te), 8)])
    assert sqnr_db(digits["ref"], got) > 40.0
