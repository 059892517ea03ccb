"""`python -m edgerep.demo`: end to end with a tiny budget, and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgerep.demo import VARIANTS, main

pytest.importorskip("sklearn", reason="the demo data comes from scikit-learn")
pytest.importorskip("onnxruntime", reason="the demo verifies and times the ONNX models")


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(
        [
            "--out",
            str(out),
            "--seconds",
            "0.5",
            "--lora-seconds",
            "0.5",
            "--latency-seconds",
            "0.05",
            "--quantize",
            "int8",
            "--prune",
            "macs=0.6",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err

    for variant in ("folded", "unfolded"):
        assert (out / variant / "manifest.json").is_file()
        assert (out / variant / "onnx" / "model.onnx").is_file()
    assert (out / "demo_net.pt").is_file()
    assert (out / "summary.txt").read_text().strip() == captured.out.strip()

    quantized_row = "onnxruntime folded int8 "
    rows = [
        line
        for line in captured.out.splitlines()
        if line.startswith(VARIANTS) and not line.startswith(quantized_row)
    ]
    # --prune: convert --prune into pruned/, its ledger records the loss, then quantized too
    assert "prune macs=0.6: met" in captured.out and "lossy:" in captured.out
    manifest = json.loads((out / "pruned" / "manifest.json").read_text())
    assert any(r["stage"] == "prune" and r["action"] == "lossy" for r in manifest["ledger"])
    assert (out / "pruned-quantized" / "quantize_report.json").is_file()
    assert [next(v for v in VARIANTS if r.startswith(v + " ")) for r in rows] == list(VARIANTS)
    lora = [line for line in captured.out.splitlines() if line.startswith("LoRA fine-tune")]
    assert len(lora) == 1 and "on 2 layers" in lora[0] and "edgerep.merge" in lora[0]
    assert "fold report:" in captured.out
    # the bench step: every backend that runs here, with accuracy and % of peak, one report
    assert (out / "bench" / "bench.html").is_file() and (out / "bench" / "bench.json").is_file()
    bench = json.loads((out / "bench" / "bench.json").read_text())
    # the report names the files where they are now, not the run's temporary directory
    assert bench["settings"]["data"] == str((out / "digits_test.npz").resolve())
    assert {r["bundle"] for r in bench["rows"]} <= {
        str((out / name).resolve())
        for name in ("folded", "unfolded", "folded-quantized", "pruned-quantized")
    }
    assert "pruned" in {r["variant"] for r in bench["rows"]}
    assert all(Path(r["bundle"]).is_dir() for r in bench["rows"])
    assert ".tmp-" not in (out / "bench" / "bench.json").read_text()
    runtimes = {(r["variant"], r["runtime"]) for r in bench["rows"]}
    assert {("folded", "onnxruntime"), ("folded", "openvino"), ("folded", "executorch")} <= runtimes
    assert "max fold error (float64" in captured.out
    assert "float32 max abs difference" in captured.out

    # the quantize step: every candidate measured and reported; a variant is in the table
    # only if it was chosen (faster by 1.15x and within one point of top-1)
    assert "quantize: mode int8" in captured.out
    quantized = json.loads((out / "folded-quantized" / "quantize_report.json").read_text())
    ort = next(b for b in quantized["backends"] if b["backend"] == "onnxruntime")
    assert {c["name"] for c in ort["selection"]["candidates"]} >= {"fp32", "int8-U8S8-pc"}

    results = json.loads((out / "demo.json").read_text())
    by_name = {r["variant"]: r for r in results["rows"]}
    pruned = by_name.pop("onnxruntime pruned macs=0.6")
    assert pruned["flops"] <= 0.6 * by_name["onnxruntime folded"]["flops"] + 1
    assert pruned["params"] < by_name["onnxruntime folded"]["params"]
    assert pruned["latency"]["p50_ms"] > 0 and 0 <= pruned["accuracy"] <= 1
    pruned_q = json.loads((out / "pruned-quantized" / "quantize_report.json").read_text())
    ort_q = next(b for b in pruned_q["backends"] if b["backend"] == "onnxruntime")
    assert ("onnxruntime pruned int8" in by_name) == (ort_q["artifact"] is not None)
    by_name.pop("onnxruntime pruned int8", None)
    int8 = by_name.pop("onnxruntime folded int8", None)
    assert (int8 is not None) == (ort["artifact"] is not None)
    if int8 is not None:
        assert int8["accuracy"] >= by_name["onnxruntime folded"]["accuracy"] - 0.01 - 1e-12
    results["rows"] = [r for r in results["rows"] if r["variant"] in VARIANTS]
    assert list(by_name) == list(VARIANTS)
    assert by_name["torch folded"]["params"] < by_name["torch unfolded"]["params"]
    assert by_name["torch folded"]["flops"] < by_name["torch unfolded"]["flops"]
    assert results["max_fold_error_float64"] <= 1e-9
    scale = results["float32_max_abs_output"]
    for diff in results["float32_max_abs_diff_folded_vs_unfolded"].values():
        assert diff <= 1e-4 * scale
    # folding and export change no prediction beyond a near-tie (at most one test image)
    accuracies = [r["accuracy"] for r in results["rows"]]
    assert max(accuracies) - min(accuracies) <= 1 / results["settings"]["test_images"] + 1e-12
    for row in results["rows"]:
        assert row["latency"]["p50_ms"] > 0


def test_demo_refuses_an_unrelated_directory(tmp_path, capsys):
    keep = tmp_path / "mine.txt"
    keep.write_text("not a demo output")
    rc = main(["--out", str(tmp_path), "--seconds", "0.5"])
    assert rc == 2
    assert "is not the output of an earlier demo" in capsys.readouterr().err
    assert keep.read_text() == "not a demo output"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seconds", "0"], "--seconds"),
        (["--threads", "0"], "--threads"),
        (["--quantize", "int4"], "not a mode"),
        (["--prune", "latency=1.2"], "impossible"),
    ],
)
def test_demo_rejects_bad_options(tmp_path, capsys, args, message):
    rc = main(["--out", str(tmp_path / "new"), *args])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
