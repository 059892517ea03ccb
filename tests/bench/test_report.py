"""Reports from a real (tiny) run: files exist, JSON validates, the HTML embeds its plots."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgerep.bench.env import environment_fingerprint, isa_flags
from edgerep.bench.latency import LatencyConfig
from edgerep.bench.report import REPORT_SCHEMA_VERSION, pareto_front, validate_report, write_report
from edgerep.bench.roofline import measure_peak_gflops, roofline
from edgerep.bench.suite import run_bench
from edgerep.errors import ConfigError
from tests._tiny_bundle import B, W, make_bundle

FAST = LatencyConfig(
    warmup_iters=2, warmup_seconds=0.0, min_iters=10, min_seconds=0.0, bootstrap_samples=50
)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    bundle = make_bundle(root / "tiny")
    x = np.random.default_rng(0).standard_normal((12, 4)).astype(np.float32)
    np.savez(root / "data.npz", x=x, y=(x @ W + B).argmax(1))
    return run_bench(
        [str(bundle), f"again={bundle}"],
        runtimes=["onnxruntime", "openvino"],
        data=str(root / "data.npz"),
        metrics=["top1", "top5"],
        config=FAST,
        threads=1,
        roofline=False,
    )


def test_rows_and_reference(report):
    assert report["schema_version"] == REPORT_SCHEMA_VERSION
    assert [(r["variant"], r["runtime"]) for r in report["rows"]] == [
        ("tiny", "onnxruntime"),
        ("tiny", "openvino"),
        ("again", "onnxruntime"),
        ("again", "openvino"),
    ]
    first, *rest = report["rows"]
    assert first["reference"] is None  # the reference row
    for row in report["rows"]:
        assert row["accuracy"]["top1"] == 1.0 and row["accuracy"]["samples"] == 12
        assert row["latency"]["stats"]["n"] == 30 and row["latency"]["load_ms"] > 0
    for row in rest:
        assert row["reference"]["output_0"]["top1_agreement"] == 1.0
    assert report["errors"] == []
    assert report["environment"]["threads"] == 1


def test_write_report(report, tmp_path):
    paths = write_report(report, tmp_path / "out")
    assert all(p.is_file() for p in paths.values())
    data = json.loads(paths["json"].read_text())
    assert validate_report(data) == []
    page = paths["html"].read_text()
    assert page.count("src='data:image/png;base64,") == 2
    assert "id='plot-latency'" in page and "id='plot-pareto'" in page
    md = paths["markdown"].read_text()
    assert md.count("| tiny |") == 2 and "| again | openvino" in md
    bad = {**data, "schema_version": 99}
    assert validate_report(bad)
    with pytest.raises(ConfigError, match="schema"):
        write_report({**data, "rows": [{"variant": "x"}]}, tmp_path / "bad")


def test_tables_name_the_reference_row(report, tmp_path):
    """'top-1 agree' is against the first row measured: the tables say which it is."""
    from edgerep.bench.report import markdown_table

    md = markdown_table(report)
    first = next(line for line in md.splitlines() if line.startswith("| tiny | onnxruntime"))
    assert first.count("(reference)") == 2  # top-1 agree and max rel err
    assert md.count("(reference)") == 2
    assert "against the reference row tiny / onnxruntime" in md
    assert "on every sample of the data" in md
    page = write_report(report, tmp_path / "out")["html"].read_text()
    assert "<td>(reference)</td>" in page and "against the reference row tiny" in page


def test_pareto_front():
    pts = [(1.0, 0.5), (2.0, 0.9), (3.0, 0.8), (0.5, 0.4), (2.0, 0.9)]
    assert pareto_front(pts) == [3, 0, 1, 4]  # (3.0, 0.8) is dominated; ties both stay


def test_roofline_and_peak_cache(tmp_path):
    cache = tmp_path / "peak.json"
    first = measure_peak_gflops(threads=1, size=64, seconds=0.01, cache=cache)
    assert first["gflops"] > 0 and not first["cached"]
    again = measure_peak_gflops(threads=1, size=64, seconds=0.01, cache=cache)
    assert again["cached"] and again["gflops"] == first["gflops"]
    r = roofline(2_000_000_000, 10.0, 400.0, bytes_=1_000_000)
    assert r.achieved_gflops == pytest.approx(200.0) and r.fraction_of_peak == pytest.approx(0.5)
    assert r.arithmetic_intensity == pytest.approx(2000.0)
    with pytest.raises(ConfigError):
        roofline(1, 0.0, 1.0)


def test_roofline_counts_a_torch_model():
    import torch

    from edgerep.bench.roofline import activation_and_param_bytes, count_flops

    lin = torch.nn.Linear(4, 3)
    x = (torch.zeros(2, 4),)
    assert count_flops(lin, x) == 2 * 2 * 4 * 3
    params, acts = activation_and_param_bytes(lin, x)
    assert params == (12 + 3) * 4 and acts == (8 + 6) * 4


def test_environment_fingerprint():
    text = "processor: 0\nflags\t: fpu sse4_2 avx2 avx512f avx512_bf16 amx_tile smep\n"
    assert isa_flags(text) == ["amx_tile", "avx2", "avx512_bf16", "avx512f", "sse4_2"]
    assert isa_flags("Features\t: fp asimd asimddp sve i8mm\n") == [
        "asimd",
        "asimddp",
        "i8mm",
        "sve",
    ]
    env = environment_fingerprint(threads=2)
    assert env["threads"] == 2 and "onnxruntime" in env["packages"]
    assert isinstance(env["isa_flags"], list) and env["python"]
    json.dumps(env)


def test_runtime_label_names_the_precision_that_ran():
    from edgerep.bench.report import _runtime_label

    assert _runtime_label({"runtime": "openvino", "session": {"inference_precision": "bf16"}}) == (
        "openvino (bf16)"
    )
    assert _runtime_label({"runtime": "onnxruntime", "session": {}}) == "onnxruntime"
