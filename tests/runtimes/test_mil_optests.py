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
    assert totals.get("passed", 0) >= 30, totals  # numerically compared, not skipped
    modules = result["modules"]
    # control flow and states are evaluated, not skipped as unsupported
    assert modules["iOS14/test_control_flow.py"].get("passed", 0) >= 5, modules
    assert modules["iOS18/test_states.py"].get("passed", 0) >= 4, modules
    assert "unsupported" not in modules["iOS14/test_control_flow.py"], result["unsupported_ops"]
    # affine is evaluated against coremltools' hand-computed values
    assert modules["iOS15/test_image_resizing.py"] == {"passed": 1}, modules
