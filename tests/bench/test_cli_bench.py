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


def test_bench_concurrency_precision_and_folder_options(tmp_path, capsys, monkeypatch):
    from edgerep.bench import suite
    from edgerep.bench.accuracy import Dataset

    bundle = make_bundle(tmp_path / "tiny")
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    seen = {}

    def fake_load_dataset(source, **kwargs):
        seen.update(kwargs, source=source)
        return Dataset(x, (x @ W + B).argmax(1), str(source))

    monkeypatch.setattr(suite, "load_dataset", fake_load_dataset)
    argv = ["bench", str(bundle), "--runtime", "onnxruntime,openvino", "--threads", "1",
            "--concurrency", "1,2", "--precision", "f32", "--data", str(tmp_path),
            "--image-size", "2x2", "--channels", "1", "--mean", "0.5", "--std", "0.25,0.5",
            "--json", *FAST]  # fmt: skip
    assert main(argv) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert seen == {
        "source": str(tmp_path), "image_size": (2, 2), "channels": 1, "mean": 0.5,
        "std": [0.25, 0.5],
    }  # fmt: skip
    assert report["settings"]["openvino_precision"] == "f32"
    assert report["settings"]["concurrency"] == [1, 2]
    rows = {r["runtime"]: r for r in report["rows"]}
    assert rows["openvino"]["session"]["inference_precision"] == "fp32"
    assert rows["openvino"]["latency"]["runtime"]["n"] > 0  # OpenVINO's own timer
    for row in rows.values():
        assert [t["concurrency"] for t in row["throughput"]] == [1, 2]
        assert all(t["inferences_per_s"] > 0 for t in row["throughput"]), row["throughput"]
        assert row["device_memory_bytes"] is None  # CPU
    assert "2 infer requests on" in rows["openvino"]["throughput"][1]["setup"]
    assert rows["onnxruntime"]["throughput"][1]["setup"] == "one session shared by 2 threads"
    # options that describe --data need it; numbers must parse
    assert main(["bench", str(bundle), "--image-size", "32", *FAST]) == EXIT_USAGE
    assert main(["bench", str(bundle), "--concurrency", "two", *FAST]) == EXIT_USAGE
    assert main(["bench", str(bundle), "--concurrency", "0", *FAST]) == EXIT_USAGE
