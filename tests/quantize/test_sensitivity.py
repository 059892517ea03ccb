"""Per-layer sensitivity and mixed precision on onnxruntime, on a net trained on digits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgerep.errors import ConfigError
from edgerep.quantize import (
    MixedPrecisionReport,
    OrtQuantConfig,
    SensitivityReport,
    layer_sensitivity,
    mixed_precision,
)
from edgerep.quantize._sensitivity import _module_name
from tests.quantize._digits import calib_feeds, export_onnx, make_fragile, trained_digits

FRAGILE = "/2/Conv"  # the middle layer: first in neither graph order nor reverse order


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The trained digits CNN (/0/Conv, /2/Conv, /5/Gemm) and a fragile copy
    (`make_fragile`: ``/2/Conv`` alone breaks under int8)."""
    model, x_tr, x_te, y_te = trained_digits()
    work = tmp_path_factory.mktemp("sensitivity")
    fragile = make_fragile(model)
    return {
        "path": export_onnx(model, work / "fp32.onnx"),
        "fragile": export_onnx(fragile, work / "fragile.onnx"),
        "calib": calib_feeds(x_tr),
        "eval": {"x": x_te.numpy()},
        "labels": y_te.numpy(),
    }


@pytest.fixture(scope="module")
def fragile_report(digits: dict) -> SensitivityReport:
    return layer_sensitivity(
        digits["fragile"], calib=digits["calib"], eval_feeds=digits["eval"], labels=digits["labels"]
    )


def _int8_weights(path: Path) -> dict[str, bool]:
    """For each Conv/Gemm: is its weight dequantized from int8 (else a float initializer)?"""
    nodes = onnx.load(str(path)).graph.node
    dq = {o for n in nodes if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name: n.input[1] in dq for n in nodes if n.op_type in ("Conv", "Gemm")}


def test_fragile_layer_is_ranked_first_and_alone(fragile_report: SensitivityReport) -> None:
    report = fragile_report
    assert report.ranking[0] == FRAGILE, report.to_text()
    assert sorted(report.ranking) == ["/0/Conv", "/2/Conv", "/5/Gemm"]
    first, *rest = report.layers
    assert report.fp32_metric > 0.9  # the fragile copy still classifies well in float
    assert first.drop > 0.3 and first.sqnr_db < 10.0, first
    # quantizing one node must leave the others float: the robust layers alone cost little
    for layer in rest:
        assert layer.drop <= 0.01 and layer.sqnr_db > 30.0, layer
    assert report.quantized_metric < report.fp32_metric - 0.3
    assert [layer.module for layer in report.layers] == ["2", *(r.module for r in rest)]


def test_mixed_precision_keeps_the_fragile_layer_in_float(
    digits: dict, fragile_report: SensitivityReport, tmp_path: Path
) -> None:
    out = tmp_path / "mixed.onnx"
    path, report = mixed_precision(
        digits["fragile"],
        out,
        calib=digits["calib"],
        eval_feeds=digits["eval"],
        labels=digits["labels"],
        max_drop=0.01,
        sensitivity=fragile_report,
    )
    assert path == out and [p.name for p in tmp_path.iterdir()] == ["mixed.onnx"]
    assert report.status == "within budget", report.to_text()
    assert report.steps[0].kept_float == () and report.steps[0].drop > 0.01  # plain int8 over
    assert report.kept_float == (FRAGILE,) and report.steps[-1].drop <= 0.01
    assert report.config.nodes_to_exclude == (FRAGILE,)
    assert _int8_weights(path) == {"/0/Conv": True, FRAGILE: False, "/5/Gemm": True}
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    top1 = float((sess.run(None, digits["eval"])[0].argmax(1) == digits["labels"]).mean())
    assert top1 == pytest.approx(report.steps[-1].metric)
    assert report.fp32_metric - top1 <= 0.01 + 1e-12
    assert MixedPrecisionReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report
    assert FRAGILE in report.to_markdown() and "within budget" in report.to_text()


def test_mixed_precision_falls_back_to_fp32_when_ranked_layers_do_not_suffice(
    digits: dict, tmp_path: Path
) -> None:
    # ranking only the Gemm cannot repair the fragile conv: the float model is written
    ranking = layer_sensitivity(
        digits["fragile"], calib=digits["calib"], eval_feeds=digits["eval"], op_types=("Gemm",)
    )
    path, report = mixed_precision(
        digits["fragile"],
        tmp_path / "mixed.onnx",
        calib=digits["calib"],
        eval_feeds=digits["eval"],
        sensitivity=ranking,
    )
    assert report.metric == "agreement" and report.fp32_metric == 1.0
    assert report.status == "fp32 fallback" and len(report.steps) == 2
    assert all(step.drop > 0.01 for step in report.steps)
    assert "Conv" in report.reason and "float32 model" in report.reason
    assert path.read_bytes() == digits["fragile"].read_bytes()


def test_digits_sensitivity_sqnr_latency_shares_and_json(digits: dict, tmp_path: Path) -> None:
    report = layer_sensitivity(
        digits["path"], calib=digits["calib"], eval_feeds=digits["eval"], labels=digits["labels"]
    )
    assert report.metric == "top1" and report.fp32_metric > 0.9
    assert report.quantized_sqnr_db > 20.0, report.to_text()
    assert report.fp32_metric - report.quantized_metric <= 0.01 + 1e-12
    # every layer was found in onnxruntime's profile under its ONNX name
    assert all(layer.latency_share is not None for layer in report.layers), report.to_text()
    shares = [layer.latency_share or 0.0 for layer in report.layers]
    assert all(s > 0 for s in shares), report.to_text()
    assert sum(shares) + report.other_latency_share == pytest.approx(1.0, abs=1e-9)
    assert 0 < report.other_latency_share < 0.5 and report.profiled_ms > 0  # Flatten
    text = json.dumps(report.to_dict())
    assert SensitivityReport.from_dict(json.loads(text)) == report
    md = report.to_markdown()
    assert md.count("\n| ") == 1 + len(report.layers) and "`/2/Conv`" in md
    assert report.to_text().splitlines()[1].split()[:3] == ["rank", "node", "module"]
    # already within budget: nothing is kept in float
    _, mixed = mixed_precision(
        digits["path"],
        tmp_path / "m.onnx",
        calib=digits["calib"],
        eval_feeds=digits["eval"],
        labels=digits["labels"],
        sensitivity=report,
    )
    assert mixed.status == "within budget" and mixed.kept_float == () and len(mixed.steps) == 1


def test_infinite_sqnr_round_trips_through_json() -> None:
    report = SensitivityReport("top1", 1.0, 1.0, float("inf"), OrtQuantConfig())
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert SensitivityReport.from_dict(data).quantized_sqnr_db == float("inf")
    with pytest.raises(ConfigError, match="version"):
        SensitivityReport.from_dict({**data, "version": 7})


def test_unknown_nodes_are_named_with_suggestions(digits: dict, tmp_path: Path) -> None:
    from edgerep.quantize import quantize_onnx

    config = OrtQuantConfig(nodes_to_exclude=("/2/Cnv", "/5/Gemm"), nodes_to_quantize=("conv0",))
    with pytest.raises(ConfigError) as err:
        quantize_onnx(digits["path"], tmp_path / "q.onnx", config, calib=digits["calib"])
    msg = str(err.value)
    assert "'/2/Cnv'" in msg and "did you mean '/2/Conv'" in msg and "'conv0'" in msg
    assert "'/5/Gemm'" not in msg and not list(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="does not have"):
        mixed_precision(
            digits["path"],
            tmp_path / "m.onnx",
            calib=digits["calib"],
            eval_feeds=digits["eval"],
            sensitivity=SensitivityReport.from_dict(
                {
                    **SensitivityReport("top1", 1, 1, 1, OrtQuantConfig()).to_dict(),
                    "layers": [
                        {
                            "node": "/9/Conv",
                            "op_type": "Conv",
                            "module": None,
                            "sqnr_db": 1.0,
                            "metric": 0.5,
                            "drop": 0.5,
                            "latency_share": 0.5,
                        }
                    ],
                }
            ),
        )


def test_module_names_from_both_exporters() -> None:
    def node(name: str, scopes: str | None = None) -> onnx.NodeProto:
        n = onnx.helper.make_node("Conv", ["x", "w"], ["y"], name=name)
        if scopes is not None:
            n.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=scopes)
        return n

    assert _module_name(node("/layer1/layer1.0/Conv")) == "layer1.0"
    assert _module_name(node("/layer1/0/conv/Conv")) == "layer1.0.conv"
    assert _module_name(node("/0/Conv")) == "0"
    assert _module_name(node("/Gemm")) is None and _module_name(node("Conv_3")) is None
    assert _module_name(node("node_conv2d", "['', 'layer1', 'layer1.0', 'conv2d']")) == "layer1.0"
    assert _module_name(node("node_mean", "['', 'mean']")) is None


def test_bad_arguments_are_config_errors(digits: dict, tmp_path: Path) -> None:
    kw = {"calib": digits["calib"], "eval_feeds": digits["eval"]}
    with pytest.raises(ConfigError, match="labels"):
        layer_sensitivity(digits["path"], **kw, labels=np.zeros(3))
    with pytest.raises(ConfigError, match="no node of op types"):
        layer_sensitivity(digits["path"], **kw, op_types=("LSTM",))
    with pytest.raises(ConfigError, match="max_drop"):
        mixed_precision(digits["path"], tmp_path / "m.onnx", **kw, max_drop=2.0)
    with pytest.raises(ConfigError, match="input model"):
        mixed_precision(digits["path"], digits["path"], **kw)
