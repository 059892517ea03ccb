"""coremltools' own MIL op unit tests, run through the Core ML reference evaluator.

coremltools ships its op tests (``coremltools.converters.mil.mil.ops.tests``) with
hand-computed ``expected_outputs``; off macOS their ``compare_backend`` returns before
predicting, so nothing numeric is checked. This script substitutes a
``compare_backend`` that evaluates the converted ML Program with the
``coreml-reference`` evaluator (``float32`` for fp32 programs, ``declared`` for fp16
ones) and compares with coremltools' own tolerances (fp16: ``atol=max(100·atol, 0.5)``,
``rtol=max(100·rtol, 0.05)``, as on macOS). NeuralNetwork-backend cases are deselected
(``PYMIL_TEST_TARGETS=mlprogram``). A case whose program has an op without a kernel is
counted as "unsupported" (skipped with the op named), never as passed.

Run from the repository root::

    .venv/bin/python bench/coreml_optests.py [MODULE ...] [--out PATH] [-k EXPR]

MODULE defaults to every module under the installed tests (``iOS17.test_activation``
style names). Writes ``bench/results/coreml_optests.json``: passed / failed /
unsupported / skipped per module, the failures' first lines, and ``loadavg``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

_TESTS = "coremltools.converters.mil.mil.ops.tests"


def reference_compare_backend(
    mlmodel: Any,
    input_key_values: dict,
    expected_outputs: dict | None,
    dtype: str = "fp32",
    atol: float = 1e-04,
    rtol: float = 1e-05,
    also_compare_shapes: bool = True,
    state: Any = None,
    allow_mismatch_ratio: float = 0.0,
) -> dict:
    """`compare_backend` with the reference evaluator in place of ``MLModel.predict``."""
    import pytest

    from edgerep.errors import UnsupportedError
    from edgerep.runtimes._mil import Evaluator
    from edgerep.runtimes._mil._program import load_program

    if mlmodel.get_spec().WhichOneof("Type") != "mlProgram":
        pytest.skip("NeuralNetwork model: the reference evaluator reads ML Programs only")
    if state is not None:
        pytest.skip("stateful model: states are not evaluated yet")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.mlpackage"
        mlmodel.save(str(path))
        try:
            program, _ = load_program(path)
            ev = Evaluator(program, precision="declared" if dtype == "fp16" else "float32")
        except UnsupportedError as e:  # no kernel, or coremltools cannot rebuild the program
            pytest.skip(f"unsupported: {e}")
        pred = ev.run({k: np.asarray(v) for k, v in input_key_values.items()})
    if expected_outputs is None:
        return pred
    if dtype == "fp16":
        atol, rtol = max(atol * 100.0, 5e-1), max(rtol * 100.0, 5e-2)
    for name, expected in expected_outputs.items():
        got = pred[name]
        expected = np.asarray(expected)
        if also_compare_shapes:
            assert got.shape == expected.shape, (name, got.shape, expected.shape)
        if expected.dtype.kind in "biu":
            np.testing.assert_array_equal(got, expected)
            continue
        try:
            np.testing.assert_allclose(got, expected, atol=atol, rtol=rtol)
        except AssertionError:
            bad = np.sum(~np.isclose(got, expected, atol=atol, rtol=rtol))
            if bad / max(expected.size, 1) > allow_mismatch_ratio:
                raise
    return pred


class _Plugin:
    """Patches compare_backend and tallies outcomes per module."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.failures: dict[str, list[str]] = defaultdict(list)
        self.unsupported: Counter = Counter()

    def pytest_configure(self, config: Any) -> None:
        from coremltools.converters.mil.mil.ops.tests import testing_utils

        testing_utils.compare_backend = reference_compare_backend

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when != "call" and not (report.when == "setup" and report.outcome != "passed"):
            return
        module = report.nodeid.split("::")[0].split("/tests/")[-1]
        if report.skipped:
            reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else ""
            if "unsupported:" in reason:
                self.counts[module]["unsupported"] += 1
                op = reason.split("op(s) ")[-1].split(";")[0]
                self.unsupported[op] += 1
            else:
                self.counts[module]["skipped"] += 1
        elif report.failed:
            self.counts[module]["failed"] += 1
            lines = str(report.longrepr).strip().splitlines()
            errors = [ln[1:].strip() for ln in lines if ln.startswith("E ")] or lines[-1:]
            case = report.nodeid.split("::", 1)[-1]
            self.failures[module].append(f"{case}: {' | '.join(errors[:3])[:300]}")
        else:
            self.counts[module]["passed"] += 1


def _write(
    out_path: str,
    plugin: _Plugin,
    loadavg_before: list[str],
    t0: float,
    done: list[str],
    asked: list[str],
) -> dict:
    import coremltools

    totals: Counter = Counter()
    for c in plugin.counts.values():
        totals.update(c)
    result = {
        "bench": "coreml_optests",
        "what": "coremltools' MIL op unit tests, expected outputs compared through the "
        "coreml-reference evaluator (mlprogram backend only)",
        "coremltools": coremltools.__version__,
        "seconds": round(time.time() - t0, 1),
        "loadavg_before": loadavg_before,
        "loadavg_after": Path("/proc/loadavg").read_text().split()[:3],
        "totals": dict(totals),
        "modules_run": done,
        "modules_not_run": [m for m in asked if m not in done],
        "modules": {m: dict(c) for m, c in sorted(plugin.counts.items())},
        "unsupported_ops": dict(plugin.unsupported.most_common()),
        "failures": {m: f[:20] for m, f in sorted(plugin.failures.items())},
    }
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    return dict(totals)


def main(argv: list[str] | None = None) -> int:
    import importlib

    import pytest

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*")
    parser.add_argument("-k", default=None)
    parser.add_argument("--out", default="bench/results/coreml_optests.json")
    parser.add_argument(
        "--budget-s", type=float, default=1200.0, help="start no module after this many seconds"
    )
    args = parser.parse_args(argv)
    os.environ["PYMIL_TEST_TARGETS"] = "mlprogram"
    root = Path(importlib.import_module(_TESTS).__file__).parent
    if args.modules:
        files = [root / (m.replace(".", "/") + ".py") for m in args.modules]
    else:
        files = sorted(p for p in root.rglob("test_*.py") if p.name != "test_utils.py")
    plugin = _Plugin()
    loadavg_before = Path("/proc/loadavg").read_text().split()[:3]
    t0 = time.time()
    done: list[str] = []
    for file in files:  # one pytest run per module: results are written as they come
        if time.time() - t0 > args.budget_s:
            break
        pytest_args = [str(file), "-q", "-p", "no:cacheprovider", "-W", "ignore"]
        if args.k:
            pytest_args += ["-k", args.k]
        pytest.main(pytest_args, plugins=[plugin])
        done.append(str(file.relative_to(root)))
        _write(
            args.out, plugin, loadavg_before, t0, done, [str(f.relative_to(root)) for f in files]
        )
    totals = _write(
        args.out, plugin, loadavg_before, t0, done, [str(f.relative_to(root)) for f in files]
    )
    print(json.dumps({"totals": totals, "modules_done": len(done)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
