"""The atomic output directory and the manifest."""

from __future__ import annotations

import hashlib
import json
import sys

import pytest

from edgerep.bundle import (
    MANIFEST_NAME,
    atomic_output_dir,
    read_manifest,
    sha256_file,
    write_manifest,
)
from edgerep.errors import ConfigError, VerificationError


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_success_renames_into_place(tmp_path):
    target = tmp_path / "out"
    with atomic_output_dir(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-")
        (tmp / "a.txt").write_text("new")
        assert not target.exists()  # nothing visible until the block completes
    assert (target / "a.txt").read_text() == "new"
    assert _leftovers(tmp_path) == []


def test_failure_leaves_existing_target_intact(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "a.txt").write_text("old")
    with (
        pytest.raises(RuntimeError, match="boom"),
        atomic_output_dir(target, overwrite=True) as tmp,
    ):
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("boom")
    assert (target / "a.txt").read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_failure_without_target_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt), atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "x").write_text("x")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_existing_target_refused_before_any_work(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    ran = []
    with pytest.raises(ConfigError, match=r"already exists; pass --force"):  # noqa: SIM117
        with atomic_output_dir(target):
            ran.append(True)
    assert ran == []
    assert _leftovers(tmp_path) == []


def test_overwrite_swaps_and_removes_old(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_output_dir(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (target / "old.txt").exists()  # the old one stays until the new one is complete
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert _leftovers(tmp_path) == []


def test_target_that_is_a_file(tmp_path):
    (tmp_path / "out").write_text("x")
    with (
        pytest.raises(ConfigError, match="not a directory"),
        atomic_output_dir(tmp_path / "out", overwrite=True),
    ):
        pass


def _manifest(tmp):
    (tmp / "model.onnx").write_bytes(b"\x00graph")
    (tmp / "report.txt").write_text("report")
    return {
        "inputs": [{"name": "x", "shape": ["N", 3], "dtype": "float32"}],
        "outputs": [{"name": "output", "shape": ["N", 2], "dtype": "float32"}],
        "artifacts": [
            {
                "format": "onnx",
                "file": "model.onnx",
                "precision": "fp32",
                "sha256": sha256_file(tmp / "model.onnx"),
                "tool_versions": {"onnx": "1.0", "onnxslim": None},
                "parity": {"passed": True},
            }
        ],
        "ledger": [{"stage": "fold", "action": "folded", "detail": "conv+bn", "error": 1e-12}],
    }


def test_manifest_round_trip_lists_every_file(tmp_path):
    written = write_manifest(tmp_path, _manifest(tmp_path))
    read = read_manifest(tmp_path)
    assert read == written
    assert read["schema_version"] == 1
    assert set(read["files"]) == {"model.onnx", "report.txt"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_tampered_file_is_rejected(tmp_path):
    write_manifest(tmp_path, _manifest(tmp_path))
    (tmp_path / "report.txt").write_text("edited")
    with pytest.raises(VerificationError, match=r"report\.txt.*modified"):
        read_manifest(tmp_path)
    (tmp_path / "report.txt").unlink()
    with pytest.raises(VerificationError, match=r"missing 'report\.txt'"):
        read_manifest(tmp_path)


def test_tampered_manifest_is_rejected(tmp_path):
    write_manifest(tmp_path, _manifest(tmp_path))
    path = tmp_path / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["artifacts"][0]["parity"]["passed"] = False
    path.write_text(json.dumps(data))
    with pytest.raises(VerificationError, match="modified after it was written"):
        read_manifest(tmp_path)
    path.write_text("{not json")
    with pytest.raises(VerificationError, match="not valid JSON"):
        read_manifest(tmp_path)


def test_paths_outside_the_bundle_are_rejected(tmp_path):
    write_manifest(tmp_path, _manifest(tmp_path))
    path = tmp_path / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["files"]["../../etc/passwd"] = "0" * 64
    del data["checksum"]  # a forger can drop the checksum; the path check still holds
    path.write_text(json.dumps(data))
    with pytest.raises(VerificationError, match="has no checksum"):
        read_manifest(tmp_path, verify_files=False)
    # even when the reader trusts unsigned manifests, the path check holds
    with pytest.raises(VerificationError, match="outside the bundle"):
        read_manifest(tmp_path, verify_files=False, trust_unsigned=True)


def test_checksum_is_required_and_swaps_are_refused(tmp_path):
    """Issue 14 case 6: delete the checksum, swap a file and its sha256 entry."""
    write_manifest(tmp_path, _manifest(tmp_path))
    path = tmp_path / MANIFEST_NAME
    data = json.loads(path.read_text())
    del data["checksum"]
    (tmp_path / "model.onnx").write_bytes(b"swapped model")
    data["files"]["model.onnx"] = data["artifacts"][0]["sha256"] = sha256_file(
        tmp_path / "model.onnx"
    )
    path.write_text(json.dumps(data))
    with pytest.raises(VerificationError, match="has no checksum"):
        read_manifest(tmp_path)
    # an explicit opt-in reads it (the file hashes still hold)
    assert read_manifest(tmp_path, trust_unsigned=True)["files"]["model.onnx"]


def test_hmac_signature(tmp_path):
    from edgerep.bundle import read_key_file, sign_bundle

    write_manifest(tmp_path, _manifest(tmp_path))
    key = b"k" * 32
    with pytest.raises(VerificationError, match="not signed"):
        read_manifest(tmp_path, key=key)
    signed = sign_bundle(tmp_path, key)
    assert signed["signature"]["alg"] == "hmac-sha256"
    assert read_manifest(tmp_path, key=key)["checksum"] == signed["checksum"]
    with pytest.raises(VerificationError, match="does not match the key"):
        read_manifest(tmp_path, key=b"x" * 32)
    # re-signing by someone without the key: the checksum can be recomputed, the HMAC not
    path = tmp_path / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["source"] = {"forged": True}
    data["checksum"] = hashlib.sha256(_canonical_for_test(data)).hexdigest()
    path.write_text(json.dumps(data))
    assert read_manifest(tmp_path)["source"] == {"forged": True}  # integrity only
    with pytest.raises(VerificationError, match="does not match the key"):
        read_manifest(tmp_path, key=key)
    short = tmp_path.parent / "short.key"
    short.write_bytes(b"abc")
    with pytest.raises(ConfigError, match="at least 16"):
        read_key_file(short)


def _canonical_for_test(data):
    body = {k: v for k, v in data.items() if k not in ("checksum", "signature")}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def test_schema_is_enforced_on_write_and_read(tmp_path):
    bad = _manifest(tmp_path)
    del bad["ledger"][0]["error"]
    with pytest.raises(ConfigError, match=r"ledger/0.*'error' is a required property"):
        write_manifest(tmp_path, bad)
    bad = _manifest(tmp_path)
    bad["artifacts"][0]["sha256"] = "0" * 64
    with pytest.raises(ConfigError, match="another checksum"):
        write_manifest(tmp_path, bad)
    bad = _manifest(tmp_path)
    bad["ledger"][0]["error"] = float("nan")
    with pytest.raises(ConfigError, match="JSON cannot represent"):
        write_manifest(tmp_path, bad)
    write_manifest(tmp_path, _manifest(tmp_path))
    path = tmp_path / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["schema_version"] = 2
    path.write_text(json.dumps(data))
    with pytest.raises(VerificationError, match="schema"):
        read_manifest(tmp_path)
    with pytest.raises(VerificationError, match=r"no manifest\.json"):
        read_manifest(tmp_path / "nowhere")


def test_hand_check_without_jsonschema(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "jsonschema", None)  # import jsonschema -> ImportError
    bad = _manifest(tmp_path)
    del bad["artifacts"][0]["precision"]
    with pytest.raises(ConfigError, match=r"artifacts/0: 'precision' is a required property"):
        write_manifest(tmp_path, bad)
    write_manifest(tmp_path, _manifest(tmp_path))
    assert read_manifest(tmp_path)["artifacts"][0]["format"] == "onnx"
