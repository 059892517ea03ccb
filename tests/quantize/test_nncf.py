"""NNCF/OpenVINO quantization: held-out top-1, SQNR, IR structure and weight precisions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgerep.errors import ConfigError, ExportError
from edgerep.quantize import OvQuantConfig, quantize_openvino
from edgerep.quantize._metrics import sqnr_db
from edgerep.quantize._nncf import weight_precisions
from tests.quantize._digits import calib_feeds, export_onnx, trained_digits

ov = pytest.importorskip("openvino", reason="openvino is not installed (edgerep[openvino])")
pytest.importorskip("nncf", reason="nncf is not installed (edgerep[openvino])")


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    """Outputs on OpenVINO CPU in true float32 (this CPU's default would be bf16)."""
    compiled = ov.Core().compile_model(
        str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1}
    )
    return np.asarray(compiled({"x": x})[compiled.outputs[0]])


def _ops(path: Path) -> list[str]:
    return [op.get_type_name() for op in ov.Core().read_model(str(path)).get_ops()]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict:
    model, x_tr, x_te, y_te = trained_digits()
    root = tmp_path_factory.mktemp("digits")
    path = export_onnx(model, root / "fp32.onnx")
    fp32_ir = root / "fp32.xml"
    ov.save_model(ov.Core().read_model(str(path)), str(fp32_ir), compress_to_fp16=False)
    x = x_te.numpy()
    ref = _run(path, x)
    top1 = float((ref.argmax(1) == y_te.numpy()).mean())
    assert top1 > 0.9  # the model really learned something
    return {
        "path": path,
        "ir": fp32_ir,
        "calib": calib_feeds(x_tr, 128),
        "x": x,
        "y": y_te.numpy(),
        "ref": ref,
        "top1": top1,
    }


def _bin_bytes(xml: Path) -> int:
    return xml.with_suffix(".bin").stat().st_size


def test_config_validates_with_suggestions_and_round_trips() -> None:
    with pytest.raises(ConfigError) as err:
        OvQuantConfig(mode="int9", preset="performence", w4_type="symm", subset_size=0)
    msg = str(err.value)
    assert "'int9'" in msg and "did you mean 'int8'" in msg
    assert "'performance'" in msg and "'sym'" in msg and "subset_size" in msg
    with pytest.raises(ConfigError, match="group_size"):
        OvQuantConfig(mode="w4", group_size=0)
    with pytest.raises(ConfigError, match="max_drop"):
        OvQuantConfig(mode="int8-acc", max_drop=1.5)
    config = OvQuantConfig(mode="w4", w4_type="asym", group_size=64, all_layers=True)
    assert config.name == "ov-w4-asym-g64-all"
    back = OvQuantConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert back == config and back.to_dict()["version"] == 1
    with pytest.raises(ConfigError, match="did you mean 'preset'"):
        OvQuantConfig.from_dict({"mode": "int8", "presett": "mixed"})
    with pytest.raises(ConfigError, match="version"):
        OvQuantConfig.from_dict({**config.to_dict(), "version": 2})
    names = {OvQuantConfig(mode=m).name for m in ("int8", "int8-acc", "w8", "w4", "fp16")}
    assert len(names) == 5


def test_int8_keeps_top1_within_one_point(digits: dict, tmp_path: Path) -> None:
    art = quantize_openvino(
        digits["path"], tmp_path / "int8.xml", OvQuantConfig(), calib=digits["calib"]
    )
    assert art.path.is_file() and art.path.with_suffix(".bin").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8.bin", "int8.xml"]
    ops = _ops(art.path)
    assert ops.count("FakeQuantize") == art.fake_quantize_ops > 0
    assert dict(art.weight_precisions) == {"int4": 0, "int8": 3, "fp16": 0, "fp32": 0}
    assert art.calib_samples == len(digits["calib"]) and art.notes == ()
    out = _run(art.path, digits["x"])
    assert sqnr_db(digits["ref"], out) > 20.0
    top1 = float((out.argmax(1) == digits["y"]).mean())
    assert digits["top1"] - top1 <= 0.01 + 1e-12, (digits["top1"], top1)
    assert _bin_bytes(art.path) < 0.4 * _bin_bytes(digits["ir"])  # int8 weights in the .bin


def test_w8_compresses_every_weight(digits: dict, tmp_path: Path) -> None:
    fp32 = weight_precisions(ov.Core().read_model(str(digits["ir"])))
    assert fp32 == {"int4": 0, "int8": 0, "fp16": 0, "fp32": 3}
    art = quantize_openvino(digits["ir"], tmp_path / "w8.xml", OvQuantConfig(mode="w8"))
    assert dict(art.weight_precisions) == {"int4": 0, "int8": 3, "fp16": 0, "fp32": 0}
    assert art.compressed_layers == 3 and art.fake_quantize_ops == 0 and art.calib_samples == 0
    assert _bin_bytes(art.path) < 0.4 * _bin_bytes(digits["ir"])
    assert sqnr_db(digits["ref"], _run(art.path, digits["x"])) > 20.0


def test_w4_on_a_conv_net_says_what_stayed_int8(digits: dict, tmp_path: Path) -> None:
    default = quantize_openvino(
        digits["path"], tmp_path / "w4.xml", OvQuantConfig(mode="w4", group_size=32)
    )
    # convolutions stay at NNCF's int8 backup; the one Linear is first and last -> int8
    assert dict(default.weight_precisions) == {"int4": 0, "int8": 3, "fp16": 0, "fp32": 0}
    assert any("0 of 3 weighted layers are 4-bit" in n for n in default.notes), default.notes
    every = quantize_openvino(
        digits["path"],
        tmp_path / "w4all.xml",
        OvQuantConfig(mode="w4", group_size=32, all_layers=True),
    )
    assert dict(every.weight_precisions) == {"int4": 1, "int8": 2, "fp16": 0, "fp32": 0}
    assert "1 of 3" in every.notes[0]
    assert every.path.with_suffix(".bin").stat().st_size < _bin_bytes(default.path)
    assert sqnr_db(digits["ref"], _run(every.path, digits["x"])) > 12.0


def test_fp16_halves_the_weights(digits: dict, tmp_path: Path) -> None:
    art = quantize_openvino(digits["path"], tmp_path / "fp16.xml", OvQuantConfig(mode="fp16"))
    assert dict(art.weight_precisions) == {"int4": 0, "int8": 0, "fp16": 3, "fp32": 0}
    assert _bin_bytes(art.path) < 0.6 * _bin_bytes(digits["ir"])
    assert sqnr_db(digits["ref"], _run(art.path, digits["x"])) > 50.0


def test_int8_acc_calls_the_metric_and_respects_the_budget(digits: dict, tmp_path: Path) -> None:
    x, y = digits["x"][:200], digits["y"][:200]
    items = [({"x": x[i : i + 1]}, int(y[i])) for i in range(len(y))]
    calls = []

    def validate(predict, batch) -> float:  # type: ignore[no-untyped-def]
        calls.append(len(batch))
        hits = [predict(feeds)[0].argmax(1)[0] == label for feeds, label in batch]
        return float(np.mean(hits))

    config = OvQuantConfig(mode="int8-acc", max_drop=0.01)
    art = quantize_openvino(
        digits["path"],
        tmp_path / "acc.xml",
        config,
        calib=digits["calib"],
        validate=validate,
        eval_data=items,
    )
    assert calls and max(calls) == len(items)  # NNCF validated on the whole set
    assert art.metric_fp32 is not None and art.metric_quantized is not None
    assert abs(art.metric_fp32 - float((digits["ref"][:200].argmax(1) == y).mean())) < 1e-12
    assert art.metric_fp32 - art.metric_quantized <= 0.01 + 1e-12
    assert art.fake_quantize_ops > 0


def test_int8_acc_without_validation_data_explains(digits: dict, tmp_path: Path) -> None:
    config = OvQuantConfig(mode="int8-acc")
    with pytest.raises(ConfigError, match=r"eval_data=.*validate=") as err:
        quantize_openvino(digits["path"], tmp_path / "a.xml", config, calib=digits["calib"])
    assert "mode='int8'" in str(err.value)
    with pytest.raises(ConfigError, match=r"\(feeds, label\) pairs"):
        quantize_openvino(
            digits["path"],
            tmp_path / "a.xml",
            config,
            calib=digits["calib"],
            eval_data=[digits["x"][:1]],
        )
    with pytest.raises(ConfigError, match="mode='int8-acc'"):
        quantize_openvino(
            digits["path"], tmp_path / "a.xml", calib=digits["calib"], validate=lambda p, i: 1.0
        )
    assert list(tmp_path.iterdir()) == []


def test_bad_paths_and_missing_calibration_are_config_errors(digits: dict, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        quantize_openvino(tmp_path / "nope.onnx", tmp_path / "q.xml", OvQuantConfig(mode="w8"))
    with pytest.raises(ConfigError, match="overwrite the input"):
        quantize_openvino(digits["ir"], digits["ir"], OvQuantConfig(mode="w8"))
    with pytest.raises(ConfigError, match=r"\.xml"):
        quantize_openvino(digits["path"], tmp_path / "q.onnx", OvQuantConfig(mode="w8"))
    with pytest.raises(ConfigError, match="calibration feeds") as err:
        quantize_openvino(digits["path"], tmp_path / "q.xml")
    assert "'w8'" in str(err.value)  # names the data-free alternatives
    assert list(tmp_path.iterdir()) == []
    # NNCF itself fails (512 input channels are not divisible into groups of 7):
    # an ExportError naming the config, and no partial IR or temporary folder left
    (tmp_path / "q.xml").write_text("earlier result")
    bad = OvQuantConfig(mode="w4", group_size=7, all_layers=True)
    with pytest.raises(ExportError, match="ov-w4-sym-g7-all"):
        quantize_openvino(digits["path"], tmp_path / "q.xml", bad)
    assert [p.name for p in tmp_path.iterdir()] == ["q.xml"]
    assert (tmp_path / "q.xml").read_text() == "earlier result"
