"""Local device description."""

from __future__ import annotations

import json
import subprocess
import sys

from edgerep.devices import describe_local


def test_describe_local_is_plain_json():
    d = describe_local()
    for key in ("kind", "cpu", "isa", "cores_logical", "memory_bytes", "os", "python", "packages"):
        assert key in d
    assert d["kind"] == "local"
    assert d["cores_logical"] >= 1
    assert d["python"].count(".") == 2
    assert "numpy" in d["packages"]
    json.dumps(d)


def test_describe_local_imports_no_package():
    code = (
        "import sys; from edgerep.devices import describe_local; d = describe_local(); "
        "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'numpy') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
