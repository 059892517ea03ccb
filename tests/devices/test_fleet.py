"""Merging per-device reports into one, and the archive the agent receives."""

from __future__ import annotations

import io
import tarfile

import pytest

from edgerep.bench.report import markdown_table, validate_report
from edgerep.devices import BenchRequest, Device
from edgerep.devices._archive import pack_bundle, safe_extract, verify_bundle
from edgerep.devices.fleet import fingerprint_id, merge_reports
from edgerep.errors import ConfigError, VerificationError
from tests._tiny_bundle import make_bundle


def _report(cpu: str, p50: float) -> dict:
    row = {
        "variant": "tiny",
        "runtime": "onnxruntime",
        "format": "onnx",
        "latency": {
            "stats": {"n": 10, "p50_ms": p50, "p99_ms": p50 * 2},
            "p50_ci_ms": [p50 * 0.9, p50 * 1.1],
            "p50_spread": 0.01,
            "unstable": False,
        },
    }
    return {
        "schema_version": 1,
        "kind": "edgerep-bench",
        "created": "x",
        "environment": {"cpu": cpu, "cores_logical": 4},
        "settings": {"latency": {"repeats": 2}, "reference_row": "tiny / onnxruntime"},
        "rows": [row],
        "errors": [],
    }


def test_merge_keeps_rows_and_tags_devices():
    req = BenchRequest("b", "tiny")
    a, b, c = Device("local", "local"), Device("agent", "pi", "agent://pi"), Device("adb", "ph")
    merged = merge_reports(
        [(a, req, _report("x86", 1.0)), (b, req, _report("arm", 5.0)), (c, req, OSError("gone"))]
    )
    assert validate_report(merged) == []
    assert [(r["target"], r["latency"]["stats"]["p50_ms"]) for r in merged["rows"]] == [
        ("local", 1.0),
        ("pi", 5.0),
    ]
    fps = [r["fingerprint"] for r in merged["rows"]]
    assert fps[0] != fps[1] and fps[0] == fingerprint_id({"cpu": "x86", "cores_logical": 4})
    assert merged["errors"] == [
        {"variant": "tiny", "runtime": "-", "device": "ph", "error": "device ph: gone"}
    ]
    assert [d["name"] for d in merged["devices"]] == ["local", "pi", "ph"]
    table = markdown_table(merged)
    assert f"| pi | {fps[1]} | tiny | onnxruntime |" in table
    assert "- ph: tiny / -: not measured: device ph: gone" in table
    assert table.count("(reference)") == 4  # each device's first row, two columns each
    assert "per device and bundle" in table
    from edgerep.bench.report import render_html

    page = render_html(merged)
    assert "<h2>Devices</h2>" in page and "Environment of pi" in page
    assert f"<td>{fps[1]}</td>" in page and "<td>gone</td>" in page


def test_fingerprint_ignores_load_and_git():
    env = {"cpu": "c", "packages": {"numpy": "2"}}
    assert fingerprint_id(env) == fingerprint_id({**env, "loadavg": [3, 2, 1], "git": {"x": 1}})
    assert fingerprint_id(env) != fingerprint_id({**env, "packages": {"numpy": "3"}})


def test_pack_roundtrip_and_data_rules(tmp_path):
    bundle = make_bundle(tmp_path / "tiny", openvino=False)
    (bundle / "stray.txt").write_text("not in the manifest")
    buf = io.BytesIO()
    pack_bundle(bundle, buf)
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tar:
        names = tar.getnames()
    assert "bundle/stray.txt" not in names and "bundle/manifest.json" in names
    buf.seek(0)
    written = safe_extract(buf, tmp_path / "out", max_bytes=10**7)
    assert sorted(written) == sorted(names)
    assert verify_bundle(tmp_path / "out" / "bundle")["artifacts"][0]["format"] == "onnx"
    with pytest.raises(ConfigError, match=r"only an \.npz"):
        pack_bundle(bundle, io.BytesIO(), data="file.py:fn")
    buf.seek(0)
    with pytest.raises(ConfigError, match="more than 100 bytes"):
        safe_extract(buf, tmp_path / "small", max_bytes=100)
    (tmp_path / "out" / "bundle" / "onnx" / "model.onnx").write_bytes(b"x")
    with pytest.raises(VerificationError):
        verify_bundle(tmp_path / "out" / "bundle")
