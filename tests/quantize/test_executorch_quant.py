"""ExecuTorch int8 (PT2E + XNNPACK quantizer): top-1 and SQNR through the ExecuTorch runtime."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgerep.errors import ConfigError, UnsupportedError
from edgerep.quantize import ExecuTorchQuantConfig, quantize_executorch
from edgerep.quantize._executorch import _pt2e, quantized_op_counts
from edgerep.quantize._metrics import sqnr_db
from edgerep.runtimes import get_runtime
from edgerep.spec import example_inputs, parse_input_spec, with_bounded_ranges
from tests.quantize._digits import calib_feeds, digits_net, trained_digits

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("executorch") is None,
    reason="executorch is not installed (pip install 'edgerep[executorch]')",
)

SPECS = [parse_input_spec("x:N[1..1..8]x1x8x8")]  # conv nets: a small bounded dynamic batch


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> dict:
    model, x_tr, x_te, y_te = trained_digits()
    out = tmp_path_factory.mktemp("et-int8")
    art = quantize_executorch(
        model, example_inputs(SPECS, seed=0), SPECS, out, calib=calib_feeds(x_tr, 128)
    )
    return {"model": model, "x_te": x_te, "y_te": y_te, "art": art, "out": out}


def test_int8_pte_top1_and_sqnr_through_the_runtime(quantized: dict) -> None:
    model, x_te, y_te = quantized["model"], quantized["x_te"], quantized["y_te"]
    with get_runtime("executorch").load(quantized["art"].path) as s:
        assert s.input_names == ["x"]
        # batches of the max (8), an odd size (3) and 1: the dynamic batch works quantized
        outs, start, sizes = [], 0, [8, 3, 1]
        while start < len(x_te):
            n = sizes[len(outs) % 3]
            outs.append(s.run({"x": x_te[start : start + n].numpy()})[0])
            start += n
        got = np.concatenate(outs)
    assert got.shape == (len(x_te), 10)
    with torch.no_grad():
        ref = model(x_te).numpy()
    top1_fp32 = float((ref.argmax(1) == y_te.numpy()).mean())
    top1_int8 = float((got.argmax(1) == y_te.numpy()).mean())
    assert top1_fp32 > 0.9
    assert top1_fp32 - top1_int8 <= 0.01 + 1e-12, (top1_fp32, top1_int8)
    assert sqnr_db(ref, got) > 20.0  # measured 42.7 dB


def test_program_holds_quantized_xnnpack_delegates(quantized: dict) -> None:
    art, out = quantized["art"], quantized["out"]
    assert art.precision == "int8" and art.metadata["backends"] == ["XnnpackBackend"]
    q = art.metadata["quantization"]
    assert q["ops"] == {"quantized": {"conv2d": 2, "linear": 1}, "float": {}}
    assert q["calib_samples"] == 128 and q["undelegated_quant_ops"] == {}
    # everything but the batch-size read and the flatten view runs inside XNNPACK
    assert set(art.metadata["undelegated_ops"]) <= {"aten.sym_size.int", "view"}
    assert art.metadata["delegated_partitions"] >= 1
    assert art.metadata["planned_input_shapes"] == {"x": [8, 1, 8, 8]}
    # int8 weights: the whole program is smaller than the float32 weights alone
    float_bytes = 4 * sum(p.numel() for p in quantized["model"].parameters())
    assert art.path.stat().st_size < 0.6 * float_bytes, (art.path.stat().st_size, float_bytes)
    assert sorted(p.name for p in Path(out).iterdir()) == ["model.pte", "model.pte.json"]


def test_keep_float_and_dynamic_mode_choose_the_quantized_ops() -> None:
    model = digits_net().eval()
    specs = with_bounded_ranges(SPECS)
    ex = example_inputs(specs, seed=0)
    feed = [(torch.randn(1, 1, 8, 8),)]
    kept = _pt2e(model, ex, specs, ExecuTorchQuantConfig(keep_float=("5",)), feed)
    assert quantized_op_counts(kept.graph) == {
        "quantized": {"conv2d": 2},
        "float": {"linear": 1},
    }
    dynamic = _pt2e(model, ex, specs, ExecuTorchQuantConfig(mode="int8-dynamic"), [])
    assert quantized_op_counts(dynamic.graph) == {
        "quantized": {"linear": 1},
        "float": {"conv2d": 2},
    }


def test_misuse_is_reported_before_work(tmp_path: Path) -> None:
    model = digits_net().eval()
    ex = example_inputs(SPECS, seed=0)
    with pytest.raises(ConfigError, match="calibration feeds"):
        quantize_executorch(model, ex, SPECS, tmp_path)
    with pytest.raises(ConfigError, match=r"missing \['x'\]"):
        quantize_executorch(model, ex, SPECS, tmp_path, calib=[{"y": np.zeros((1, 1, 8, 8))}])
    with pytest.raises(ConfigError, match="did you mean '5'"):
        quantize_executorch(
            model,
            ex,
            SPECS,
            tmp_path,
            ExecuTorchQuantConfig(mode="int8-dynamic", keep_float=("55",)),
        )
    pool = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    with pytest.raises(UnsupportedError, match="no conv or linear"):
        quantize_executorch(pool, ex, SPECS, tmp_path, ExecuTorchQuantConfig(mode="int8-dynamic"))
    assert list(tmp_path.iterdir()) == []


def test_config_validation_and_json_round_trip() -> None:
    config = ExecuTorchQuantConfig(per_channel=False, keep_float=("head", "stem.0"))
    assert ExecuTorchQuantConfig.from_dict(config.to_dict()) == config
    assert config.name == "int8-pt"
    with pytest.raises(ConfigError) as err:
        ExecuTorchQuantConfig(mode="int9", max_calib_samples=0)
    assert "did you mean 'int8'" in str(err.value) and "max_calib_samples" in str(err.value)
    with pytest.raises(ConfigError, match="did you mean 'keep_float'"):
        ExecuTorchQuantConfig.from_dict({"keep_floats": []})
    with pytest.raises(ConfigError, match="tuple of module paths"):
        ExecuTorchQuantConfig(keep_float="head")  # type: ignore[arg-type]
