"""``edgerep quantize HF_DIR --task ...``: a Hugging Face directory converted, then quantized."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers", reason="transformers comes with edgerep[peft]")
pytest.importorskip("onnxruntime", reason="onnxruntime comes with edgerep[onnx]")

from edgerep.bundle import read_manifest
from edgerep.cli import EXIT_OK, EXIT_USAGE, main
from tests.test_hf import _resnet


def test_quantize_takes_a_hugging_face_directory_with_its_task(tmp_path, capsys):
    path = _resnet(tmp_path / "resnet")
    calib = tmp_path / "calib.npz"
    x = np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32)
    np.savez(calib, x=x)
    quick = ["--backend", "onnxruntime", "--calib-samples", "8", "--seconds", "0.02"]
    quick += ["--repeats", "1"]
    out = tmp_path / "q"
    argv = ["quantize", str(path), "--task", "image-classification", *quick, "-o", str(out)]
    # checked before any work: no calibration data, nothing written
    assert main(argv) == EXIT_USAGE
    assert "needs --calib" in capsys.readouterr().err and not out.exists()
    assert main([*argv, "--calib", str(calib), "--json"]) == EXIT_OK, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert result["quantize"]["mode"] == "int8" and result["bundle"] == str(out.resolve())
    manifest = read_manifest(out)
    # the float artifact came from the directory's config: input pixel_values:1x3x32x32
    assert manifest["inputs"][0]["name"] == "pixel_values"
    assert manifest["inputs"][0]["shape"] == [1, 3, 32, 32]
    assert any(a["format"] == "onnx" and a["precision"] == "fp32" for a in manifest["artifacts"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # scratch removed
    # bad requests are named
    bad = ["quantize", str(path), "--calib", str(calib), *quick]
    assert main([*bad, "--task", "image_classification", "-o", str(tmp_path / "a")]) == 2
    assert "unknown --task 'image_classification'" in capsys.readouterr().err
    assert main([*bad, "--trust-unsigned", "-o", str(tmp_path / "b")]) == EXIT_USAGE
    assert "--trust-unsigned applies to bundles" in capsys.readouterr().err
    code = main(["quantize", str(out), "--task", "image-classification", "-o", str(tmp_path / "c")])
    assert code == EXIT_USAGE
    assert "--task applies only when the source is a Hugging Face model directory" in (
        capsys.readouterr().err
    )
    assert not any((tmp_path / n).exists() for n in "abc")
