"""The quantize stage on a bundle, the calibration split and the CLI front."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import edgerep
from edgerep.bench.latency import LatencyConfig
from edgerep.bench.report import write_report
from edgerep.bench.suite import run_bench
from edgerep.bundle import read_manifest, write_manifest
from edgerep.cli import EXIT_OK, EXIT_USAGE, main
from edgerep.errors import ConfigError
from edgerep.pipeline import convert
from edgerep.quantize import (
    calibration_from_arrays,
    default_backends,
    load_calibration,
    quantize_bundle,
    sqnr_db,
)
from edgerep.quantize._bundle import eval_batch
from edgerep.spec import parse_input_spec
from tests._tiny_bundle import make_bundle
from tests.quantize._digits import make_fragile, trained_digits

U8 = "int8-U8S8-pc"
S8 = "int8-S8S8-pc"
PT = "int8-U8S8-pt"


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict:
    model, _, x_te, y_te = trained_digits()
    root = tmp_path_factory.mktemp("qbundle")
    bundle, _ = convert(
        model,
        # a bounded batch, as the demo exports: evaluation must respect it
        [parse_input_spec("x:N[1..1..8]x1x8x8")],
        to=("onnx", "openvino"),
        out_dir=root / "float",
        fold=False,
    )
    npz = root / "digits.npz"
    np.savez(npz, x=x_te.numpy(), y=y_te.numpy())
    data = load_calibration(npz, input_names=["x"], samples=128)
    fragile, _ = convert(
        make_fragile(model),
        [parse_input_spec("x:Nx1x8x8")],
        to=("onnx",),
        out_dir=root / "fragile",
        fold=False,
    )
    return {
        "bundle": bundle,
        "fragile": fragile,
        "data": data,
        "npz": npz,
        "x": x_te.numpy(),
        "y": y_te.numpy(),
    }


def test_sqnr_db() -> None:
    ref = np.array([1.0, -2.0, 3.0])
    assert sqnr_db(ref, ref) == float("inf")
    # noise power 1/100 of the signal's: 20 dB
    noisy = ref + np.sqrt(np.sum(ref**2) / 100 / 3) * np.array([1.0, -1.0, 1.0])
    assert sqnr_db(ref, noisy) == pytest.approx(20.0)
    assert sqnr_db(np.zeros(3), ref) == float("-inf")


def test_calibration_split_is_disjoint_and_seeded() -> None:
    x = np.arange(100, dtype=np.float32).reshape(100, 1)
    y = np.arange(100) % 3
    a = calibration_from_arrays(x, y, input_names=["x"], samples=50, seed=1)
    b = calibration_from_arrays(x, y, input_names=["x"], samples=50, seed=1)
    calib = {float(f["x"][0, 0]) for f in a.calib}
    evals = set(a.eval_feeds["x"][:, 0].tolist())
    assert len(calib) == 50 and len(evals) == 50 and not calib & evals
    assert np.array_equal(a.eval_feeds["x"], b.eval_feeds["x"])
    assert np.array_equal(a.labels, y[a.eval_feeds["x"][:, 0].astype(int)])
    assert a.note == ""
    small = calibration_from_arrays(x[:10], None, input_names=["x"])
    assert "same ones" in small.note and small.labels is None


def test_calibration_errors_name_the_problem(tmp_path: Path) -> None:
    x = np.zeros((8, 2), np.float32)
    with pytest.raises(ConfigError, match="2 inputs"):
        calibration_from_arrays(x, None, input_names=["a", "b"])
    with pytest.raises(ConfigError, match="lacks input"):
        calibration_from_arrays({"a": x}, None, input_names=["a", "b"])
    with pytest.raises(ConfigError, match="8 inputs but 3 labels"):
        calibration_from_arrays(x, np.zeros(3), input_names=["a"])
    npz = tmp_path / "d.npz"
    np.savez(npz, images=x)
    with pytest.raises(ConfigError, match="--x-key"):
        load_calibration(npz, input_names=["a"])
    unlabeled = load_calibration(npz, input_names=["a"], x_key="images")
    assert unlabeled.labels is None


def test_chosen_variant_is_added_before_the_float_artifact(digits: dict, tmp_path: Path) -> None:
    src_manifest = read_manifest(digits["bundle"])
    out, report = quantize_bundle(
        digits["bundle"],
        tmp_path / "q",
        data=digits["data"],
        latencies_ms={"onnxruntime": {"fp32": 1.0, U8: 0.4, S8: 0.5, PT: 0.45}},
    )
    (result,) = report.backends
    assert result.chosen == U8 and result.artifact == f"onnx-{U8}/model.onnx"
    manifest = read_manifest(out)
    first, second = manifest["artifacts"][:2]
    assert (first["format"], first["precision"], first["status"]) == ("onnx", "int8", "verified")
    assert second == src_manifest["artifacts"][0]
    assert first["parity"]["drop"] <= 0.01 and first["parity"]["sqnr_db"] > 20
    assert any(r["stage"] == "quantize" and r["action"] == "added" for r in manifest["ledger"])
    saved = json.loads((out / "quantize_report.json").read_text())
    assert saved["backends"][0]["chosen"] == U8
    assert "output SQNR" in (out / "report.txt").read_text()
    # the source bundle is untouched and edgerep.load runs the quantized variant
    assert read_manifest(digits["bundle"]) == src_manifest
    predictor = edgerep.load(out, prefer=["onnxruntime"])
    assert predictor.artifact["precision"] == "int8"
    logits = predictor.run({"x": digits["x"][:8]})[0]
    assert (logits.argmax(1) == digits["y"][:8]).mean() >= 0.75


def test_openvino_variant_ships_its_weights(digits: dict, tmp_path: Path) -> None:
    out, report = quantize_bundle(
        digits["bundle"],
        tmp_path / "q",
        data=digits["data"],
        backends=["openvino"],
        latencies_ms={"openvino": {"fp32": 1.0, "ov-int8": 0.5, "ov-int8-mixed": 0.6}},
    )
    (result,) = report.backends
    assert result.chosen == "ov-int8" and result.sqnr_db is not None and result.sqnr_db > 20
    entry = read_manifest(out)["artifacts"][1]
    assert entry["format"] == "openvino" and entry["precision"] == "int8"
    assert entry["files"] == ["openvino-ov-int8/model.xml", "openvino-ov-int8/model.bin"]
    assert set(entry["tool_versions"]) == {"openvino", "nncf"}
    predictor = edgerep.load(out, prefer=["openvino"])
    assert predictor.artifact["precision"] == "int8"
    logits = np.concatenate([predictor.run({"x": digits["x"][i : i + 8]})[0] for i in (0, 8)])
    assert (logits.argmax(1) == digits["y"][:16]).mean() > 0.8


def test_a_mode_a_backend_lacks_is_refused_before_work(digits: dict, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'onnxruntime' does not offer mode 'w4'.*openvino"):
        quantize_bundle(digits["bundle"], tmp_path / "q", data=digits["data"], mode="w4")
    assert not (tmp_path / "q").exists()


def test_nothing_added_when_no_variant_pays(digits: dict, tmp_path: Path) -> None:
    out, report = quantize_bundle(
        digits["bundle"],
        tmp_path / "q",
        data=digits["data"],
        latencies_ms={"onnxruntime": {"fp32": 1.0, U8: 0.95, S8: 1.2, PT: 0.9}},
    )
    assert report.backends[0].chosen == "fp32" and report.backends[0].artifact is None
    assert "no speed-up" in report.backends[0].reason
    manifest = read_manifest(out)
    assert [a["precision"] for a in manifest["artifacts"]] == ["fp32", "fp32"]
    assert any(r["action"] == "kept" for r in manifest["ledger"] if r["stage"] == "quantize")


def test_eval_batch_respects_fixed_and_bounded_batches() -> None:
    def manifest(*shapes: list, ranges: dict | None = None) -> dict:
        return {"inputs": [{"shape": s, "ranges": ranges or {}} for s in shapes]}

    assert eval_batch(manifest(["N", 3])) == 32
    assert eval_batch(manifest(["N", 3], ranges={"N": {"min": 1, "opt": 1, "max": 8}})) == 8
    assert eval_batch(manifest([1, 3], ["N", 2])) == 1
    assert eval_batch(manifest([])) == 1


def test_bad_requests_fail_before_work(digits: dict, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is the source bundle"):
        quantize_bundle(digits["bundle"], digits["bundle"], data=digits["data"], overwrite=True)
    with pytest.raises(ConfigError, match="did you mean 'onnxruntime'"):
        quantize_bundle(digits["bundle"], tmp_path / "a", data=digits["data"], backends=["onnxrt"])
    with pytest.raises(ConfigError, match="unknown mode"):
        quantize_bundle(digits["bundle"], tmp_path / "b", data=digits["data"], mode="int3")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # a bundle without a float ONNX artifact: the message says how to get one
    tiny = make_bundle(tmp_path / "tiny", openvino=False)
    manifest = read_manifest(tiny)
    entry = {**manifest["artifacts"][0], "precision": "fp16"}
    write_manifest(tiny, {**manifest, "artifacts": [entry]})
    with pytest.raises(ConfigError, match=r"lacks .*--to onnx"):
        quantize_bundle(tiny, tmp_path / "c", data=digits["data"])


def test_cli_quantize(digits: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "q"
    code = main(["quantize", str(digits["bundle"]), "-o", str(out)])
    assert code == EXIT_USAGE and "needs --calib" in capsys.readouterr().err
    assert not out.exists()
    code = main(
        [
            "quantize",
            str(digits["bundle"]),
            "-o",
            str(out),
            "--calib",
            str(digits["npz"]),
            "--calib-samples",
            "64",
            "--backend",
            "onnxruntime",
            "--sensitivity",
            "--max-drop",
            "0.02",
            "--seconds",
            "0.05",
            "--repeats",
            "1",
            "--json",
        ]
    )
    assert code == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == "int8" and report["data"]["calib_samples"] == 64
    statuses = {c["name"]: c["status"] for c in report["backends"][0]["selection"]["candidates"]}
    assert set(statuses) == {"fp32", U8, S8, PT}
    assert read_manifest(out)["artifacts"]
    assert (out / "sensitivity.md").read_text().count("|") > 10
    # the bench report of the quantized bundle shows the selection and the sensitivity table
    report = run_bench(
        [str(out)],
        runtimes=["onnxruntime"],
        config=LatencyConfig(min_seconds=0.01, repeats=1, warmup_iters=1, min_iters=5),
        roofline=False,
    )
    paths = write_report(report, tmp_path / "bench")
    text = paths["markdown"].read_text()
    assert "### Quantization of q" in text and "Per-layer sensitivity" in text
    assert "Quantization" in paths["html"].read_text()


def test_mixed_precision_rescues_an_over_budget_int8(digits: dict, tmp_path: Path) -> None:
    # every int8 variant is fast but breaks the fragile layer: mixed precision keeps that
    # one layer in float, and the result is measured like any candidate
    out, report = quantize_bundle(
        digits["fragile"],
        tmp_path / "q",
        data=digits["data"],
        backends=["onnxruntime"],
        latencies_ms={"onnxruntime": {"fp32": 1.0, U8: 0.4, S8: 0.5, PT: 0.45}},
        latency_config=LatencyConfig(min_seconds=0.02, repeats=1, warmup_iters=2),
        sensitivity=True,
    )
    (result,) = report.backends
    statuses = {c.name: c.status for c in result.selection.candidates}
    assert statuses[U8] == statuses[S8] == statuses[PT] == "over budget"
    assert result.mixed is not None and result.mixed["status"] == "within budget"
    (kept,) = result.mixed["kept_float"]  # exactly the fragile layer
    mixed_name = next(n for n in statuses if n.startswith(U8 + "-ex1"))
    assert statuses[mixed_name] in ("chosen", "no speed-up")
    assert (statuses[mixed_name] == "chosen") == (result.artifact is not None)
    sens = json.loads((out / "sensitivity.json").read_text())
    assert sens["layers"][0]["node"] == kept
    assert "mixed precision" in report.to_text()


def test_executorch_quantizes_the_model_into_the_bundle(tmp_path: Path) -> None:
    # ExecuTorch's PT2E quantizer needs the PyTorch model: without it, a clear refusal
    model, _, x_te, y_te = trained_digits()
    specs = [parse_input_spec("x:N[1..1..8]x1x8x8")]
    bundle, _ = convert(model, specs, to=("executorch",), out_dir=tmp_path / "et", fold=False)
    data = calibration_from_arrays(x_te.numpy(), y_te.numpy(), input_names=["x"], samples=64)
    with pytest.raises(ConfigError, match=r"convert .*--quantize"):
        quantize_bundle(bundle, tmp_path / "q0", data=data, backends=["executorch"])
    assert default_backends("int8", ["executorch"]) == []
    assert default_backends("int8", ["executorch"], with_model=True) == ["executorch"]
    out, report = quantize_bundle(
        bundle,
        tmp_path / "q",
        data=data,
        backends=["executorch"],
        latencies_ms={"executorch": {"fp32": 1.0, "int8-pc": 0.5}},
        model=(model, (x_te[:1],), specs),
    )
    (result,) = report.backends
    assert result.chosen == "int8-pc" and result.sqnr_db is not None and result.sqnr_db > 20
    entry = read_manifest(out)["artifacts"][0]
    assert entry["format"] == "executorch" and entry["precision"] == "int8"
    assert entry["files"] == ["executorch-int8-pc/model.pte", "executorch-int8-pc/model.pte.json"]
    predictor = edgerep.load(out, prefer=["executorch"])
    assert predictor.artifact["precision"] == "int8"
    assert (predictor.run({"x": x_te[:8].numpy()})[0].argmax(1) == y_te[:8].numpy()).mean() >= 0.75
