"""convert() and fold_to_dir(): stages, parity, ledger, atomicity."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgerep.bundle import read_manifest
from edgerep.errors import ConfigError, UnsupportedError, VerificationError
from edgerep.exporters.onnx import OnnxExporter
from edgerep.pipeline import Tolerance, compare_outputs, convert, fold_to_dir, tolerance_for
from edgerep.spec import parse_input_spec


def _randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
    return model


def conv_bn() -> nn.Module:
    torch.manual_seed(0)
    return _randomize_bn(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)
        )
    ).eval()


SPECS = [parse_input_spec("x:Nx3x8x8")]


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, ids, scale):
        return self.fc(self.emb(ids)).sum(1) * scale, self.emb(ids).mean()


@pytest.fixture(scope="module")
def unfolded_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe") / "bundle"
    path, result = convert(conv_bn(), SPECS, out_dir=out, fold=False, source={"kind": "test"})
    return path, result


def test_convert_writes_a_verified_bundle(unfolded_bundle):
    path, result = unfolded_bundle
    manifest = read_manifest(path)
    assert sorted(p.name for p in path.iterdir()) == [
        "fold_report.json",
        "manifest.json",
        "onnx",
        "report.txt",
    ]
    (art,) = manifest["artifacts"]
    assert art["file"] == "onnx/model.onnx" and art["precision"] == "fp32"
    assert art["parity"]["passed"] is True
    assert [i["shapes"]["x"][0] for i in art["parity"]["inputs"]] == [1, 1, 3]  # dynamic batch used
    assert art["parity"]["outputs"]["output"]["max_rel_error"] <= 1e-4
    assert art["parity"]["runtime"]["providers"] == ["CPUExecutionProvider"]
    assert manifest["inputs"] == [{"name": "x", "shape": ["N", 3, 8, 8], "dtype": "float32"}]
    assert manifest["outputs"][0]["shape"] == ["N", 4, 8, 8]
    assert manifest["source"] == {"kind": "test"}
    stages = [(r["stage"], r["action"]) for r in manifest["ledger"]]
    assert stages == [("fold", "skipped"), ("export", "exported"), ("verify", "passed")]
    assert result.formats[0].status == "verified"
    assert "verified" in result.status_table()
    assert json.loads((path / "fold_report.json").read_text()) is None
    assert "onnx/model.onnx" in (path / "report.txt").read_text()


def test_convert_with_fold_records_every_region(tmp_path):
    model = conv_bn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path, result = convert(model, SPECS, out_dir=tmp_path / "b")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # not mutated
    manifest = read_manifest(path)
    fold_rows = [r for r in manifest["ledger"] if r["stage"] == "fold"]
    assert result.fold_report is not None
    assert len(fold_rows) == len(result.fold_report.folded) + len(result.fold_report.kept)
    assert any(r["action"] == "folded" and r["error"] < 1e-9 for r in fold_rows)
    report = json.loads((path / "fold_report.json").read_text())
    assert report["folded"]
    ops = {n.op_type for n in onnx.load(str(path / "onnx" / "model.onnx")).graph.node}
    assert "BatchNormalization" not in ops
    assert result.fold_report.to_text().splitlines()[0] in (path / "report.txt").read_text()


def test_parity_failure_writes_nothing(tmp_path, monkeypatch, torchscript_onnx):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("earlier run")
    original = OnnxExporter.export

    def export_wrong_model(self, model, example_inputs, specs, out_dir):
        wrong = conv_bn()
        with torch.no_grad():
            wrong[0].bias.add_(0.5)
        return original(self, wrong, example_inputs, specs, out_dir)

    monkeypatch.setattr(OnnxExporter, "export", export_wrong_model)
    with pytest.raises(VerificationError) as e:
        convert(conv_bn(), SPECS, out_dir=out, fold=False, overwrite=True)
    msg = str(e.value)
    assert "parity check failed; nothing was written" in msg
    assert (
        "onnx" in msg
        and "failed" in msg
        and "output 'output'" in msg
        and "above the tolerance" in msg
    )
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temp dir left
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_existing_output_is_refused_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "b").mkdir()

    def no_work(*args, **kwargs):
        raise AssertionError("work started")

    monkeypatch.setattr("edgerep.pipeline._prepare", no_work)
    with pytest.raises(ConfigError, match="--force"):
        convert(conv_bn(), SPECS, out_dir=tmp_path / "b")
    with pytest.raises(ConfigError, match="--force"):
        fold_to_dir(conv_bn(), SPECS, tmp_path / "b")


def test_model_failing_on_example_input_names_shapes(tmp_path):
    with pytest.raises(ConfigError) as e:
        convert(conv_bn(), [parse_input_spec("x:1x5x8x8")], out_dir=tmp_path / "b", fold=False)
    msg = str(e.value)
    assert "x: (1, 5, 8, 8) float32" in msg and "RuntimeError" in msg and "--input" in msg
    assert not (tmp_path / "b").exists()


def test_unknown_format_and_bad_options(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'onnx'"):
        convert(conv_bn(), SPECS, to=("onnxx",), out_dir=tmp_path / "b")
    with pytest.raises(ConfigError, match="no export format"):
        convert(conv_bn(), SPECS, to=(), out_dir=tmp_path / "b")
    with pytest.raises(ConfigError, match="rtol"):
        convert(conv_bn(), SPECS, out_dir=tmp_path / "b", rtol=0)


def test_multi_input_multi_output_with_int_input(tmp_path, torchscript_onnx):
    torch.manual_seed(0)
    specs = [parse_input_spec("ids:Nx5:int64"), parse_input_spec("scale:1")]
    path, result = convert(TwoInputs().eval(), specs, out_dir=tmp_path / "b", fold=False)
    manifest = read_manifest(path)
    assert [i["dtype"] for i in manifest["inputs"]] == ["int64", "float32"]
    assert [o["name"] for o in manifest["outputs"]] == ["output_0", "output_1"]
    assert [p.output for p in result.formats[0].parity] == ["output_0", "output_1"]


def test_training_mode_model_is_compared_in_eval_mode(tmp_path, torchscript_onnx):
    model = conv_bn().train()
    _, result = convert(model, SPECS, out_dir=tmp_path / "b", fold=False)
    assert model.training  # not mutated
    assert result.formats[0].status == "verified"


def test_compare_outputs():
    tol = Tolerance(rel=1e-4)
    ref = [np.array([1.0, -2.0, 4.0], np.float32)]
    ok = compare_outputs([ref], [[ref[0] + 1e-5]], ["y"], tol)[0]
    assert ok.passed and ok.max_abs_error == pytest.approx(1e-5, rel=1e-2)
    assert ok.max_rel_error == pytest.approx(2.5e-6, rel=1e-2) and ok.cosine == pytest.approx(1.0)
    bad = compare_outputs([ref, ref], [[ref[0]], [ref[0] + 0.01]], ["y"], tol)[0]
    assert not bad.passed and "parity input 1" in bad.reason
    nan = compare_outputs([ref], [[np.array([1.0, np.nan, 4.0], np.float32)]], ["y"], tol)[0]
    assert not nan.passed and nan.nonfinite == 1 and "NaN/Inf" in nan.reason
    shape = compare_outputs([ref], [[ref[0][:2]]], ["y"], tol)[0]
    assert not shape.passed and "shape" in shape.reason
    same_nan = np.array([np.nan, 1.0])
    # NaN matching NaN proves nothing: it fails unless the caller opts in
    garbage = compare_outputs([[same_nan]], [[same_nan.copy()]], ["y"], tol)[0]
    assert not garbage.passed and "reference" in garbage.reason
    assert compare_outputs(
        [[same_nan]], [[same_nan.copy()]], ["y"], tol, allow_nonfinite_reference=True
    )[0].passed
    zeros = np.zeros(4)
    assert compare_outputs([[zeros]], [[zeros]], ["y"], tol)[0].passed


def test_tolerance_table():
    assert tolerance_for("onnx", "fp32").rel == 1e-4
    assert tolerance_for("openvino", "fp16").rel == 1e-2  # falls back to the precision default
    with pytest.raises(ConfigError, match="SQNR"):
        tolerance_for("onnx", "int8")


def test_unsupported_is_raised_before_files(tmp_path):
    class Svd(nn.Module):
        def forward(self, x):
            return torch.linalg.svdvals(x)

    with pytest.raises(UnsupportedError):
        convert(Svd(), [parse_input_spec("x:1x4x4")], out_dir=tmp_path / "b", fold=False)
    assert list(tmp_path.iterdir()) == []


def test_fold_to_dir_saves_a_dynamic_pt2(tmp_path):
    model = conv_bn()
    path, result = fold_to_dir(model, SPECS, tmp_path / "f")
    manifest = read_manifest(path)
    assert manifest["artifacts"][0]["file"] == "model.pt2"
    assert manifest["outputs"][0]["shape"] == ["N", 4, 8, 8]
    assert result.formats[0].status == "verified"
    loaded = torch.export.load(str(path / "model.pt2")).module()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-4)
    names = {type(m).__name__ for m in loaded.modules()}
    assert "BatchNorm2d" not in names
