"""Pruning flags that would be silently ignored are refused, each named, before the model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgerep import cli
from edgerep.cli import EXIT_OK, EXIT_USAGE, main
from tests.prune.test_cli_prune import _files


@pytest.fixture
def argv(tmp_path, monkeypatch):
    def loaded(*_a, **_k):
        raise AssertionError("the model was loaded before the usage error")

    monkeypatch.setattr(cli, "_load", loaded)
    src, data = _files(tmp_path)
    (tmp_path / "plan.json").write_text("{}")
    return {
        "src": src,
        "data": data,
        "out": str(tmp_path / "o"),
        "plan": str(tmp_path / "plan.json"),
    }


def _loads(args: list[str], capsys) -> None:
    """`args` pass every usage check: the run reaches the model load (stubbed to fail)."""
    main(args)
    err = capsys.readouterr().err
    assert "the model was loaded before the usage error" in err, (args, err)


def _refused(args: list[str], message: str, capsys, out: str) -> None:
    code = main(args)
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, (args, err)
    assert message in err, (args, err)
    assert not Path(out).exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target", "macs=0.5", "--seconds", "2"], "--seconds times the bundles of --sweep"),
        (
            ["--target", "macs=0.5", "--seconds", "1", "--repeats", "3"],
            "--seconds, --repeats time the bundles of --sweep",
        ),
        (
            ["--target", "macs=0.5", "--depth-error", "0.2"],
            "--depth-error only bounds depth pruning, which --method channels does not run; add "
            "depth to --method (e.g. --method channels,depth)",
        ),
        (
            ["--target", "macs=0.5", "--depth-blocks", "2", "--depth-error", "0.2"],
            "--depth-blocks, --depth-error only bound depth pruning",
        ),
        (
            ["--method", "depth", "--calib", "DATA", "--rank-error", "0.1"],
            "--rank-error only bounds rank pruning, which --method depth does not run",
        ),
        (["--plan", "PLAN", "--depth-blocks", "1"], "--plan re-applies the saved channel, depth"),
    ],
)
def test_prune_flags_without_their_method_or_sweep(argv, capsys, extra, message) -> None:
    extra = [argv["data"] if a == "DATA" else argv["plan"] if a == "PLAN" else a for a in extra]
    _refused(["prune", argv["src"], "-o", argv["out"], *extra], message, capsys, argv["out"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prune-depth-error", "0.2"], "--prune-depth-error applies to pruning, which this"),
        (
            ["--prune-rank-error", "0.1", "--prune-depth-blocks", "1"],
            "--prune-depth-blocks, --prune-rank-error apply to pruning",
        ),
        (["--prune-method", "channels"], "--prune-method applies to pruning"),
        (["--prune-importance", "l2"], "--prune-importance applies to pruning"),
        (["--prune-keep", "stem"], "--prune-keep applies to pruning"),
        (["--prune-backend", "openvino"], "add --prune TARGET (or --prune-method depth / rank)"),
        (
            ["--prune", "macs=0.5", "--prune-rank-error", "0.1"],
            "--prune-rank-error only bounds rank pruning, which --prune-method channels does not",
        ),
        (
            ["--prune-method", "rank", "--prune-depth-blocks", "1"],
            "--prune-depth-blocks only bounds depth pruning, which --prune-method rank does not "
            "run; add depth to --prune-method (e.g. --prune-method rank,depth)",
        ),
    ],
)
def test_convert_prune_flags_without_pruning_or_their_method(argv, capsys, extra, message) -> None:
    args = ["convert", argv["src"], "--to", "onnx", "--calib", argv["data"], "-o", argv["out"]]
    _refused([*args, *extra], message, capsys, argv["out"])


#: every search option, each with a value that is valid on its own
_SEARCH = [
    "--importance", "l1", "--keep", "2", "--min-ratio", "0.9", "--backend", "openvino",
    "--threads", "4", "--recovery", "ls", "--cache-dir", "CACHE", "--latency-input",
    "x:1x3x64x64", "--method", "channels", "--depth-error", "0.2", "--rank-error", "0.1",
    "--depth-blocks", "1", "--finetune", "ft.py:fn", "--finetune-data", "DATA",
    "--seconds", "1", "--repeats", "2", "--sweep", "0.5",
]  # fmt: skip


@pytest.mark.parametrize("target", [[], ["--target", "latency=0.3"]])
def test_plan_refuses_every_search_option(argv, capsys, tmp_path, target) -> None:
    """--plan replays the saved decisions: an option of a new search is refused, all
    named at once (it used to run and ignore them)."""
    cache = tmp_path / "cache"
    extra = [
        str(cache) if a == "CACHE" else argv["data"] if a == "DATA" else a
        for a in [*target, *_SEARCH]
    ]
    args = ["prune", argv["src"], "--plan", argv["plan"], "--calib", argv["data"], *extra]
    _refused([*args, "-o", argv["out"]], "--plan re-applies the saved", capsys, argv["out"])
    main([*args, "-o", argv["out"]])
    err = capsys.readouterr().err
    flags = [a for a in extra if a.startswith("--")]
    named = err.split("reads none of ", 1)[1].split(" (they set up", 1)[0].split(", ")
    assert sorted(named) == sorted(flags), err
    assert not cache.exists()
    # what the replay reads is accepted: the model is loaded
    keep = ["--to", "onnx", "--no-fold", "--force", "--json", "--calib-samples", "8"]
    _loads(["prune", argv["src"], "--plan", argv["plan"], "-o", argv["out"], *keep], capsys)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--method", "rank", "--importance", "l1", "--min-ratio", "0.5", "--recovery",
             "mean", "--calib", "DATA"],
            "--importance, --min-ratio, --recovery only bound channels pruning, which --method "
            "rank does not run; add channels to --method (e.g. --method rank,channels)",
        ),
        (
            ["--method", "depth,rank", "--calib", "DATA", "--recovery", "none"],
            "--recovery only bounds channels pruning, which --method depth,rank does not run",
        ),
        (["--method", "rank", "--importance", "taylor"], "--importance only bounds channels"),
        (
            ["--target", "macs=0.5", "--cache-dir", "CACHE"],
            "--cache-dir caches the per-layer latency tables, which only a latency target or "
            "depth / rank pruning builds; --target macs=0.5 counts macs and builds none",
        ),
        (["--target", "widths=0:8", "--cache-dir", "CACHE"], "--target widths=0:8 counts"),
    ],
)  # fmt: skip
def test_channel_options_without_channels_and_a_cache_without_tables(
    argv, capsys, tmp_path, extra, message
) -> None:
    cache = tmp_path / "cache"
    extra = [argv["data"] if a == "DATA" else str(cache) if a == "CACHE" else a for a in extra]
    _refused(["prune", argv["src"], "-o", argv["out"], *extra], message, capsys, argv["out"])
    main(["prune", argv["src"], "-o", argv["out"], *extra])
    # refused for what it is, not for the data a method that never reads it would need
    assert "taylor importance" not in capsys.readouterr().err
    assert not cache.exists()


@pytest.mark.parametrize(
    "extra",
    [
        ["--target", "latency=0.5", "--cache-dir", "CACHE"],
        ["--method", "rank", "--cache-dir", "CACHE"],
        ["--method", "channels,depth", "--target", "macs=0.5", "--cache-dir", "CACHE"],
        ["--method", "rank,channels", "--target", "params=0.5", "--importance", "l1"],
        ["--target", "macs=0.5", "--min-ratio", "0.5", "--recovery", "mean"],
    ],
)
def test_options_that_are_read_pass_the_check(argv, capsys, tmp_path, extra) -> None:
    """The refusals above match exactly where the options are read: a cache with a
    latency target or depth / rank pruning (both build latency tables) is accepted."""
    extra = [str(tmp_path / "cache") if a == "CACHE" else a for a in extra]
    _loads(["prune", argv["src"], "--calib", argv["data"], "-o", argv["out"], *extra], capsys)


def test_search_options_left_out_keep_their_defaults(argv) -> None:
    """The search options default to None (so that --plan sees them given); the values
    used when they are left out are those documented."""
    from edgerep.prune._cli import _options

    args = cli._parser().parse_args(["prune", argv["src"], "--target", "macs=0.5", "-o", "o"])
    opts = _options(args, ["openvino"], specs=None, data=None)
    assert (opts.backend, opts.importance, opts.method, opts.threads, opts.min_ratio) == (
        "onnxruntime",
        "l2",
        "channels",
        1,
        0.125,
    )
    assert (opts.recovery, opts.cache_dir, opts.keep, opts.depth_error) == (None, None, (), 0.1)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--prune-method", "rank", "--prune-importance", "l1", "--prune-recovery", "mean"],
            "--prune-importance, --prune-recovery only bound channels pruning, which "
            "--prune-method rank does not run",
        ),
        (
            ["--prune", "params=0.5", "--prune-cache-dir", "CACHE"],
            "--prune-cache-dir caches the per-layer latency tables, which only a latency target "
            "or depth / rank pruning builds; --prune params=0.5 counts params",
        ),
    ],
)
def test_convert_channel_options_and_cache_dir(argv, capsys, tmp_path, extra, message) -> None:
    cache = tmp_path / "cache"
    extra = [str(cache) if a == "CACHE" else a for a in extra]
    args = ["convert", argv["src"], "--to", "onnx", "--calib", argv["data"], "-o", argv["out"]]
    _refused([*args, *extra], message, capsys, argv["out"])
    assert not cache.exists()


def test_a_sweep_with_a_missed_target_exits_7_and_writes_every_bundle(
    tmp_path, capsys, monkeypatch, torchscript_onnx
) -> None:
    """As for one target (test_cli_prune), the backend is a table: layer cost = MACs and
    every pruned model 0.9 of the unpruned p50, so latency=0.3 misses and 0.95 is met."""
    from edgerep.cli import EXIT_TARGET_MISSED
    from edgerep.prune import _engine, _latency

    monkeypatch.setattr(
        _latency.LatencyTables, "ms", lambda self, shapes: [s.macs() * 1e-6 for s in shapes]
    )
    monkeypatch.setattr(_engine, "measure_pair", lambda *a, **k: (1.0, 0.9))
    src, data = _files(tmp_path)
    out = tmp_path / "sweep"
    argv = ["prune", src, "--target", "latency=0.5", "--sweep", "0.3,0.95", "--calib", data]
    argv += ["--seconds", "0.02", "--repeats", "1", "-o", str(out)]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == EXIT_TARGET_MISSED == 7, err
    assert "1 of 2 sweep targets missed: latency=0.3 (reached 0.900)" in err
    for name in ("unpruned", "latency-0.3", "latency-0.95"):
        assert (out / name / "manifest.json").is_file(), name
    bench = json.loads((out / "bench" / "bench.json").read_text())
    status = {v["variant"]: v["status"] for v in bench["pruning"]["variants"]}
    assert status == {"latency-0.3": "missed", "latency-0.95": "met"}
    # every target met: exit 0
    argv[5], argv[-1] = "0.95", str(tmp_path / "met")
    assert main(argv) == EXIT_OK, capsys.readouterr().err
    # convert --prune --sweep reports a miss the same way
    conv = tmp_path / "conv"
    argv = ["convert", src, "--prune", "latency=0.3", "--sweep", "0.3", "--calib", data]
    code = main([*argv, "--seconds", "0.02", "--repeats", "1", "-o", str(conv)])
    assert code == EXIT_TARGET_MISSED, capsys.readouterr().err
    assert (conv / "latency-0.3" / "prune_report.json").is_file()
