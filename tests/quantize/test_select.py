"""Latency-aware selection per backend: the no-speed-up guard and the accuracy budget."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from edgerep.bench.latency import LatencyConfig
from edgerep.errors import ConfigError
from edgerep.quantize import OrtQuantConfig, OvQuantConfig, select_variant
from tests.quantize._digits import calib_feeds, export_onnx, trained_digits

U8 = OrtQuantConfig(types="U8S8")
S8 = OrtQuantConfig(types="S8S8")
DYN = OrtQuantConfig(mode="int8-dynamic")


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict:
    model, x_tr, x_te, y_te = trained_digits()
    path = export_onnx(model, tmp_path_factory.mktemp("digits") / "fp32.onnx")
    return {
        "path": path,
        "calib": calib_feeds(x_tr, 64),
        "eval": {"x": x_te.numpy()},
        "labels": y_te.numpy(),
    }


def _status(report: object) -> dict[str, str]:
    return {c.name: c.status for c in report.candidates}  # type: ignore[attr-defined]


def test_no_speedup_guard_never_ships_a_slower_variant(digits: dict, tmp_path: Path) -> None:
    # S8S8 slower than fp32 (as measured on this CPU), U8S8 only 1.1x faster
    given = {"fp32": 1.0, U8.name: 1.0 / 1.1, S8.name: 1.3, DYN.name: 2.0}
    chosen, report = select_variant(
        digits["path"],
        tmp_path,
        calib=digits["calib"],
        eval_feeds=digits["eval"],
        labels=digits["labels"],
        candidates=(U8, S8, DYN),
        latencies_ms=given,
    )
    assert report.chosen == "fp32" and report.latency_source == "given"
    assert _status(report) == {
        "fp32": "reference",
        U8.name: "no speed-up",
        S8.name: "no speed-up",
        DYN.name: "no speed-up",
    }
    assert chosen.read_bytes() == Path(digits["path"]).read_bytes()


def test_fastest_within_budget_wins(digits: dict, tmp_path: Path) -> None:
    given = {"fp32": 1.0, U8.name: 0.4, S8.name: 0.3}
    chosen, report = select_variant(
        digits["path"],
        tmp_path,
        calib=digits["calib"],
        eval_feeds=digits["eval"],
        labels=digits["labels"],
        candidates=(U8, S8),
        latencies_ms=given,
        max_drop=0.01,
    )
    assert report.chosen == S8.name and report.metric == "top1"
    assert all(c.drop <= 0.01 for c in report.candidates)
    assert chosen.read_bytes() == (tmp_path / f"{S8.name}.onnx").read_bytes()
    # a zero budget with agreement (no labels): any disagreeing variant is over budget
    _, strict = select_variant(
        digits["path"],
        tmp_path / "strict",
        calib=digits["calib"],
        eval_feeds=digits["eval"],
        candidates=(U8, S8),
        latencies_ms=given,
        max_drop=0.0,
    )
    assert strict.metric == "agreement"
    for c in strict.candidates[1:]:
        assert (c.status == "over budget") == (c.drop > 0), c
    assert strict.chosen in {c.name for c in strict.candidates if c.drop == 0} | {"fp32"}


def test_measured_latencies_path_runs(digits: dict, tmp_path: Path) -> None:
    quick = LatencyConfig(warmup_iters=2, warmup_seconds=0, min_iters=5, min_seconds=0, repeats=1)
    _, report = select_variant(
        digits["path"],
        tmp_path,
        calib=digits["calib"],
        eval_feeds=digits["eval"],
        candidates=(U8,),
        latency_config=quick,
    )
    assert report.latency_source == "measured"
    assert all(c.latency_ms > 0 and c.latency_spread >= 0 for c in report.candidates)
    assert report.chosen in {"fp32", U8.name}


def test_rejects_bad_budget_and_missing_latencies(digits: dict, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        select_variant(
            digits["path"],
            tmp_path,
            calib=[],
            eval_feeds=digits["eval"],
            candidates=(U8,),
            max_drop=5,
            min_speedup=0.5,
            latencies_ms={"fp32": 1.0},
        )
    msg = str(err.value)
    assert "max_drop" in msg and "min_speedup" in msg and U8.name in msg


HAVE_OV = importlib.util.find_spec("openvino") is not None and (
    importlib.util.find_spec("nncf") is not None
)
NO_OV = "openvino and nncf are not installed (edgerep[openvino])"
OV_INT8 = OvQuantConfig(mode="int8")
OV_W8 = OvQuantConfig(mode="w8")


@pytest.mark.skipif(not HAVE_OV, reason=NO_OV)
def test_openvino_selection_picks_the_fastest_within_budget(digits: dict, tmp_path: Path) -> None:
    # w8 is weight-only: decompression, no int8 compute, so no speed-up on a CPU
    given = {"fp32": 1.0, OV_INT8.name: 0.4, OV_W8.name: 0.95}
    chosen, report = select_variant(
        digits["path"],
        tmp_path,
        calib=digits["calib"],
        eval_feeds=digits["eval"],
        labels=digits["labels"],
        candidates=(OV_INT8, OV_W8),
        latencies_ms=given,
    )
    assert report.backend == "openvino" and report.threads == 1
    assert _status(report) == {
        "fp32": "reference",
        OV_INT8.name: "chosen",
        OV_W8.name: "no speed-up",
    }
    assert chosen == tmp_path / "model.xml"
    for suffix in (".xml", ".bin"):
        q = (tmp_path / f"{OV_INT8.name}{suffix}").read_bytes()
        assert chosen.with_suffix(suffix).read_bytes() == q
    ref = report.candidates[0]
    assert ref.path == tmp_path / "fp32.xml" and ref.precision == "fp32"  # the f32 hint ran
    int8 = report.candidates[1]
    assert int8.drop <= 0.01 and int8.metric > 0.9
    # a slower int8 (as on a CPU without int8 units) is never shipped
    slow = {**given, OV_INT8.name: 1.0 / 1.1}
    chosen, report = select_variant(
        digits["path"],
        tmp_path / "slow",
        calib=digits["calib"],
        eval_feeds=digits["eval"],
        labels=digits["labels"],
        candidates=(OV_INT8,),
        latencies_ms=slow,
    )
    assert report.chosen == "fp32" and _status(report)[OV_INT8.name] == "no speed-up"
    assert chosen.read_bytes() == (tmp_path / "slow" / "fp32.xml").read_bytes()


@pytest.mark.skipif(not HAVE_OV, reason=NO_OV)
def test_openvino_measured_latencies_and_int8_acc_candidate(digits: dict, tmp_path: Path) -> None:
    quick = LatencyConfig(warmup_iters=2, warmup_seconds=0, min_iters=5, min_seconds=0, repeats=1)
    acc = OvQuantConfig(mode="int8-acc", max_drop=0.01)
    _, report = select_variant(
        digits["path"],
        tmp_path,
        calib=digits["calib"],
        eval_feeds={"x": digits["eval"]["x"][:100]},
        candidates=(acc,),
        threads=2,
        latency_config=quick,
    )
    assert report.latency_source == "measured" and report.threads == 2
    assert report.metric == "agreement"  # int8-acc controlled agreement with fp32
    assert all(c.latency_ms > 0 and c.precision == "fp32" for c in report.candidates)
    assert report.candidates[1].drop <= 0.01 + 1e-12
    assert report.chosen in {"fp32", acc.name}


def test_backends_are_not_mixed_and_names_are_checked(digits: dict, tmp_path: Path) -> None:
    common = {"calib": [], "eval_feeds": digits["eval"]}
    with pytest.raises(ConfigError, match="once per backend"):
        select_variant(digits["path"], tmp_path, candidates=(U8, OV_INT8), **common)
    with pytest.raises(ConfigError, match="once per backend"):
        select_variant(digits["path"], tmp_path, candidates=(U8,), backend="openvino", **common)
    with pytest.raises(ConfigError, match="did you mean 'openvino'"):
        select_variant(digits["path"], tmp_path, backend="openvin", **common)
    with pytest.raises(ConfigError, match="no selection backend takes str"):
        select_variant(digits["path"], tmp_path, candidates=("int8",), **common)
    with pytest.raises(ConfigError, match="threads"):
        select_variant(digits["path"], tmp_path, candidates=(U8,), threads=0, **common)
    assert list(tmp_path.iterdir()) == []


def test_fixed_batch_model_is_scored_one_sample_at_a_time(digits: dict, tmp_path: Path) -> None:
    import torch

    from tests.quantize._digits import trained_digits

    model = trained_digits()[0]
    fixed = tmp_path / "fixed.onnx"
    torch.onnx.export(
        model, (torch.zeros(1, 1, 8, 8),), str(fixed), dynamo=False, input_names=["x"]
    )
    _, report = select_variant(
        fixed,
        tmp_path / "out",
        calib=digits["calib"],
        eval_feeds=digits["eval"],
        labels=digits["labels"],
        candidates=(U8,),
        latencies_ms={"fp32": 1.0, U8.name: 0.5},
    )
    fp32 = report.candidates[0]
    assert fp32.metric > 0.9 and report.chosen == U8.name


def test_near_ties_go_to_the_better_metric_then_the_better_sqnr(
    digits: dict, tmp_path: Path
) -> None:
    pt = OrtQuantConfig(types="U8S8", per_channel=False)
    _, report = select_variant(
        digits["path"],
        tmp_path,
        calib=digits["calib"],
        eval_feeds=digits["eval"],
        labels=digits["labels"],
        candidates=(pt, U8),  # per-tensor first: a plain max() would keep it on a full tie
        latencies_ms={"fp32": 1.0, pt.name: 0.5, U8.name: 0.505},  # within 3%: a tie
    )
    quantized = [c for c in report.candidates if c.status != "reference"]
    assert all(c.sqnr_db is not None and 0 < c.sqnr_db < float("inf") for c in quantized)
    assert report.candidates[0].sqnr_db == float("inf")
    best = max(quantized, key=lambda c: (c.metric, c.sqnr_db))
    assert report.chosen == best.name


def test_variants_are_timed_interleaved_in_alternating_order(
    digits: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a drift of the machine between variants must not favour the one timed last
    from edgerep.bench.latency import benchmark_latency
    from edgerep.quantize import _select

    order: list[int] = []

    def recording(fn, feeds, *, config):  # type: ignore[no-untyped-def]
        order.append(id(fn.__self__))
        return benchmark_latency(fn, feeds, config=config)

    monkeypatch.setattr(_select, "benchmark_latency", recording)
    backend = _select._backend_for(None, "onnxruntime")
    paths = {"a": digits["path"], "b": digits["path"], "c": digits["path"]}
    config = LatencyConfig(warmup_iters=1, min_iters=3, min_seconds=0.0, repeats=3)
    out = _select._time_interleaved(backend, paths, {"x": digits["eval"]["x"][:1]}, 1, config)
    assert set(out) == {"a", "b", "c"} and all(p50 > 0 for p50, _ in out.values())
    a, b, c = order[:3]
    assert len({a, b, c}) == 3
    assert order == [a, b, c, c, b, a, a, b, c]


def test_sqnr_floor_refuses_a_variant_far_from_float(digits: dict, tmp_path: Path) -> None:
    given = {"fp32": 1.0, U8.name: 0.5}
    common = dict(
        calib=digits["calib"],
        eval_feeds=digits["eval"],
        labels=digits["labels"],
        candidates=(U8,),
        latencies_ms=given,
    )
    _, loose = select_variant(digits["path"], tmp_path / "a", min_sqnr_db=20.0, **common)
    sqnr = loose.candidates[1].sqnr_db
    assert loose.chosen == U8.name and sqnr is not None and 20.0 < sqnr < 80.0
    _, strict = select_variant(digits["path"], tmp_path / "b", min_sqnr_db=sqnr + 1, **common)
    assert strict.chosen == "fp32" and _status(strict)[U8.name] == "low SQNR"
