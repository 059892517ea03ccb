"""Report polish: readable plots, an honest "% peak" for low-precision rows."""

from __future__ import annotations

import itertools

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

from edgerep.bench.env import isa_flags
from edgerep.bench.plots import latency_figure, pareto_figure
from edgerep.bench.report import markdown_table
from edgerep.bench.roofline import measure_peak_gflops
from edgerep.errors import ConfigError, UnsupportedError


def _row(variant, runtime, samples, *, top1=0.96, precision=None, roofline=None):
    samples = np.asarray(samples, dtype=np.float64)
    return {
        "variant": variant,
        "runtime": runtime,
        "format": "onnx",
        "session": {"inference_precision": precision} if precision else {},
        "latency": {
            "stats": {
                "n": len(samples),
                "p50_ms": float(np.median(samples)),
                "p99_ms": float(np.percentile(samples, 99)),
            },
            "p50_ci_ms": [None, None],
            "p50_spread": 0.01,
            "unstable": False,
        },
        "accuracy": {"top1": top1, "samples": 450},
        "reference": None,
        "roofline": roofline,
        "samples_ms": [float(v) for v in samples],
    }


def _tailed(p50, rng, tail=40.0):
    """Tight around p50 with a 3% tail up to `tail` x p50 (a busy machine's p99)."""
    body = p50 * (1 + 0.05 * rng.random(970))
    return np.concatenate([body, p50 * tail * rng.random(30) + p50])


@pytest.fixture
def tied_report():
    """Four rows with equal accuracy, two of them 1% apart in latency (the demo's case)."""
    rng = np.random.default_rng(0)
    rows = [
        _row("unfolded", "onnxruntime", _tailed(0.113, rng)),
        _row("folded", "executorch", _tailed(0.060, rng, tail=4)),
        _row("folded", "onnxruntime", _tailed(0.0450, rng)),
        _row("folded", "openvino", _tailed(0.0455, rng), precision="bf16"),
    ]
    return {"rows": rows, "settings": {}, "environment": {}}


def test_latency_axis_is_log_and_every_box_readable(tied_report):
    fig = latency_figure(tied_report)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"  # p99 tails 40x the p50: a linear axis hides the boxes
    fig.canvas.draw()
    # each box (p25..p75, a few % of its p50) must be wider than a couple of pixels
    boxes = [line for line in ax.lines if len(line.get_xdata()) == 5]
    assert len(boxes) == 4
    for box in boxes:
        xs = ax.transData.transform(np.c_[box.get_xdata(), box.get_ydata()])[:, 0]
        assert xs.max() - xs.min() > 3, "a box was squeezed to a line"
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert labels and all("10^" not in t and "$" not in t for t in labels)  # plain ms
    assert "log scale" in ax.get_xlabel()


def test_latency_axis_stays_linear_for_a_narrow_range():
    rng = np.random.default_rng(1)
    report = {"rows": [_row("a", "onnxruntime", 1 + 0.1 * rng.random(100))]}
    assert latency_figure(report).axes[0].get_xscale() == "linear"


def test_pareto_front_shows_when_all_points_tie(tied_report):
    fig = pareto_figure(tied_report)
    ax = fig.axes[0]
    legend = ax.get_legend()
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts[0].startswith("Pareto front (1 of 4")
    handle = legend.legend_handles[0]
    # the legend entry and the plotted front are visible even for a single point
    assert handle.get_marker() not in ("None", "", " ", None) and handle.get_markersize() > 0
    front = next(line for line in ax.lines if line.get_label().startswith("Pareto front"))
    assert list(front.get_xdata()) == [pytest.approx(0.0450 * 1.025, rel=0.03)]
    # every row is named in the legend (not in the plot, where names overlap)
    assert [t.split(": ", 1)[1] for t in texts[1:]] == [
        "unfolded / onnxruntime",
        "folded / executorch",
        "folded / onnxruntime",
        "folded / openvino (bf16)",
    ]


def test_pareto_labels_do_not_overlap(tied_report):
    # eight points, several within 1% of each other in latency and equal in accuracy
    rng = np.random.default_rng(2)
    rows = tied_report["rows"] + [
        _row(f"v{i}", "onnxruntime", _tailed(0.045 * (1 + 0.003 * i), rng)) for i in range(4)
    ]
    fig = pareto_figure({"rows": rows})
    ax = fig.axes[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    numbers = [t for t in ax.texts if t.get_text().isdigit()]
    assert len(numbers) == 8
    boxes = [t.get_window_extent(renderer) for t in numbers]
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b)


def test_peak_column_names_the_peak_a_low_precision_row_is_divided_by(tied_report):
    roof = {"fraction_of_peak": 0.906, "peak_precision": "fp32", "compute_precision": "fp32"}
    rows = tied_report["rows"]
    rows[2]["roofline"] = roof
    rows[3]["roofline"] = {**roof, "fraction_of_peak": 0.199, "peak_precision": "bf16"}
    rows[3]["roofline"]["compute_precision"] = "bf16"
    rows[1]["roofline"] = {**roof, "fraction_of_peak": 0.49, "compute_precision": "int8"}
    table = markdown_table(tied_report)
    lines = table.splitlines()
    assert lines[4].endswith("| 90.6% |")
    assert lines[5].endswith("| 19.9% of bf16 |")
    assert lines[3].endswith("| 49.0% of fp32 (computes int8) |")
    assert "OpenVINO's CPU MatMul" in table and "not to X's own" in table


def test_low_precision_peak(tmp_path):
    cache = tmp_path / "peak.json"
    fp32 = measure_peak_gflops(threads=1, size=64, seconds=0.01, cache=cache)
    assert fp32["precision"] == "fp32"
    flags = set(isa_flags())
    if flags & {"amx_bf16", "avx512_bf16"}:
        bf16 = measure_peak_gflops(threads=1, size=64, seconds=0.05, cache=cache, precision="bf16")
        assert bf16["precision"] == "bf16" and bf16["gflops"] > 0 and bf16["size"] == 128
        assert bf16["key"].endswith("|bf16") and bf16["key"] != fp32["key"]
        again = measure_peak_gflops(threads=1, size=64, seconds=0.05, cache=cache, precision="bf16")
        assert again["cached"] and again["gflops"] == bf16["gflops"]
    else:  # OpenVINO computes a bf16 hint in f32 on such CPUs: no bf16 peak to claim
        with pytest.raises(UnsupportedError, match="bf16"):
            measure_peak_gflops(threads=1, size=64, seconds=0.01, cache=cache, precision="bf16")
    with pytest.raises(ConfigError, match="int4"):
        measure_peak_gflops(cache=cache, precision="int4")


def test_load_ms_excludes_importing_the_runtime(tmp_path):
    """A runtime whose first use imports a heavy package: "load ms" is the load only."""
    import time

    from edgerep.bench.suite import _timed_load

    class SlowImport:
        imported = False

        def capabilities(self, device):
            if not self.imported:
                time.sleep(0.3)  # the package import
                self.imported = True
            return {}

        def load(self, path, *, device, options):
            self.capabilities(device)  # as ExecuTorchRuntime.load does
            return "session"

    session, load_ms = _timed_load(SlowImport(), tmp_path / "m", device="cpu", options={})
    assert session == "session" and load_ms < 150


def test_an_f16_session_is_divided_by_the_f16_peak():
    # OpenVINO sessions report edgerep's names (runtimes.openvino.precision_name): an
    # f16 hint comes back as "fp16", which must select the fp16 peak, not fp32's
    from edgerep.bench.suite import _compute_precision
    from edgerep.runtimes.openvino import precision_name

    for ov_name in ("f16", "bf16"):
        name = precision_name(ov_name)
        assert _compute_precision("fp32", {"inference_precision": name}) == name
    assert _compute_precision("fp32", {"inference_precision": "fp32"}) == "fp32"
