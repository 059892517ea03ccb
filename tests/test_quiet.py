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


def test_coremltools_import_lines_filtered_its_other_warnings_kept(caplog):
    """Only the known import-time lines of the ``coremltools`` logger are dropped (its
    conversion warnings stay); -v shows them all; the filter is removed afterwards."""
    ct_log = logging.getLogger("coremltools")
    noise = [
        "Failed to load _MLModelProxy: No module named 'coremltools.libcoremlpython'",
        "Failed to load _MLNeuralEngineComputeDeviceProxy: No module named 'x'",
        "scikit-learn version 1.9.1 is not supported. Minimum required version: 0.17.",
        "Torch version 2.13.0+cpu has not been tested with coremltools. You may run into",
    ]
    kept = "Tuple detected at graph output. This will be flattened in the converted model."
    with caplog.at_level(logging.WARNING), quiet_third_party(0):
        for line in [*noise, kept]:
            ct_log.warning(line)
    assert [r.getMessage() for r in caplog.records] == [kept]
    assert not ct_log.filters
    caplog.clear()
    with caplog.at_level(logging.WARNING), quiet_third_party(1):
        for line in noise:
            ct_log.warning(line)
    assert [r.getMessage() for r in caplog.records] == noise


def _tiny_coreml_bundle(directory):
    """y = x @ W + b on x[1, 16] built with coremltools' MIL builder (no torch export)."""
    import numpy as np

    ct = pytest.importorskip("coremltools")
    from coremltools.converters.mil import Builder as mb

    from edgerep.bundle import sha256_file, write_manifest

    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 16)).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 16))], opset_version=ct.target.iOS15)
    def prog(x):
        return mb.linear(x=x, weight=w, bias=b, name="output")

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS15)
    model.save(str(directory / "coreml" / "model.mlpackage"))
    root = directory / "coreml" / "model.mlpackage"
    files = sorted(str(p.relative_to(directory)) for p in root.rglob("*") if p.is_file())
    rel = "coreml/model.mlpackage/Manifest.json"
    write_manifest(
        directory,
        {
            "inputs": [{"name": "x", "shape": [1, 16], "dtype": "float32"}],
            "outputs": [{"name": "output", "shape": [1, 16], "dtype": "float32"}],
            "artifacts": [
                {
                    "format": "coreml",
                    "file": rel,
                    "precision": "fp32",
                    "status": "verified",
                    "sha256": sha256_file(directory / rel),
                    "tool_versions": {},
                    "parity": {},
                    "files": files,
                }
            ],
            "ledger": [],
        },
    )
    return directory


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("scipy") is None, reason="scipy not installed"
)
def test_coreml_bench_prints_no_chatter_and_load_excludes_the_import(tmp_path):
    """In a fresh process (coremltools logs once, at import): ``edgerep bench`` of a Core
    ML bundle writes none of coremltools' import lines to stderr, and the reference
    runtime's load (the timed part) imports no coremltools module: the import happened
    before the timer (structural, not a timing threshold)."""
    bundle = _tiny_coreml_bundle(tmp_path / "b")
    script = textwrap.dedent(
        """
        import json, sys
        from edgerep import cli
        from edgerep.runtimes.coreml_reference import CoreMLReferenceRuntime

        load = CoreMLReferenceRuntime.load
        seen = {}

        def probe(self, *args, **kwargs):
            def ct():
                return {m for m in sys.modules if m.split(".")[0] == "coremltools"}

            before = ct()
            try:
                return load(self, *args, **kwargs)
            finally:
                seen["before"] = len(before)
                seen["imported_by_load"] = sorted(ct() - before)

        CoreMLReferenceRuntime.load = probe
        rc = cli.main(["bench", sys.argv[1], "--runtime", "coreml-reference", "--out",
                       sys.argv[2], "--no-roofline", "--no-progress", "--min-iters", "5",
                       "--seconds", "0", "--warmup", "1", "--repeats", "1"])
        print(json.dumps({"rc": rc, **seen}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(bundle), str(tmp_path / "rep")],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    seen = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    assert seen["rc"] == 0, out.stderr[-2000:]
    for noise in ("Failed to load", "is not supported", "has not been tested", "_pytree.py"):
        assert noise not in out.stderr, out.stderr[-2000:]
    assert seen["before"] > 0 and seen["imported_by_load"] == []
    report = __import__("json").loads((tmp_path / "rep" / "bench.json").read_text())
    assert [r["runtime"] for r in report["rows"]] == ["coreml-reference"]
