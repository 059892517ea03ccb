"""A fast subset of coremltools' own MIL op unit tests through the reference evaluator.

`bench/coreml_optests.py` runs them all (its JSON is committed); here a few classes
of activation tests run in a subprocess, so a kernel regression against coremltools'
hand-computed expected outputs fails CI.
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


def test_coremltools_activation_tests_pass_through_the_evaluator(tmp_path):
    out = tmp_path / "optests.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "coreml_optests.py"),
            "iOS14.test_activation",
            "-k",
            "TestGeLU or TestSoftmax or TestReLU6 or TestSiLU or TestELU",
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
    assert totals.get("passed", 0) >= 20, totals  # numerically compared, not skipped
