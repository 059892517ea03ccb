"""The command line: every exit code, through main(argv)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from edgerep.cli import (
    EXIT_EXPORT,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_SOURCE,
    EXIT_UNSUPPORTED,
    EXIT_USAGE,
    EXIT_VERIFICATION,
    exit_code_for,
    main,
)
from edgerep.errors import (
    ConfigError,
    EdgerepError,
    ExportError,
    MissingDependencyError,
    SourceError,
    UnsupportedError,
    VerificationError,
)
from edgerep.exporters.onnx import OnnxExporter
from tests._models import CONV_BN

MODELS = (
    CONV_BN
    + """
class Svd(nn.Module):
    def forward(self, x):
        return torch.linalg.svdvals(x)

def svd():
    return Svd()
"""
)


@pytest.fixture
def models(tmp_path):
    p = tmp_path / "models.py"
    p.write_text(textwrap.dedent(MODELS))
    return p


@pytest.fixture
def declared(tmp_path):
    p = tmp_path / "declared.py"
    p.write_text(textwrap.dedent(MODELS) + "\nEDGEREP_INPUTS = ['x:Nx3x8x8']\n")
    return p


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_exit_code_table():
    assert exit_code_for(ConfigError("x")) == EXIT_USAGE == 2
    assert exit_code_for(MissingDependencyError("onnx", "onnx")) == EXIT_USAGE
    assert exit_code_for(SourceError("x")) == EXIT_SOURCE == 3
    assert exit_code_for(VerificationError("x")) == EXIT_VERIFICATION == 4
    assert exit_code_for(ExportError("x")) == EXIT_EXPORT == 5
    assert exit_code_for(UnsupportedError("x")) == EXIT_UNSUPPORTED == 6
    assert exit_code_for(EdgerepError("x")) == EXIT_INTERNAL == 1
    assert exit_code_for(RuntimeError("x")) == EXIT_INTERNAL


def test_convert_ok(capsys, models, tmp_path):
    code, out, err = run(
        capsys,
        "convert",
        f"{models}:build",
        "--to",
        "onnx",
        "-o",
        tmp_path / "b",
        "--input",
        "x:Nx3x8x8",
    )
    assert code == EXIT_OK, err
    assert "fold report:" in out and "folded" in out
    assert "onnx" in out and "verified" in out and "bundle:" in out
    assert (tmp_path / "b" / "onnx" / "model.onnx").is_file()


def test_fold_ok(capsys, models, tmp_path):
    code, out, err = run(
        capsys, "fold", f"{models}:build", "-o", tmp_path / "f", "--input", "x:Nx3x8x8"
    )
    assert code == EXIT_OK, err
    assert "pt2" in out and "verified" in out
    assert (tmp_path / "f" / "model.pt2").is_file()


def test_convert_json_and_declared_inputs(capsys, declared, tmp_path, torchscript_onnx):
    code, out, err = run(
        capsys, "convert", f"{declared}:build", "-o", tmp_path / "b", "--no-fold", "--json"
    )
    assert code == EXIT_OK, err
    result = json.loads(out)
    assert result["formats"][0]["status"] == "verified"
    assert result["fold_report"] is None


def test_declared_inputs_are_announced(capsys, declared, tmp_path, torchscript_onnx):
    code, out, err = run(capsys, "convert", f"{declared}:build", "-o", tmp_path / "b", "--no-fold")
    assert code == EXIT_OK, err
    assert "inputs (declared by the source): x:Nx3x8x8" in out


def test_list(capsys):
    code, out, _ = run(capsys, "list")
    assert code == EXIT_OK
    assert "onnx" in out and "onnxruntime" in out and "torch" in out
    code, out, _ = run(capsys, "list", "--json")
    assert {f["format"] for f in json.loads(out)["formats"]} >= {"onnx"}


def test_bad_input_spec(capsys, models, tmp_path):
    code, _, err = run(
        capsys, "convert", f"{models}:build", "-o", tmp_path / "b", "--input", "x=1x3"
    )
    assert code == EXIT_USAGE
    assert "bad input spec 'x=1x3'" in err and "NAME:SHAPE" in err


def test_input_required_when_not_declared(capsys, models, tmp_path):
    code, _, err = run(capsys, "convert", f"{models}:build", "-o", tmp_path / "b")
    assert code == EXIT_USAGE
    assert "--input" in err and "x:1x3x224x224" in err


def test_model_failing_on_the_example_input(capsys, models, tmp_path):
    code, _, err = run(
        capsys, "convert", f"{models}:build", "-o", tmp_path / "b", "--input", "x:1x5x8x8"
    )
    assert code == EXIT_USAGE
    assert "(1, 5, 8, 8)" in err and "RuntimeError" in err


def test_source_errors(capsys, models, tmp_path):
    code, _, err = run(
        capsys, "convert", tmp_path / "nope.py:build", "-o", tmp_path / "b", "--input", "x:1x3x8x8"
    )
    assert code == EXIT_SOURCE and "does not exist" in err
    code, _, err = run(
        capsys, "fold", f"{models}:biuld", "-o", tmp_path / "b", "--input", "x:1x3x8x8"
    )
    assert code == EXIT_SOURCE and "did you mean 'build'" in err
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "w.pt")
    code, _, err = run(
        capsys,
        "convert",
        f"{models}:build",
        "--weights",
        tmp_path / "w.pt",
        "-o",
        tmp_path / "b",
        "--input",
        "x:1x3x8x8",
    )
    assert code == EXIT_SOURCE and "missing key(s)" in err
    assert not (tmp_path / "b").exists()


def test_existing_output_needs_force(capsys, models, tmp_path, torchscript_onnx):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "old").write_text("x")
    args = ["convert", f"{models}:build", "-o", tmp_path / "b", "--input", "x:1x3x8x8", "--no-fold"]
    code, _, err = run(capsys, *args)
    assert code == EXIT_USAGE and "--force" in err
    code, _, err = run(capsys, *args, "--force")
    assert code == EXIT_OK, err
    assert not (tmp_path / "b" / "old").exists()


def test_parity_failure(capsys, models, tmp_path, monkeypatch, torchscript_onnx):
    original = OnnxExporter.export

    def export_perturbed(self, model, example_inputs, specs, out_dir):
        wrong = type(model)()
        wrong.load_state_dict(model.state_dict())
        with torch.no_grad():
            wrong.conv.bias.add_(1.0)
        return original(self, wrong.eval(), example_inputs, specs, out_dir)

    monkeypatch.setattr(OnnxExporter, "export", export_perturbed)
    code, _, err = run(
        capsys,
        "convert",
        f"{models}:build",
        "-o",
        tmp_path / "b",
        "--input",
        "x:1x3x8x8",
        "--no-fold",
    )
    assert code == EXIT_VERIFICATION
    assert "parity check failed" in err and "output 'output'" in err
    assert not (tmp_path / "b").exists()


def test_export_failure(capsys, models, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(OnnxExporter, "_export_dynamo", fail)
    monkeypatch.setattr(OnnxExporter, "_export_torchscript", fail)
    code, _, err = run(
        capsys,
        "convert",
        f"{models}:build",
        "-o",
        tmp_path / "b",
        "--input",
        "x:1x3x8x8",
        "--no-fold",
    )
    assert code == EXIT_EXPORT
    assert "exporter exploded" in err and "export-failed" in err
    assert not (tmp_path / "b").exists()


def test_unsupported(capsys, models, tmp_path):
    code, _, err = run(
        capsys, "convert", f"{models}:svd", "-o", tmp_path / "b", "--input", "x:1x4x4", "--no-fold"
    )
    assert code == EXIT_UNSUPPORTED
    assert "svd" in err and "no ONNX translation" in err


def test_internal_error(capsys, models, tmp_path, monkeypatch):
    def kaboom(*args, **kwargs):
        raise RuntimeError("kaboom")

    monkeypatch.setattr("edgerep.pipeline.convert", kaboom)
    args = ["convert", f"{models}:build", "-o", tmp_path / "b", "--input", "x:1x3x8x8"]
    code, _, err = run(capsys, *args)
    assert code == EXIT_INTERNAL
    assert "kaboom" in err and "--debug" in err and "Traceback" not in err
    code, _, err = run(capsys, *args, "--debug")
    assert code == EXIT_INTERNAL and "Traceback" in err


def test_unknown_format(capsys, models, tmp_path):
    code, _, err = run(
        capsys,
        "convert",
        f"{models}:build",
        "--to",
        "onnx,onx",
        "-o",
        tmp_path / "b",
        "--input",
        "x:1x3x8x8",
    )
    assert code == EXIT_USAGE and "did you mean 'onnx'" in err


def test_usage_errors(capsys):
    assert run(capsys, "convert", "m.py:build")[0] == EXIT_USAGE  # -o missing
    assert run(capsys)[0] == EXIT_USAGE
    assert run(capsys, "frobnicate")[0] == EXIT_USAGE
    code, out, _ = run(capsys, "--help")
    assert code == EXIT_OK and "convert" in out


def test_python_dash_m():
    out = subprocess.run(
        [sys.executable, "-m", "edgerep", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "Exit codes" in out.stdout
