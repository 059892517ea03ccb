"""Pruning flags that would be silently ignored are refused, each named, before the model loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgerep import cli
from edgerep.cli import EXIT_USAGE, main
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
        (["--plan", "PLAN", "--depth-blocks", "1"], "--plan re-applies the saved depth/rank"),
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
