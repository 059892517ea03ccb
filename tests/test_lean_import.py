"""`import edgerep` (and the light modules) must not load torch or any backend SDK."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = (
    "torch",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "onnxslim",
    "openvino",
    "coremltools",
    "tensorrt",
    "executorch",
)


def _loaded_after(statement: str) -> list[str]:
    code = f"import sys\n{statement}\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [m for m in out.stdout.strip().split(",") if m]


def test_import_edgerep_is_lean():
    assert _loaded_after("import edgerep") == []


@pytest.mark.parametrize(
    "statement",
    [
        "import edgerep.spec, edgerep.bundle, edgerep.errors, edgerep.source, edgerep.pipeline",
        "import edgerep.cli",
        "from edgerep.exporters import available_formats; available_formats()",
        "import edgerep.exporters.onnx",
        "from edgerep.runtimes import get_runtime; r = get_runtime('onnxruntime'); r.is_available()",
        "import edgerep.runtimes.torch_eager",
        "import edgerep.bench, edgerep.devices",
        "import edgerep.predictor, edgerep.bench.suite, edgerep.bench.env, edgerep.bench.roofline",
        "import edgerep.bench.accuracy, edgerep.bench.report",
    ],
)
def test_light_modules_are_lean(statement):
    assert _loaded_after(statement) == []
