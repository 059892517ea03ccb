"""Third-party console noise is kept out of the way, our own warnings are not, -v shows it."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest

from edgerep._quiet import NOISY_LOGGERS, native_stderr_to_log, quiet_third_party


def test_noisy_loggers_quiet_unless_verbose(caplog):
    torchao = logging.getLogger("torchao.kernel.intmm")
    ours = logging.getLogger("edgerep.bench")
    before = logging.getLogger("torchao").level
    with caplog.at_level(logging.WARNING), quiet_third_party(0):
        torchao.warning("Warning: Detected no triton")
        ours.warning("our own warning")
        logging.getLogger("onnxruntime").warning("another library's warning")
    shown = [r.getMessage() for r in caplog.records]
    assert shown == ["our own warning", "another library's warning"]
    assert logging.getLogger("torchao").level == before  # restored
    caplog.clear()
    with caplog.at_level(logging.WARNING), quiet_third_party(1):
        torchao.warning("Warning: Detected no triton")
    assert [r.getMessage() for r in caplog.records] == ["Warning: Detected no triton"]


def test_cli_runs_commands_quietly(monkeypatch):
    from edgerep import cli

    seen = {}

    def probe(args):
        seen.update({n: logging.getLogger(n).getEffectiveLevel() for n in NOISY_LOGGERS})
        return 0

    monkeypatch.setattr(cli, "_dispatch", probe)
    assert cli.main(["list"]) == 0
    assert set(seen.values()) == {logging.ERROR}
    seen.clear()
    assert cli.main(["list", "-v"]) == 0
    assert logging.ERROR not in set(seen.values())


def test_native_lines_go_to_the_log_and_others_come_back(capfd, caplog):
    log = logging.getLogger("tests.quiet_probe")
    with (
        caplog.at_level(logging.DEBUG, logger="tests.quiet_probe"),
        native_stderr_to_log(log, what="probe"),
    ):
        os.write(2, b"[cpuinfo_utils.cpp:71] Reading file /sys/devices/soc0/image_version\n")
        os.write(2, b"E 00:00:00.000 a real native error\n")
    err = capfd.readouterr().err
    assert "cpuinfo_utils" not in err and "a real native error" in err
    assert any("cpuinfo_utils.cpp:71" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("executorch") is None, reason="executorch not installed"
)
def test_executorch_load_prints_nothing(tmp_path):
    """In a fresh process (torchao and the thread pool start once per process): loading a
    .pte under the CLI's settings prints none of torchao's or ExecuTorch's lines, and the
    CPU probe lines reach edgerep's debug log."""
    import torch

    from edgerep.exporters import get_exporter
    from edgerep.spec import parse_input_spec

    model = torch.nn.Linear(4, 2).eval()
    art = get_exporter("executorch").export(
        model, (torch.randn(1, 4),), [parse_input_spec("x:1x4")], tmp_path
    )
    script = textwrap.dedent(
        """
        import logging, sys
        from edgerep._quiet import quiet_third_party
        from edgerep.runtimes import get_runtime

        log = logging.getLogger("edgerep")  # as the CLI's -vv: its own handler, debug level
        log.addHandler(logging.StreamHandler(sys.stdout))
        log.setLevel(logging.DEBUG)
        log.propagate = False
        with quiet_third_party(0):
            get_runtime("executorch").load(sys.argv[1]).close()
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(art.path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    for noise in ("Failed to load", "Detected no triton", "cpuinfo_utils", "_pytree.py"):
        assert noise not in out.stderr, out.stderr[-2000:]
    assert "executorch (native stderr): [cpuinfo_utils.cpp" in out.stdout
