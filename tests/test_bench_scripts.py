"""The bench/ scripts' arguments and the recorded peak_bench.json (no timing here)."""

from __future__ import annotations

import argparse
import ast
import json
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
#: flags that count rounds or measure time: 0 or less makes no sense in any script
_COUNT_OR_TIME = re.compile(r"^--(rounds|repeats|runs|seconds|[\w-]+-(repeats|seconds))$")


@pytest.fixture(scope="module")
def args_module():
    sys.path.insert(0, str(BENCH))
    try:
        import _args

        yield _args
    finally:
        sys.path.remove(str(BENCH))


def test_positive_types(args_module):
    assert args_module.positive_int("3") == 3
    assert args_module.positive_float("0.25") == 0.25
    for bad in ("0", "-1", "1.5", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            args_module.positive_int(bad)
    for bad in ("0", "-0.1", "nan", "inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            args_module.positive_float(bad)


def test_every_count_and_duration_flag_is_checked():
    """Each script's --rounds/--repeats/--runs/--seconds/--*-seconds goes through bench/_args."""
    seen = []
    for script in sorted(BENCH.glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if not (
                isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"
            ):
                continue
            flags = [a.value for a in node.args if isinstance(a, ast.Constant)]
            if not any(isinstance(f, str) and _COUNT_OR_TIME.match(f) for f in flags):
                continue
            kind = next((k.value for k in node.keywords if k.arg == "type"), None)
            name = kind.id if isinstance(kind, ast.Name) else ast.dump(kind) if kind else None
            seen.append((script.name, flags[0]))
            assert name in ("positive_int", "positive_float"), (script.name, flags, name)
    assert ("peak_bench.py", "--rounds") in seen and ("merge_bench.py", "--rounds") in seen
    assert ("harness_bench.py", "--seconds") in seen and len(seen) >= 12


@pytest.mark.parametrize(
    ("script", "argv"),
    [
        ("peak_bench.py", ["--rounds", "0"]),
        ("peak_bench.py", ["--seconds", "-1"]),
        ("merge_bench.py", ["--rounds", "0"]),
    ],
)
def test_zero_rounds_are_a_usage_error(script, argv, tmp_path):
    out = tmp_path / "never.json"
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *argv, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert f"argument {argv[0]}:" in done.stderr and "give" in done.stderr
    assert not out.exists()


def test_recorded_peaks_use_the_precision_names_edgerep_uses():
    from edgerep.bench.roofline import LOW_PRECISION_PEAKS, measure_peak_gflops
    from edgerep.errors import ConfigError

    names = {"fp32", *LOW_PRECISION_PEAKS}
    recorded = json.loads((BENCH / "results" / "peak_bench.json").read_text())
    medians = recorded["median_gflops"]
    assert set(medians) | set(recorded["not_measured"]) == names
    for row in recorded["rounds"]:
        assert set(row) - {"order"} == set(row["order"]) <= names
    for name, value in medians.items():  # the medians are those of the rounds
        assert math.isclose(value, statistics.median(r[name] for r in recorded["rounds"]))
        assert math.isclose(recorded["ratio_to_fp32"][name], value / medians["fp32"])
    # the old OpenVINO-style name is not accepted where a precision is read
    with pytest.raises(ConfigError, match="fp16"):
        measure_peak_gflops(precision="f16")
