"""coremltools' own MIL op unit tests, run through the Core ML reference evaluator.

coremltools ships its op tests (``coremltools.converters.mil.mil.ops.tests``) with
hand-computed ``expected_outputs``; off macOS their ``compare_backend`` returns before
predicting, so nothing numeric is checked. This script substitutes a
``compare_backend`` that evaluates the converted ML Program with the
``coreml-reference`` evaluator (``float32`` for fp32 programs, ``declared`` for fp16
ones) and compares with coremltools' own tolerances (fp16: ``atol=max(100·atol, 0.5)``,
``rtol=max(100·rtol, 0.05)``, as on macOS). A test that calls ``MLModel.predict`` itself gets the evaluator's outputs too
(``declared`` precision). NeuralNetwork-backend cases are deselected
(``PYMIL_TEST_TARGETS=mlprogram``). A case whose program has an op without a kernel is
counted as "unsupported" (skipped with the op named), never as passed.

Run from the repository root::

    .venv/bin/python bench/coreml_optests.py [MODULE ...] [--out PATH] [-k EXPR]

MODULE defaults to every module under the installed tests (``iOS17.test_activation``
style names). Writes ``bench/results/coreml_optests.json``: passed / failed /
unsupported / skipped per module, the failures' first lines, what was unsupported
(the op without a kernel, or the case a kernel declines and why) and per module when
and at what ``loadavg`` it ran. ``--update`` keeps the other modules' records already
in the file (a module run again replaces its own).
"""

from __future__ import annotations

import argparse
import fcntl
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
    from edgerep.runtimes._mil._registry import EvaluationError

    if mlmodel.get_spec().WhichOneof("Type") != "mlProgram":
        pytest.skip("NeuralNetwork model: the reference evaluator reads ML Programs only")
    if state is not None and not isinstance(state, _ReferenceState):
        pytest.skip("stateful model with a framework state object")
    ev = state.evaluator if state is not None else None
    if ev is None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.mlpackage"
            mlmodel.save(str(path))
            try:
                program, _ = load_program(path)
                ev = Evaluator(program, precision="declared" if dtype == "fp16" else "float32")
            except UnsupportedError as e:  # no kernel, or coremltools cannot rebuild it
                pytest.skip(f"unsupported: {e}")
    feeds = {k: np.asarray(v) for k, v in input_key_values.items()}
    try:
        if state is not None:  # the same evaluator and state mapping across pred_iters
            if state.evaluator is None:
                state.evaluator, state.values = ev, ev.make_state()
            pred = ev.run(feeds, state=state.values)
        else:
            pred = ev.run(feeds)
    except EvaluationError as e:
        # the program fails on this input where the framework's predict fails too: raise
        # what MLModel.predict raises, so the tests' pytest.raises see the same error
        raise RuntimeError(f"Unable to compute the prediction using ML Program: {e}") from e
    except UnsupportedError as e:
        # a kernel declines this case (a mode it does not evaluate, behaviour the op spec
        # leaves undefined): unsupported, with the op and the reason named, never passed
        pytest.skip(f"unsupported: case {e}")
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


class _ReferenceState:
    """What the patched ``MLModel.make_state`` returns off macOS: the evaluator and its
    state mapping are made at the first prediction and kept for the following ones."""

    def __init__(self) -> None:
        self.evaluator: Any = None
        self.values: dict[str, np.ndarray] = {}


def _make_state(self: Any) -> _ReferenceState:
    return _ReferenceState()


def _reference_predict(self: Any, data: Any, state: Any = None) -> dict:
    """What a test's direct ``MLModel.predict`` call returns off macOS: the reference
    evaluator's outputs ("declared" precision: fp16 programs keep fp16 storage, an fp32
    program evaluates in float32), or the same skip/raise as `reference_compare_backend`."""
    return reference_compare_backend(self, dict(data), None, dtype="fp16", state=state)


class _Plugin:
    """Patches compare_backend and tallies outcomes per module."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.failures: dict[str, list[str]] = defaultdict(list)
        self.unsupported: dict[str, Counter] = defaultdict(Counter)
        self.seconds: dict[str, float] = {}

    def pytest_configure(self, config: Any) -> None:
        from coremltools.converters.mil.mil.ops.tests import testing_utils

        testing_utils.compare_backend = reference_compare_backend
        import coremltools as ct

        ct.models.MLModel.make_state = _make_state  # the framework's needs macOS 15
        # tests that call predict themselves (e.g. compare two programs' outputs)
        ct.models.MLModel.predict = _reference_predict

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when != "call" and not (report.when == "setup" and report.outcome != "passed"):
            return
        module = report.nodeid.split("::")[0].split("/tests/")[-1]
        case = report.nodeid.split("::", 1)[-1]
        if report.skipped:
            reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else ""
            if "unsupported: case " in reason:  # declined at run time, reason named
                self.counts[module]["unsupported"] += 1
                why = reason.split("unsupported: case ", 1)[1]
                self.unsupported[module][f"case: {why[:200]}"] += 1
            elif "unsupported:" in reason:
                self.counts[module]["unsupported"] += 1
                op = reason.split("op(s) ")[-1].split(";")[0]
                self.unsupported[module][op] += 1
            else:
                self.counts[module]["skipped"] += 1
        elif report.failed:
            lines = str(report.longrepr).strip().splitlines()
            errors = [ln[1:].strip() for ln in lines if ln.startswith("E ")] or lines[-1:]
            self.counts[module]["failed"] += 1
            self.failures[module].append(f"{case}: {' | '.join(errors[:3])[:300]}")
        else:
            self.counts[module]["passed"] += 1


def _write(
    out_path: str,
    plugin: _Plugin,
    run: dict[str, Any],
    done: list[str],
    asked: list[str],
    update: bool,
) -> dict:
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out.parent, os.O_RDONLY)  # runs may update the file in parallel
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return _merge_and_write(out, plugin, run, done, asked, update)
    finally:
        os.close(fd)  # releases the lock


def _merge_and_write(
    out: Path, plugin: _Plugin, run: dict[str, Any], done: list[str], asked: list[str], update: bool
) -> dict:
    import coremltools

    old: dict[str, Any] = json.loads(out.read_text()) if update and out.exists() else {}
    modules = dict(old.get("modules", {}))
    unsupported = dict(old.get("unsupported_ops", {}))
    failures = dict(old.get("failures", {}))
    runs = dict(old.get("module_runs", {}))
    parts_of = dict(old.get("module_parts", {}))
    for m in done:
        record = {
            "counts": dict(plugin.counts.get(m, Counter())),
            "unsupported": dict(plugin.unsupported[m].most_common()),
            "failures": plugin.failures.get(m, [])[:20],
            "run": {**run, "seconds": plugin.seconds.get(m)},
        }
        # a run without -k replaces the module's record; a -k run replaces its part, and
        # the module's record is the sum of its parts (disjoint -k expressions that
        # together select the whole module, see --help)
        parts = {} if run["k"] is None else dict(parts_of.get(m, {}))
        parts[str(run["k"])] = record
        if run["k"] is None:
            parts_of.pop(m, None)
        else:
            parts_of[m] = parts
        counts: Counter = Counter()
        why: Counter = Counter()
        failed: list[str] = []
        for part in parts.values():
            counts.update(part["counts"])
            why.update(part["unsupported"])
            failed += part["failures"]
        modules[m] = dict(counts)
        unsupported.pop(m, None)
        failures.pop(m, None)
        if why:
            unsupported[m] = dict(why.most_common())
        if failed:
            failures[m] = failed[:20]
        runs[m] = record["run"] if run["k"] is None else [p["run"] for p in parts.values()]
    totals: Counter = Counter()
    for c in modules.values():
        totals.update(c)
    result = {
        "bench": "coreml_optests",
        "what": "coremltools' MIL op unit tests, expected outputs compared through the "
        "coreml-reference evaluator (mlprogram backend only)",
        "coremltools": coremltools.__version__,
        # free-text notes on the runs (which modules were rerun when, and why), kept
        "notes": list(old.get("notes", [])),
        "totals": dict(totals),
        "modules_not_run": sorted(
            (set(old.get("modules_not_run", [])) | set(asked)) - set(modules)
        ),
        "modules": dict(sorted(modules.items())),
        "module_runs": dict(sorted(runs.items())),
        "module_parts": dict(sorted(parts_of.items())),
        "unsupported_ops": dict(sorted(unsupported.items())),
        "failures": dict(sorted(failures.items())),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    return dict(totals)


def markdown_table(result: dict) -> str:
    """The README's per-module table of a results JSON."""
    cols = ("passed", "failed", "unsupported", "skipped")
    lines = [
        f"| module (coremltools {result['coremltools']} op tests) | {' | '.join(cols)} |",
        "|---|" + "---|" * len(cols),
    ]
    for module, counts in result["modules"].items():
        lines.append(f"| {module} | " + " | ".join(str(counts.get(c, 0)) for c in cols) + " |")
    totals = result["totals"]
    lines.append("| **total** | " + " | ".join(f"**{totals.get(c, 0)}**" for c in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import importlib

    import pytest

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*")
    parser.add_argument(
        "-k",
        default=None,
        help="pytest -k expression; with --update the run is recorded as one part of each "
        "module, the module's counts being the sum of its parts: run disjoint expressions "
        "that together cover the module (e.g. 'A', 'not A'); a run without -k replaces them",
    )
    parser.add_argument("--out", default="bench/results/coreml_optests.json")
    parser.add_argument(
        "--budget-s", type=float, default=1200.0, help="start no module after this many seconds"
    )
    parser.add_argument(
        "--update",
        action="store_true",
        help="keep the other modules' records already in --out; replace those run now",
    )
    parser.add_argument(
        "--table", action="store_true", help="print the README table of --out and exit"
    )
    args = parser.parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(Path(args.out).read_text())))
        return 0
    os.environ["PYMIL_TEST_TARGETS"] = "mlprogram"
    root = Path(importlib.import_module(_TESTS).__file__).parent
    if args.modules:
        files = [root / (m.replace(".", "/") + ".py") for m in args.modules]
    else:
        files = sorted(p for p in root.rglob("test_*.py") if p.name != "test_utils.py")
    plugin = _Plugin()
    t0 = time.time()
    done: list[str] = []
    asked = [str(f.relative_to(root)) for f in files]
    totals: dict = {}
    for file in files:  # one pytest run per module: results are written as they come
        if time.time() - t0 > args.budget_s:
            break
        name = str(file.relative_to(root))
        pytest_args = [str(file), "-q", "-p", "no:cacheprovider", "-W", "ignore"]
        if args.k:
            pytest_args += ["-k", args.k]
        run = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "loadavg_before": Path("/proc/loadavg").read_text().split()[:3],
            "k": args.k,
        }
        t_mod = time.time()
        pytest.main(pytest_args, plugins=[plugin])
        plugin.seconds[name] = round(time.time() - t_mod, 1)
        run["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
        done.append(name)
        totals = _write(args.out, plugin, run, [name], asked, args.update or len(done) > 1)
    print(json.dumps({"totals": totals, "modules_done": len(done)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
