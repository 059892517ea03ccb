"""Helpers for agent tests: a loopback agent in a thread, raw HTTP calls, hand-made tars."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgerep.devices._server import AgentConfig, AgentServer, make_server

TOKEN = "t0ken-for-tests-0123456789"
FAST = {"min_iters": 5, "min_seconds": 0.0, "warmup_iters": 1, "repeats": 2}


@contextlib.contextmanager
def running_agent(workdir: Path, **overrides: Any) -> Iterator[AgentServer]:
    """An agent on 127.0.0.1 with an ephemeral port, serving at most 60 s / 500 requests."""
    config = AgentConfig(token=TOKEN.encode(), workdir=workdir, port=0, **overrides)
    server = make_server(config)
    thread = threading.Thread(
        target=server.serve, kwargs={"max_requests": 500, "max_seconds": 60}, daemon=True
    )
    thread.start()
    try:
        yield server
    finally:
        server.close()
        thread.join(timeout=10)


def call(
    server: AgentServer,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    token: str | None = TOKEN,
) -> tuple[int, dict[str, Any]]:
    """One raw request; returns (status, JSON body)."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(str(host), port, timeout=10)
    h = dict(headers or {})
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in h.items():
            conn.putheader(k, v)
        if body is not None and "Content-Length" not in h:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        if body:
            with contextlib.suppress(OSError):  # the agent may close before reading a refused body
                conn.send(body)
        answer = conn.getresponse()
        raw = answer.read()
        return answer.status, (json.loads(raw) if raw else {})
    finally:
        conn.close()


def job_headers(variant: str = "tiny", settings: dict[str, Any] | None = None) -> dict[str, str]:
    return {
        "Content-Type": "application/x-tar",
        "X-Edgerep-Request": json.dumps(
            {"variant": variant, "settings": settings or {"latency": FAST, "roofline": False}}
        ),
    }


def tar_of(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    """A tar archive from explicit members (data None for links, dirs, devices)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o644
    return info


def bundle_tar(bundle: Path) -> bytes:
    from edgerep.devices._archive import pack_bundle

    buf = io.BytesIO()
    pack_bundle(bundle, buf)
    return buf.getvalue()
