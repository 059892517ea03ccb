"""A fast subset of coremltools' own MIL op unit tests through the reference evaluator.

`bench/coreml_optests.py` runs them all (its JSON is committed); here a few classes
of activation, control-flow, iOS18 state and ``affine`` tests run in a subprocess, so a kernel or
evaluator regression against coremltools' hand-computed expected outputs fails CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("coremltools")
pytest.importorskip("scipy")

ROOT = Path(__file__).resolve().parents[2]


def test_coremltools_op_tests_pass_through_the_evaluator(tmp_path):
    out = tmp_path / "optests.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "coreml_optests.py"),
            "iOS14.test_activation",
            "iOS14.test_control_flow",
            "iOS18.test_states",
            "iOS15.test_image_resizing",
            "-k",
            "TestGeLU or TestSoftmax or TestReLU6 or TestSiLU or TestELU or TestCond or "
            "TestWhileLoop or TestList or TestReadState or TestCoreMLUpdateState or "
            "TestAffine",
            "--out",
            str(out),
        ],
        check=True,
        env=env,
        cwd=ROOT,
        capture_output=True,
        timeout=600,
    )
    result = json.loads(out.read_text())
    totals = result["totals"]
    assert totals.get("failed", 0) == 0, result["failures"]
    assert totals.get("passed", 0) >= 30, totals
    # passed tests whose compare_backend compared outputs with expected values
    assert totals.get("numerically_checked", 0) >= 20, totals  # 23 when written
    assert len(result["numerically_checked_is_counted_in"]) == 4, result
    modules = result["modules"]
    # control flow and states are evaluated, not skipped as unsupported
    assert modules["iOS14/test_control_flow.py"].get("passed", 0) >= 5, modules
    assert modules["iOS18/test_states.py"].get("passed", 0) >= 4, modules
    assert "unsupported" not in modules["iOS14/test_control_flow.py"], result["unsupported_ops"]
    # affine is evaluated against coremltools' hand-computed values
    affine = {k: v for k, v in modules["iOS15/test_image_resizing.py"].items() if v}
    assert affine == {"passed": 1, "numerically_checked": 1}, modules


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "coreml_optests_under_test", ROOT / "bench" / "coreml_optests.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _relu_model():
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3))], opset_version=ct.target.iOS16)
    def prog(x):
        return mb.relu(x=x, name="y")

    return ct.convert(prog, convert_to="mlprogram", compute_units=ct.ComputeUnit.CPU_ONLY)


@pytest.mark.parametrize("offset", [0.0, 1e-2])
def test_framework_mode_compares_the_evaluator_with_the_framework(monkeypatch, offset):
    """``--mode framework`` (macOS only) keeps coremltools' compare_backend and compares
    the evaluator with the framework's prediction. Core ML cannot predict here, so the
    framework's compare_backend is a FAKE (the evaluator's own float32 outputs plus
    `offset`): this checks the wiring and the comparison, and is unrun on real macOS."""
    bench = _bench_module()
    x = np.array([[-1.0, 0.5, 2.0], [3.0, -0.2, 0.0]], np.float32)

    def fake_framework_compare_backend(mlmodel, inputs, expected, *args):
        pred = bench._evaluator_predict(mlmodel, inputs, "fp32", None)
        return {k: v + offset for k, v in pred.items()}

    monkeypatch.setattr(bench, "_FRAMEWORK_COMPARE", [fake_framework_compare_backend])
    model = _relu_model()
    bench._TALLY.reset()
    call = lambda: bench.framework_and_evaluator_compare_backend(  # noqa: E731
        model, {"x": x}, {"y": np.maximum(x, 0)}
    )
    if offset == 0.0:
        pred = call()
        np.testing.assert_array_equal(pred["y"], np.maximum(x, 0))
        assert bench._TALLY.compared == 1 and bench._TALLY.cross_compared == 1
    else:  # the evaluator and the "framework" disagree beyond coremltools' fp32 atol
        with pytest.raises(AssertionError, match="reference evaluator vs Core ML framework"):
            call()
        assert bench._TALLY.cross_compared == 0


def test_framework_mode_is_refused_where_core_ml_cannot_predict():
    bench = _bench_module()
    if bench.framework_can_predict():
        pytest.skip("macOS: the framework mode runs here")
    with pytest.raises(SystemExit):
        bench.main(["--mode", "framework", "iOS18.test_states"])
