"""The agent on loopback: authentication, upload limits, unsafe archives, hash checks,
fuzzed bodies, a real benchmark end to end, cancel and timeout.

Every agent here binds 127.0.0.1 on an ephemeral port and serves a bounded number of
requests for a bounded time (`running_agent`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import tarfile
import time
from pathlib import Path

import pytest

from edgerep.devices._base import BenchRequest
from edgerep.devices._server import AgentConfig, read_token
from edgerep.devices.agent import AgentClient, AgentError
from edgerep.errors import ConfigError
from tests._tiny_bundle import make_bundle
from tests.devices._agent import (
    FAST,
    TOKEN,
    bundle_tar,
    call,
    job_headers,
    member,
    running_agent,
    tar_of,
)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("agent") / "tiny", openvino=False)


def _outside_untouched(root: Path, workdir: Path) -> None:
    """Nothing but the agent's workdir (and the caller's files) under `root`."""
    names = sorted(p.name for p in root.iterdir())
    assert "escaped" not in names and "evil" not in names, names
    leftovers = [p for p in workdir.rglob("*") if p.is_file()]
    assert leftovers == [], leftovers  # refused uploads are cleaned up


def test_auth_refused_without_or_with_wrong_token(tmp_path, caplog):
    with running_agent(tmp_path / "work") as server, caplog.at_level(logging.WARNING):
        assert call(server, "GET", "/v1/info", token=None)[0] == 401
        assert call(server, "GET", "/v1/info", token="wrong-token-0123456789")[0] == 401
        status, body = call(server, "GET", "/v1/info", token=TOKEN + "x")
        assert status == 401 and "token" in body["error"]
        # a job upload without a token is refused before its body matters
        assert call(server, "POST", "/v1/jobs", body=b"x" * 10, token=None)[0] == 401
        status, info = call(server, "GET", "/v1/info")
        assert status == 200 and info["fingerprint"]["cores_logical"] >= 1
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 4 and "127.0.0.1" in refused[0].getMessage()


def test_oversize_upload_refused_with_413_without_reading(tmp_path, bundle):
    data = bundle_tar(bundle)
    with running_agent(tmp_path / "work", max_upload_bytes=len(data) - 1) as server:
        status, body = call(server, "POST", "/v1/jobs", body=data, headers=job_headers())
        assert status == 413 and "--max-upload-mib" in body["error"]
        # a lying Content-Length far over the limit: refused from the header alone
        headers = {**job_headers(), "Content-Length": str(1 << 40)}
        assert call(server, "POST", "/v1/jobs", body=b"", headers=headers)[0] == 413
    _outside_untouched(tmp_path, tmp_path / "work")


def test_missing_length_and_wrong_type(tmp_path):
    with running_agent(tmp_path / "work") as server:
        headers = {**job_headers(), "Content-Type": "application/json"}
        assert call(server, "POST", "/v1/jobs", body=b"{}", headers=headers)[0] == 415
        assert call(server, "POST", "/v1/jobs", headers=job_headers())[0] == 411
        assert call(server, "GET", "/v1/jobs/nope")[0] == 404
        assert call(server, "GET", "/v1/../../etc/passwd")[0] == 404


@pytest.mark.parametrize(
    "members, fragment",
    [
        ([(member("../escaped"), b"x")], "outside"),
        ([(member("bundle/../../escaped"), b"x")], "outside"),
        ([(member("/tmp/escaped"), b"x")], "outside"),
        ([(member("bundle/evil", tarfile.SYMTYPE, "/etc/passwd"), None)], "link"),
        ([(member("bundle/evil", tarfile.LNKTYPE, "/etc/passwd"), None)], "link"),
        ([(member("bundle/evil", tarfile.CHRTYPE), None)], "special file"),
        ([(member("bundle/evil", tarfile.FIFOTYPE), None)], "special file"),
        ([(member("bundle/a"), b"1"), (member("bundle/a"), b"2")], "twice"),
        ([(member("elsewhere.txt"), b"x")], "neither"),
        ([(member("bundle\\..\\escaped"), b"x")], "outside"),
    ],
    ids=[
        "dotdot",
        "nested-dotdot",
        "absolute",
        "symlink",
        "hardlink",
        "chardev",
        "fifo",
        "duplicate",
        "outside-layout",
        "backslash",
    ],
)
def test_unsafe_archive_members_refused(tmp_path, members, fragment):
    work = tmp_path / "work"
    with running_agent(work) as server:
        status, body = call(server, "POST", "/v1/jobs", body=tar_of(members), headers=job_headers())
    assert status == 400, body
    assert fragment in body["error"]
    _outside_untouched(tmp_path, work)
    assert not (tmp_path.parent / "escaped").exists()


def test_symlink_then_write_through_it_refused(tmp_path):
    """A symlink member followed by a file 'inside' it: refused at the link, nothing written."""
    target = tmp_path / "victim"
    target.mkdir()
    members = [
        (member("bundle/d", tarfile.SYMTYPE, str(target)), None),
        (member("bundle/d/evil"), b"pwned"),
    ]
    with running_agent(tmp_path / "work") as server:
        status, _ = call(server, "POST", "/v1/jobs", body=tar_of(members), headers=job_headers())
    assert status == 400
    assert list(target.iterdir()) == []


def test_hash_mismatch_and_unlisted_files_refused_with_422(tmp_path, bundle):
    good = bundle_tar(bundle)
    with tarfile.open(fileobj=io.BytesIO(good)) as tar:
        members = [(m, tar.extractfile(m).read() if m.isreg() else None) for m in tar.getmembers()]
    tampered = [(m, b"junk" if m.name.endswith("model.onnx") else d) for m, d in members]
    extra = [*members, (member("bundle/extra.py"), b"import os")]
    missing = [(m, d) for m, d in members if not m.name.endswith("model.onnx")]
    with running_agent(tmp_path / "work") as server:
        for name, archive in (("tampered", tampered), ("extra", extra), ("missing", missing)):
            status, body = call(
                server, "POST", "/v1/jobs", body=tar_of(archive), headers=job_headers()
            )
            assert status == 422, (name, body)
    _outside_untouched(tmp_path, tmp_path / "work")


@pytest.mark.parametrize(
    "header",
    [
        "not json",
        json.dumps([1, 2]),
        json.dumps({"variant": "a/b"}),
        json.dumps({"variant": "x", "settings": {"exec": "rm -rf /"}}),
        json.dumps({"variant": "x", "settings": {"runtimes": ["torch"]}}),
        json.dumps({"variant": "x", "other": 1}),
        "x" * 20000,
    ],
    ids=["text", "list", "slash", "unknown-setting", "torch", "unknown-key", "huge"],
)
def test_bad_request_header_refused(tmp_path, bundle, header):
    headers = {**job_headers(), "X-Edgerep-Request": header}
    with running_agent(tmp_path / "work") as server:
        status, _ = call(server, "POST", "/v1/jobs", body=bundle_tar(bundle), headers=headers)
    assert status == 400


def test_fuzzed_bodies_keep_the_agent_serving(tmp_path, bundle):
    rng = random.Random(0)
    good = bundle_tar(bundle)
    bodies = [bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 4096))) for _ in range(12)]
    with tarfile.open(fileobj=io.BytesIO(good)) as tar:
        end = max(m.offset_data + m.size for m in tar.getmembers())  # after: only padding
    bodies += [good[: rng.randint(1, end - 1)] for _ in range(12)]  # truncated archives
    bodies += [good[:512] + bytes(rng.getrandbits(8) for _ in range(2048))]
    statuses = set()
    with running_agent(tmp_path / "work", request_timeout_s=1.0) as server:
        for body in bodies:
            status, answer = call(server, "POST", "/v1/jobs", body=body, headers=job_headers())
            statuses.add(status)
            assert 400 <= status < 500, answer
        # a lying Content-Length (body shorter than announced) must not hang the agent
        headers = {**job_headers(), "Content-Length": str(len(good))}
        status, _ = call(server, "POST", "/v1/jobs", body=good[:100], headers=headers)
        assert status == 408
        assert call(server, "GET", "/v1/info")[0] == 200
    assert statuses <= {400, 422}
    _outside_untouched(tmp_path, tmp_path / "work")


def test_real_bundle_benchmarked_end_to_end(tmp_path, bundle):
    work = tmp_path / "work"
    with running_agent(work) as server:
        client = AgentClient(server.url, TOKEN)
        request = BenchRequest(
            str(bundle), "tiny", {"latency": FAST, "roofline": False, "threads": 1}
        )
        report = client.run(request, timeout_s=120)
        assert [r["runtime"] for r in report["rows"]] == ["onnxruntime"]  # no torch, ever
        row = report["rows"][0]
        assert row["latency"]["stats"]["n"] >= 10 and row["latency"]["stats"]["p50_ms"] > 0
        assert row["bundle"] is None  # the agent's paths stay there
        assert report["environment"]["cores_logical"] >= 1
        assert report["settings"]["threads"] == 1
    assert [p for p in work.rglob("*")] == []  # the job directory was removed


def test_cancel_and_timeout(tmp_path, bundle):
    slow = {**FAST, "min_seconds": 30.0, "max_iters": 10**9, "min_iters": 10**8}
    settings = {"latency": slow, "roofline": False}
    with running_agent(tmp_path / "work", job_timeout_s=3.0) as server:
        client = AgentClient(server.url, TOKEN)
        first = client.submit(BenchRequest(str(bundle), "a", settings))
        second = client.submit(BenchRequest(str(bundle), "b", settings))
        assert client.job(second)["state"] == "queued"  # one job at a time
        assert client.cancel(second)["state"] == "cancelled"
        deadline = time.monotonic() + 30
        while client.job(first)["state"] in ("queued", "running"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        state = client.job(first)
        assert state["state"] == "timeout" and "--job-timeout" in state["error"]
        with pytest.raises(AgentError, match="cancelled"):
            client.run(BenchRequest(str(bundle), "c", settings), timeout_s=0.5)
    assert [p for p in (tmp_path / "work").rglob("*")] == []


def test_queue_limit(tmp_path, bundle):
    slow = {**FAST, "min_seconds": 30.0, "max_iters": 10**9, "min_iters": 10**8}
    with running_agent(tmp_path / "work", max_queue=1, job_timeout_s=5.0) as server:
        client = AgentClient(server.url, TOKEN)
        client.submit(BenchRequest(str(bundle), "a", {"latency": slow, "roofline": False}))
        with pytest.raises(AgentError) as e:
            client.submit(BenchRequest(str(bundle), "b", {"latency": slow, "roofline": False}))
        assert e.value.status == 503


def test_token_file_rules(tmp_path):
    f = tmp_path / "token"
    f.write_text("short\n")
    os.chmod(f, 0o600)
    with pytest.raises(ConfigError, match="at least 16"):
        read_token(f)
    f.write_text(TOKEN + "\n")
    os.chmod(f, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        read_token(f)
    os.chmod(f, 0o600)
    assert read_token(f) == TOKEN.encode()
    with pytest.raises(ConfigError, match="go together"):
        AgentConfig(token=b"x" * 16, workdir=tmp_path, tls_cert="c.pem")
    with pytest.raises(ConfigError, match="never loaded"):
        AgentConfig(token=b"x" * 16, workdir=tmp_path, runtimes=("torch",))


def test_non_loopback_without_tls_warns(tmp_path, caplog):
    from edgerep.devices._server import make_server

    config = AgentConfig(token=TOKEN.encode(), workdir=tmp_path, host="0.0.0.0", port=0)
    with caplog.at_level(logging.WARNING):
        server = make_server(config)
        server.close()
    assert any("WITHOUT TLS" in r.getMessage() for r in caplog.records)


def test_agent_requiring_signed_bundles(tmp_path):
    from edgerep.bundle import sign_bundle

    key = b"bundle-signing-key-0123456789"
    unsigned = make_bundle(tmp_path / "unsigned", openvino=False)
    signed = make_bundle(tmp_path / "signed", openvino=False)
    sign_bundle(signed, key)
    other = make_bundle(tmp_path / "other", openvino=False)
    sign_bundle(other, b"another-key-0123456789abcdef")
    with running_agent(tmp_path / "work", bundle_key=key) as server:
        for bundle in (unsigned, other):
            status, body = call(
                server, "POST", "/v1/jobs", body=bundle_tar(bundle), headers=job_headers()
            )
            assert status == 422 and "sign" in body["error"], body
            assert str(tmp_path) not in body["error"]  # no agent paths in answers
        client = AgentClient(server.url, TOKEN)
        request = BenchRequest(str(signed), "signed", {"latency": FAST, "roofline": False})
        assert client.run(request, timeout_s=120)["rows"][0]["runtime"] == "onnxruntime"


def test_connection_cap_and_idle_connections(tmp_path, monkeypatch):
    """Idle connections hold at most MAX_CONNECTIONS threads; beyond, connections are closed,
    and the agent serves again once they go."""
    import http.client
    import socket

    from edgerep.devices import _server

    monkeypatch.setattr(_server, "MAX_CONNECTIONS", 3)
    with running_agent(tmp_path / "work", request_timeout_s=30.0) as server:
        idle = [socket.create_connection(server.server_address[:2], timeout=5) for _ in range(3)]
        time.sleep(0.5)  # the serving loop accepts them
        with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
            call(server, "GET", "/v1/info")
        for s in idle:
            s.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                if call(server, "GET", "/v1/info")[0] == 200:
                    break
            except (ConnectionError, http.client.HTTPException, OSError):
                pass
            assert time.monotonic() < deadline, "the agent did not recover"
            time.sleep(0.1)
