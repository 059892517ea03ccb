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


def test_describe_local_device_has_isa_and_accelerators():
    from edgerep.devices.local import describe_local_device

    d = describe_local_device()
    assert isinstance(d["isa_flags"], list) and isinstance(d["governor"], list)
    assert "onnxruntime" in d["accelerators"]["runtimes"]
    assert "cpu" in d["accelerators"]["runtimes"]["onnxruntime"]


def test_run_request_settings_and_allowed_runtimes(tmp_path):
    import pytest

    from edgerep.devices import BenchRequest
    from edgerep.devices.local import run_request
    from edgerep.errors import ConfigError
    from tests._tiny_bundle import make_bundle

    bundle = make_bundle(tmp_path / "tiny", openvino=False)
    fast = {"min_iters": 5, "min_seconds": 0.0, "warmup_iters": 1, "repeats": 2}
    with pytest.raises(ConfigError, match="unknown bench settings"):
        run_request(BenchRequest(str(bundle), "t", {"shell": "ls"}))
    with pytest.raises(ConfigError, match="not allowed"):
        run_request(
            BenchRequest(str(bundle), "t", {"runtimes": ["torch"]}),
            allowed_runtimes=("onnxruntime",),
        )
    with pytest.raises(ConfigError, match="none of the runtimes"):
        run_request(BenchRequest(str(bundle), "t", {}), allowed_runtimes=("coreml",))
    report = run_request(
        BenchRequest(str(bundle), "t", {"latency": fast, "roofline": False}),
        allowed_runtimes=("onnxruntime", "openvino", "tensorrt"),
    )
    assert [r["runtime"] for r in report["rows"]] == ["onnxruntime"] and report["errors"] == []


def test_agent_job_imports_no_torch(tmp_path):
    """The agent's job process (the same harness as `edgerep bench`) never imports torch."""
    from tests._tiny_bundle import make_bundle

    bundle = make_bundle(tmp_path / "tiny", openvino=False)
    code = (
        "import sys, json; from edgerep.devices import BenchRequest; "
        "from edgerep.devices.local import run_request; "
        f"r = run_request(BenchRequest({str(bundle)!r}, 't', {{'latency': {{'min_iters': 3, "
        "'min_seconds': 0.0, 'warmup_iters': 0, 'repeats': 1}, 'roofline': False}), "
        "allowed_runtimes=('onnxruntime',)); "
        "print(json.dumps([len(r['rows']), 'torch' in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [1, False]
