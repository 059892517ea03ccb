"""``edgerep bench`` through main(argv): output files, table, exit codes."""

from __future__ import annotations

import json

import numpy as np

from edgerep.cli import EXIT_OK, EXIT_UNSUPPORTED, EXIT_USAGE, EXIT_VERIFICATION, main
from tests._tiny_bundle import B, W, make_bundle

FAST = ["--min-iters", "5", "--seconds", "0", "--warmup", "1", "--repeats", "2", "--no-roofline"]


def test_bench_two_bundles(tmp_path, capsys):
    bundle = make_bundle(tmp_path / "tiny")
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=(x @ W + B).argmax(1))
    code = main(
        [
            "bench",
            str(bundle),
            "--compare",
            f"other={bundle}",
            "--runtime",
            "onnxruntime",
            "--data",
            str(tmp_path / "d.npz"),
            "--out",
            str(tmp_path / "out"),
            "--threads",
            "1",
            *FAST,
        ]
    )
    out, err = capsys.readouterr()
    assert code == EXIT_OK, err
    assert "| tiny | onnxruntime |" in out and "| other | onnxruntime |" in out
    assert "[2/2] done" in err  # the progress counter
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert len(report["rows"]) == 2 and report["settings"]["threads"] == 1
    assert (tmp_path / "out" / "bench.html").is_file()


def test_bench_exit_codes(tmp_path, capsys):
    bundle = make_bundle(tmp_path / "tiny", openvino=False)
    assert main(["bench", str(bundle), "--runtime", "onnxruntim", *FAST]) == EXIT_USAGE
    assert "did you mean 'onnxruntime'" in capsys.readouterr().err
    assert main(["bench", str(tmp_path), *FAST]) == EXIT_USAGE  # a dir without a manifest
    assert main(["bench", str(bundle), "--mlperf", "--seconds", "1"]) == EXIT_USAGE
    # nothing this bundle holds runs on tensorrt here
    assert main(["bench", str(bundle), "--runtime", "tensorrt", *FAST]) == EXIT_UNSUPPORTED
    (bundle / "onnx" / "model.onnx").write_bytes(b"junk")
    assert main(["bench", str(bundle), *FAST]) == EXIT_VERIFICATION
