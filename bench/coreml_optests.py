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

Per module it counts passed / failed / unsupported / skipped tests, and among the passed
ones ``numerically_checked``: the test's ``compare_backend`` compared at least one
output with its expected values (a test may pass without that: it checks only types or
shapes, or raises as expected); ``evaluated_only``: it ran the evaluator only through a
direct ``MLModel.predict`` call (the test then compares by itself). Records from runs
before this tally existed have ``passed`` only; the JSON lists which modules have the
count (``numerically_checked_is_counted_in``) and the totals of those counts cover only
them.

``--mode framework`` (macOS 12+ only; refused elsewhere): nothing is replaced, Core ML
predicts as the tests ship it and compares with the expected outputs, and each
``compare_backend`` also runs the evaluator on the same inputs and compares it with the
framework's prediction (same tolerances, widened as coremltools widens them);
``evaluator_vs_framework_checked`` counts the passed tests where that comparison ran.
Its results go to ``bench/results/coreml_optests_framework.json``. It has never run on
a Mac (none here): its logic is tested on Linux with a FAKE predict
(``tests/runtimes/test_mil_optests.py``).

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
    pred = _evaluator_predict(mlmodel, input_key_values, dtype, state)
    if expected_outputs is None:
        return pred
    if dtype == "fp16":
        atol, rtol = max(atol * 100.0, 5e-1), max(rtol * 100.0, 5e-2)
    _TALLY.compared += _compare(
        pred, expected_outputs, atol, rtol, also_compare_shapes, allow_mismatch_ratio
    )
    return pred


def _evaluator_predict(mlmodel: Any, input_key_values: dict, dtype: str, state: Any) -> dict:
    """The reference evaluator's outputs for `mlmodel` (``float32`` for an fp32 program,
    ``declared`` for fp16); skips a case it cannot evaluate as "unsupported", naming why."""
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
    _TALLY.evaluated += 1
    return pred


def _compare(
    pred: dict,
    expected_outputs: dict,
    atol: float,
    rtol: float,
    also_compare_shapes: bool,
    allow_mismatch_ratio: float,
    what: str = "",
) -> int:
    """Asserts `pred` matches `expected_outputs` as coremltools' compare_backend does;
    returns how many outputs were compared."""
    n = 0
    for name, expected in expected_outputs.items():
        got = pred[name]
        expected = np.asarray(expected)
        if also_compare_shapes:
            assert got.shape == expected.shape, (what, name, got.shape, expected.shape)
        if expected.dtype.kind in "biu":
            np.testing.assert_array_equal(got, expected, err_msg=what)
            n += 1
            continue
        try:
            np.testing.assert_allclose(got, expected, atol=atol, rtol=rtol, err_msg=what)
        except AssertionError:
            bad = np.sum(~np.isclose(got, expected, atol=atol, rtol=rtol))
            if bad / max(expected.size, 1) > allow_mismatch_ratio:
                raise
        n += 1
    return n


#: coremltools' own compare_backend (framework predict + expected outputs), kept by the
#: "framework" mode's plugin before it substitutes `framework_and_evaluator_compare_backend`
_FRAMEWORK_COMPARE: list[Any] = []


def framework_and_evaluator_compare_backend(
    mlmodel: Any,
    input_key_values: dict,
    expected_outputs: dict | None,
    dtype: str = "fp32",
    atol: float = 1e-04,
    rtol: float = 1e-05,
    also_compare_shapes: bool = True,
    state: Any = None,
    allow_mismatch_ratio: float = 0.0,
) -> Any:
    """The "framework" mode (macOS): coremltools' own ``compare_backend`` as shipped (the
    Core ML framework predicts, compared with the expected outputs), then the reference
    evaluator on the same inputs, compared with the framework's prediction at the same
    tolerances (widened as coremltools widens them for fp16 or a non-CPU compute unit)."""
    (framework_compare,) = _FRAMEWORK_COMPARE
    pred = framework_compare(
        mlmodel,
        input_key_values,
        expected_outputs,
        dtype,
        atol,
        rtol,
        also_compare_shapes,
        state,
        allow_mismatch_ratio,
    )
    if pred is None:  # coremltools did not predict (not macOS >= 12): nothing to compare
        raise RuntimeError(
            "coremltools' compare_backend did not predict: the framework mode needs macOS 12+"
        )
    _TALLY.compared += len(expected_outputs or {})
    ev_state = None
    if state is not None:  # the evaluator keeps its own state beside the framework's
        ev_state = _TALLY.states.setdefault(id(state), _ReferenceState())
    mine = _evaluator_predict(mlmodel, input_key_values, dtype, ev_state)
    if dtype == "fp16" or getattr(mlmodel, "compute_unit", None) != _cpu_only():
        atol, rtol = max(atol * 100.0, 5e-1), max(rtol * 100.0, 5e-2)
    framework = {k: np.asarray(v) for k, v in pred.items() if k in mine}
    _TALLY.cross_compared += _compare(
        mine,
        framework,
        atol,
        rtol,
        also_compare_shapes,
        allow_mismatch_ratio,
        what="reference evaluator vs Core ML framework",
    )
    return pred


def _cpu_only() -> Any:
    import coremltools as ct

    return ct.ComputeUnit.CPU_ONLY


def framework_can_predict() -> bool:
    """Whether coremltools can predict here (macOS 12+, as its compare_backend requires)."""
    from coremltools.converters.mil import testing_utils

    return bool(getattr(testing_utils, "_IS_MACOS", False))


class _Tally:
    """What the evaluator did in the running test: how many programs it evaluated and
    how many outputs it compared with the test's expected values (reset per test)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.evaluated = 0
        self.compared = 0
        # the "framework" mode: outputs compared evaluator vs framework, and the
        # evaluator's state per framework state object
        self.cross_compared = 0
        self.states: dict[int, _ReferenceState] = {}


_TALLY = _Tally()


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

    def __init__(self, mode: str = "reference") -> None:
        self.mode = mode
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.failures: dict[str, list[str]] = defaultdict(list)
        self.unsupported: dict[str, Counter] = defaultdict(Counter)
        self.seconds: dict[str, float] = {}

    def pytest_configure(self, config: Any) -> None:
        from coremltools.converters.mil.mil.ops.tests import testing_utils

        if self.mode == "framework":
            # macOS: the framework keeps predicting (predict, make_state untouched); each
            # compare_backend also runs the evaluator and compares it with the framework
            if not _FRAMEWORK_COMPARE:
                _FRAMEWORK_COMPARE.append(testing_utils.compare_backend)
            testing_utils.compare_backend = framework_and_evaluator_compare_backend
            return
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
        for key in ("numerically_checked", "evaluated_only"):  # counted in this run, even 0
            self.counts[module][key] += 0
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
            # "numerically_checked": the test passed and the patched compare_backend
            # compared at least one output with the test's expected values; a passed test
            # that only ran the evaluator through a direct predict call (the test compares
            # by itself) is "evaluated_only"; one that never ran it is in neither
            if _TALLY.compared:
                self.counts[module]["numerically_checked"] += 1
            elif _TALLY.evaluated:
                self.counts[module]["evaluated_only"] += 1
            if self.mode == "framework":  # the evaluator agreed with the framework
                key = "evaluator_vs_framework_checked"
                self.counts[module][key] += 1 if _TALLY.cross_compared else 0

    def pytest_runtest_setup(self, item: Any) -> None:
        _TALLY.reset()


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
    # modules run before the per-test tally existed have "passed" only; their share of
    # the numerically checked cases is unknown, and not guessed. A module run in parts
    # has the count only if every part has it.
    counted = sorted(
        m
        for m, c in modules.items()
        if "numerically_checked" in c
        and all("numerically_checked" in p["counts"] for p in parts_of.get(m, {}).values())
    )
    for key in ("numerically_checked", "evaluated_only"):
        totals.pop(key, None)
        if counted:
            totals[key] = sum(modules[m].get(key, 0) for m in counted)
    result = {
        "bench": "coreml_optests",
        "what": "coremltools' MIL op unit tests, expected outputs compared through the "
        "coreml-reference evaluator (mlprogram backend only)"
        if run.get("mode", "reference") == "reference"
        else "coremltools' MIL op unit tests on macOS: the Core ML framework against the "
        "expected outputs, and the coreml-reference evaluator against the framework",
        "mode": run.get("mode", "reference"),
        "coremltools": coremltools.__version__,
        # free-text notes on the runs (which modules were rerun when, and why), kept
        "notes": list(old.get("notes", [])),
        "totals": dict(totals),
        "numerically_checked_is_counted_in": counted,
        "numerically_checked_not_counted_in": sorted(set(modules) - set(counted)),
        "passed_in_counted_modules": sum(modules[m].get("passed", 0) for m in counted),
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
    cols = ("passed", "numerically_checked", "failed", "unsupported", "skipped")
    counted = set(result.get("numerically_checked_is_counted_in", []))
    head = " | ".join(c.replace("_", " ") for c in cols)
    lines = [
        f"| module (coremltools {result['coremltools']} op tests) | {head} |",
        "|---|" + "---|" * len(cols),
    ]

    def cell(module: str | None, counts: dict, col: str) -> str:
        if col == "numerically_checked" and module is not None and module not in counted:
            return "not counted"  # run before the per-test tally existed
        return str(counts.get(col, 0))

    for module, counts in result["modules"].items():
        lines.append(f"| {module} | " + " | ".join(cell(module, counts, c) for c in cols) + " |")
    totals = result["totals"]
    lines.append("| **total** | " + " | ".join(f"**{cell(None, totals, c)}**" for c in cols) + " |")
    if counted:
        lines.append(
            f"\nnumerically checked: counted in {len(counted)} of {len(result['modules'])} "
            f"modules ({result.get('passed_in_counted_modules', 0)} passed there)"
        )
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
    parser.add_argument(
        "--mode",
        choices=("reference", "framework"),
        default="reference",
        help="reference (any OS): the evaluator replaces MLModel.predict and is compared "
        "with the expected outputs; framework (macOS 12+ only): Core ML predicts as the "
        "tests ship, and the evaluator is compared with the framework's predictions",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="results JSON (default bench/results/coreml_optests.json, "
        "bench/results/coreml_optests_framework.json in the framework mode)",
    )
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
    if args.out is None:
        suffix = "_framework" if args.mode == "framework" else ""
        args.out = f"bench/results/coreml_optests{suffix}.json"
    if args.mode == "framework" and not framework_can_predict():
        parser.error(
            "--mode framework needs the Core ML framework (macOS 12+); coremltools cannot "
            "predict here: run without --mode (the evaluator replaces predict) on this OS"
        )
    if args.table:
        print(markdown_table(json.loads(Path(args.out).read_text())))
        return 0
    os.environ["PYMIL_TEST_TARGETS"] = "mlprogram"
    root = Path(importlib.import_module(_TESTS).__file__).parent
    if args.modules:
        files = [root / (m.replace(".", "/") + ".py") for m in args.modules]
    else:
        files = sorted(p for p in root.rglob("test_*.py") if p.name != "test_utils.py")
    plugin = _Plugin(args.mode)
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
            "mode": args.mode,
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
