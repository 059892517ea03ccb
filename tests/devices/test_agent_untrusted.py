"""The agent never executes what a bundle carries beyond the known artifact formats.

Bundles here are well-formed and their manifests list every file with the right
SHA-256, so the upload checks pass: what is tested is that a ``.pt2`` or a pickled
artifact is never loaded. Each such file is a pickle whose ``__reduce__`` opens (and so
creates) a marker file when unpickled; the marker must never appear, whatever the job's
outcome. Also: block devices in the archive (char devices and FIFOs are in
test_agent.py). Agents bind 127.0.0.1 and serve bounded loops (`running_agent`).
"""

from __future__ import annotations

import pickle
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from edgerep.bundle import read_manifest, sha256_file, write_manifest
from edgerep.devices._base import BenchRequest
from edgerep.devices.agent import AgentClient, AgentError
from tests._tiny_bundle import make_bundle
from tests.devices._agent import FAST, TOKEN, call, job_headers, member, running_agent, tar_of

SETTINGS = {"latency": FAST, "roofline": False, "threads": 1}


class _Trap:
    """Unpickling it calls ``open(marker, "w")``: the marker file proves a load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _trap_bytes(marker: Path) -> bytes:
    return pickle.dumps(_Trap(marker), protocol=2)


def test_the_trap_fires_when_unpickled(tmp_path):
    """Control: the marker does appear when the trap is unpickled (so its absence in the
    tests below means nothing was unpickled)."""
    marker = tmp_path / "fired"
    pickle.loads(_trap_bytes(marker)).close()
    assert marker.exists()
    marker.unlink()
    trap = np.empty(1, dtype=object)
    trap[0] = _Trap(marker)
    np.savez(tmp_path / "d.npz", x=trap)
    with np.load(tmp_path / "d.npz", allow_pickle=True) as d:
        d["x"][0].close()
    assert marker.exists()


def _with_untrusted(src: Path, dst: Path, marker: Path, *, keep_onnx: bool) -> Path:
    """A copy of the tiny bundle that also lists a ``pt2`` artifact and a pickled
    ``pytorch`` artifact (both trap pickles), with their right hashes."""
    shutil.copytree(src, dst)
    manifest = read_manifest(dst)
    (dst / "torch").mkdir()
    arts = [a for a in manifest["artifacts"] if keep_onnx and a["format"] == "onnx"]
    for fmt, rel in (("pt2", "torch/model.pt2"), ("pytorch", "torch/model.pt")):
        (dst / rel).write_bytes(_trap_bytes(marker))
        arts.append(
            {
                "format": fmt,
                "file": rel,
                "precision": "fp32",
                "status": "verified",
                "sha256": sha256_file(dst / rel),
                "tool_versions": {},
                "parity": {},
                "files": [rel],
            }
        )
    if not keep_onnx:
        shutil.rmtree(dst / "onnx")
    body = {k: v for k, v in manifest.items() if k not in ("files", "checksum", "signature")}
    write_manifest(dst, {**body, "artifacts": arts})
    read_manifest(dst)  # valid: the upload's hash checks pass
    return dst


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("untrusted") / "tiny", openvino=False)


def _wait(client: AgentClient, job: str) -> dict:
    deadline = time.monotonic() + 60
    while (state := client.job(job))["state"] in ("queued", "running"):
        assert time.monotonic() < deadline, state
        time.sleep(0.05)
    return state


def test_pt2_and_pickle_beside_onnx_are_never_loaded(tmp_path, tiny):
    """The job runs the ONNX artifact only; the pt2 and pickled files stay bytes."""
    marker = tmp_path / "unpickled"
    bundle = _with_untrusted(tiny, tmp_path / "mixed", marker, keep_onnx=True)
    with running_agent(tmp_path / "work") as server:
        report = AgentClient(server.url, TOKEN).run(
            BenchRequest(str(bundle), "mixed", SETTINGS), timeout_s=120
        )
    assert [r["runtime"] for r in report["rows"]] == ["onnxruntime"]
    assert {r["format"] for r in report["rows"]} == {"onnx"}
    assert not marker.exists()
    assert list((tmp_path / "work").rglob("*")) == []


def test_bundle_of_only_pt2_and_pickle_is_refused_unloaded(tmp_path, tiny):
    """Nothing the agent may run: the job fails naming why, asking for torch is a 400, and
    nothing is unpickled either way."""
    marker = tmp_path / "unpickled"
    bundle = _with_untrusted(tiny, tmp_path / "torchonly", marker, keep_onnx=False)
    with running_agent(tmp_path / "work") as server:
        client = AgentClient(server.url, TOKEN)
        job = client.submit(BenchRequest(str(bundle), "t", SETTINGS))
        state = _wait(client, job)
        assert state["state"] == "failed", state
        assert "none of the runtimes this agent allows" in state["error"]
        for runtimes in (["torch"], ["torch", "onnxruntime"]):
            with pytest.raises(AgentError) as e:
                client.submit(BenchRequest(str(bundle), "t", {**SETTINGS, "runtimes": runtimes}))
            assert e.value.status == 400 and "torch" in str(e.value)
    assert not marker.exists()
    assert list((tmp_path / "work").rglob("*")) == []


def test_pickled_object_array_in_uploaded_data_is_never_unpickled(tmp_path, tiny):
    """``--data``'s .npz travels with the job: an object array (a pickle inside the npz)
    is refused by the loader (``allow_pickle=False``) and never unpickled."""
    marker = tmp_path / "unpickled"
    data = tmp_path / "data.npz"
    trap = np.empty(1, dtype=object)
    trap[0] = _Trap(marker)
    np.savez(data, x=trap, y=np.zeros(1, dtype=np.int64))
    with running_agent(tmp_path / "work") as server:
        client = AgentClient(server.url, TOKEN)
        job = client.submit(BenchRequest(str(tiny), "d", SETTINGS, data=str(data)))
        state = _wait(client, job)
    assert not marker.exists()
    assert state["state"] == "failed" and "pickle" in state["error"], state


def test_block_device_member_refused(tmp_path):
    work = tmp_path / "work"
    members = [(member("bundle/evil", tarfile.BLKTYPE), None)]
    with running_agent(work) as server:
        status, body = call(server, "POST", "/v1/jobs", body=tar_of(members), headers=job_headers())
    assert status == 400, body
    assert "special file" in body["error"]
    assert not (tmp_path / "evil").exists()
    assert [p for p in work.rglob("*") if p.is_file()] == []
