"""Fault injection for what `edgerep list` claims: a format whose runtime cannot run here
is not called ready (TensorRT was "installed" as a format and "not installed" as a runtime)."""

from __future__ import annotations

import json

from edgerep.cli import EXIT_OK, main
from edgerep.parity import REFERENCE_RUNTIMES
from edgerep.runtimes import get_runtime


def test_list_never_calls_a_format_ready_that_cannot_be_verified_here(capsys) -> None:
    assert main(["list", "--json"]) == EXIT_OK
    formats = json.loads(capsys.readouterr().out)["formats"]
    for f in formats:
        why = get_runtime(f["runtime"]).unavailable_reason()
        assert f["not_verified_reason"] == why, f
        if f["verified_here_by"] in ("", f["runtime"]):
            assert f["verified_here"] == (not why) and f["verified_here_by"] == (
                f["runtime"] if not why else ""
            ), f
        else:  # Core ML off macOS: its reference runtime verifies, and can run here
            assert why and f["verified_here"], f
            assert REFERENCE_RUNTIMES[f["format"]] == f["verified_here_by"], f
            assert not get_runtime(f["verified_here_by"]).unavailable_reason(), f
    assert main(["list"]) == EXIT_OK
    text = capsys.readouterr().out
    runtimes = text.split("runtimes:")[1]
    for f in formats:
        line = next(x for x in text.splitlines() if x.startswith(f"  {f['format']} "))
        if not f["installed"]:
            assert "cannot export: pip install" in line, line
        elif f["verified_here"] and f["verified_here_by"] != f["runtime"]:
            assert f"verified with {f['verified_here_by']} " in line, line
            assert "exports and verifies here with the reference evaluator" in line, line
            assert f"cannot run here: {f['not_verified_reason']}" in line, line
        elif f["verified_here"]:
            assert line.endswith("exports and verifies here"), line
        else:
            assert f"cannot verify here: {f['not_verified_reason']}" in line, line
            assert f"cannot run here: {f['not_verified_reason']}" in runtimes
