"""``edgerep agent serve``: a small, default-deny benchmark service (standard library only).

API (every request needs ``Authorization: Bearer TOKEN``; JSON answers):

- ``GET /v1/info``: the device fingerprint, runtimes, queue length.
- ``POST /v1/jobs``: body = the upload of `edgerep.devices._archive` (an
  uncompressed tar, ``Content-Length`` required), header ``X-Edgerep-Request`` =
  the JSON request (variant name and bench settings). The upload is streamed to the
  job's directory, unpacked safely and checked against the manifest *before* the
  answer; ``202 {"id": ...}`` queues it.
- ``GET /v1/jobs/ID``: ``state`` (queued, running, done, failed, cancelled,
  timeout) and, when done, the ``report``.
- ``DELETE /v1/jobs/ID``: cancel (a running job's process group is killed).

Statuses: 401 no or wrong token, 429 (with ``Retry-After``) an address that sent
``max_failed_logins`` wrong or missing tokens within ``failed_login_window_s``
(refused before its token is even compared, until the window has slid past the
oldest failure; the table of addresses is bounded, least recently failed dropped
first), 400 malformed request or unsafe archive, 404
unknown path or job, 411 no Content-Length, 413 body over the limit (refused
before reading it), 415 not a tar upload, 422 bundle does not match its manifest,
503 queue full.

One worker runs jobs one at a time, each in a child process (``python -m
edgerep.devices._job``) with a timeout, in its own directory under the workdir,
removed when the job ends. The child runs `edgerep.devices.local.run_request`,
the code ``edgerep bench`` runs, on the runtimes this agent allows (never torch:
no pickle, no .pt2, no Python from a bundle is loaded).
"""

from __future__ import annotations

import hmac
import http.server
import ipaddress
import json
import logging
import math
import os
import shutil
import socket
import ssl
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgerep.devices._jobs import Job, JobQueue, QueueFullError
from edgerep.devices._logins import FailedLogins
from edgerep.errors import ConfigError, EdgerepError, VerificationError

__all__ = [
    "AGENT_RUNTIMES",
    "AgentConfig",
    "AgentServer",
    "FailedLogins",
    "make_server",
    "read_token",
]

logger = logging.getLogger(__name__)

API = "/v1"
#: runtimes an agent may run: their artifacts are data for a native engine, never code
AGENT_RUNTIMES = ("onnxruntime", "openvino", "executorch", "tensorrt", "coreml")
MAX_REQUEST_HEADER_BYTES = 16 * 1024
#: connections handled at once; more are closed at once
MAX_CONNECTIONS = 32
#: slowest upload accepted, on top of the per-read timeout
MIN_UPLOAD_BYTES_PER_S = 64 * 1024
_CHUNK = 1 << 20


def read_token(path: str | os.PathLike[str]) -> bytes:
    """The token in `path` (surrounding whitespace stripped).

    Raises:
        ConfigError: unreadable, shorter than 16 characters, or readable by others.
    """
    p = Path(path).expanduser()
    try:
        token = p.read_bytes().strip()
        mode = p.stat().st_mode
    except OSError as e:
        raise ConfigError(
            f"cannot read the token file {str(p)!r}: {e}; create one with e.g. "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE; chmod 600 FILE`"
        ) from e
    if len(token) < 16:
        raise ConfigError(
            f"the token in {str(p)!r} has {len(token)} characters; use at least 16 random ones "
            "(secrets.token_urlsafe(32))"
        )
    if os.name == "posix" and mode & 0o077:
        raise ConfigError(
            f"token file {str(p)!r} is readable by other users (mode {oct(mode & 0o777)}); "
            f"chmod 600 {str(p)!r}"
        )
    return token


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class AgentConfig:
    """How an agent serves (see ``edgerep agent serve --help``)."""

    token: bytes
    workdir: Path
    host: str = "127.0.0.1"
    port: int = 8765
    tls_cert: str | None = None
    tls_key: str | None = None
    max_upload_bytes: int = 512 * 1024 * 1024
    job_timeout_s: float = 600.0
    max_queue: int = 4
    request_timeout_s: float = 30.0
    runtimes: tuple[str, ...] = AGENT_RUNTIMES
    bundle_key: bytes | None = None
    python: str = field(default=sys.executable)
    max_failed_logins: int = 10
    failed_login_window_s: float = 60.0
    max_tracked_addresses: int = 4096

    def __post_init__(self) -> None:
        if not self.host.strip():
            raise ConfigError(
                "--host is empty (that would listen on every interface); give an address: "
                "127.0.0.1 (the default), ::1, or 0.0.0.0 to listen on every interface on purpose"
            )
        if isinstance(self.port, bool) or not 0 <= self.port <= 65535:
            raise ConfigError(f"--port {self.port}: give 1 to 65535, or 0 for any free port")
        if (
            self.max_upload_bytes < 1
            or not 0 < self.job_timeout_s < math.inf  # NaN fails too
            or self.max_queue < 1
        ):
            raise ConfigError(
                "agent limits must be positive and finite: max upload, job timeout and queue "
                f"length; got {self.max_upload_bytes}, {self.job_timeout_s}, {self.max_queue}"
            )
        if (
            self.max_failed_logins < 1
            or not 0 < self.failed_login_window_s <= 86400
            or self.max_tracked_addresses < 1
        ):
            raise ConfigError(
                "failed-login limits must be positive and the window at most a day (86400 s): "
                f"--max-failed-logins and --failed-login-window; got {self.max_failed_logins}, "
                f"{self.failed_login_window_s}"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together; give both or neither")
        bad = sorted(set(self.runtimes) - set(AGENT_RUNTIMES))
        if bad:
            raise ConfigError(
                f"an agent cannot run {bad}: only {', '.join(AGENT_RUNTIMES)} (no torch: a "
                "bundle's Python or pickles are never loaded)"
            )


def _tls_context(config: AgentConfig) -> ssl.SSLContext | None:
    """The server's TLS context (None without ``--tls-cert``).

    Raises:
        ConfigError: the certificate or key cannot be read or do not belong together.
    """
    if not config.tls_cert:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(
            f"cannot load --tls-cert {config.tls_cert!r} / --tls-key {config.tls_key!r}: {e}; "
            "give a PEM certificate and its unencrypted PEM private key"
        ) from e
    return context


class _HttpError(Exception):
    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class AgentServer(http.server.ThreadingHTTPServer):
    """The HTTP server plus its job queue and worker; see the module docstring."""

    daemon_threads = True
    request_queue_size = 16

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        self.address_family = family
        # what can be wrong with the files is said before the port is taken
        context = _tls_context(config)
        self.workdir = Path(config.workdir).expanduser().resolve()
        try:
            self.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(
                f"cannot use --workdir {str(self.workdir)!r}: {e}; give a directory this user "
                "may create and write"
            ) from e
        # the per-connection socket timeout bounds slow or stalled clients
        handler = type("_TimedHandler", (_Handler,), {"timeout": config.request_timeout_s})
        super().__init__((config.host, config.port), handler)
        if context is not None:
            # the handshake happens in the connection's thread, not in the accept loop, so a
            # client that never completes it cannot stall the agent
            self.socket = context.wrap_socket(
                self.socket, server_side=True, do_handshake_on_connect=False
            )
        self.jobs = JobQueue(
            max_queue=config.max_queue, job_timeout_s=config.job_timeout_s, python=config.python
        )
        self.requests_handled = 0
        self.failed_logins = FailedLogins(
            config.max_failed_logins,
            config.failed_login_window_s,
            max_addresses=config.max_tracked_addresses,
        )
        self._fingerprint: dict[str, Any] | None = None
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._closed = threading.Event()
        self._loop_done = threading.Event()
        self._loop_done.set()  # no loop running yet

    @property
    def url(self) -> str:
        host, port = str(self.server_address[0]), self.server_address[1]
        scheme = "https" if self.config.tls_cert else "http"
        shown = f"[{host}]" if ":" in str(host) else host
        return f"{scheme}://{shown}:{port}"

    def fingerprint(self) -> dict[str, Any]:
        if self._fingerprint is None:
            from edgerep.devices.local import describe_local_device

            self._fingerprint = describe_local_device()
        return self._fingerprint

    # --- serving -------------------------------------------------------------------

    def serve(self, *, max_requests: int | None = None, max_seconds: float | None = None) -> None:
        """Serve until closed, or until `max_requests` requests or `max_seconds` pass."""
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        self.timeout = 0.2
        self._loop_done.clear()
        try:
            while not self._closed.is_set():
                if max_requests is not None and self.requests_handled >= max_requests:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    break
                self.handle_request()
        finally:
            self._loop_done.set()

    def close(self) -> None:
        """Stop the worker (cancelling a running job) and close the socket."""
        self._closed.set()
        self._loop_done.wait(timeout=5)  # the serving loop notices within its 0.2 s timeout
        self.jobs.close()
        self.server_close()

    def process_request(self, request: Any, client_address: Any) -> None:
        self.requests_handled += 1
        if not self._slots.acquire(blocking=False):
            # every handler thread is busy (e.g. slow uploads): drop, do not pile up threads
            logger.warning(
                "agent: %d connections open; refused %s", MAX_CONNECTIONS, client_address[0]
            )
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.warning("agent: request from %s failed", client_address, exc_info=True)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: AgentServer
    server_version = "edgerep-agent"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        logger.info("agent: %s %s", self.client_address[0], format % args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        headers: dict[str, str] = {}
        try:
            self._authenticate()
            status, body = self._route(method)
        except _HttpError as e:
            status, body, headers = e.status, {"error": str(e)}, e.headers
        except VerificationError as e:
            status, body = 422, {"error": str(e)}
        except (ConfigError, ValueError) as e:
            status, body = 400, {"error": str(e)}
        except EdgerepError as e:
            status, body = 400, {"error": str(e)}
        if "error" in body:  # the client need not learn where the agent keeps its files
            body["error"] = body["error"].replace(str(self.server.workdir), "<workdir>")
        self._send(status, body, headers)

    def _authenticate(self) -> None:
        address = str(self.client_address[0])
        failures = self.server.failed_logins
        wait_s = failures.retry_after_s(address)
        if wait_s > 0:  # refused before the token is compared: no guessing while blocked
            self.close_connection = True
            logger.info(
                "agent: refused %s %s from %s: blocked for %.0f s more after failed logins",
                self.command,
                self.path[:200],
                address,
                wait_s,
            )
            raise _HttpError(
                429,
                f"too many failed logins from {address}; retry after {math.ceil(wait_s)} s",
                headers={"Retry-After": str(math.ceil(wait_s))},
            )
        header = self.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        expected = self.server.config.token
        ok = scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode("utf-8", "replace"), expected
        )
        if not ok:
            logger.warning(
                "agent: refused %s %s from %s: %s token",
                self.command,
                self.path[:200],
                self.client_address[0],
                "no" if not header else "wrong",
            )
            if failures.failed(address):
                logger.warning(
                    "agent: %s sent %d missing or wrong tokens within %.0f s; refusing it (429) "
                    "until the oldest is %.0f s old",
                    address,
                    failures.limit,
                    failures.window_s,
                    failures.window_s,
                )
            raise _HttpError(401, "missing or wrong bearer token")

    def _route(self, method: str) -> tuple[int, dict[str, Any]]:
        path = self.path.split("?", 1)[0]
        if method == "GET" and path == f"{API}/info":
            return 200, self._info()
        if method == "POST" and path == f"{API}/jobs":
            return self._create_job()
        if path.startswith(f"{API}/jobs/"):
            job_id = path[len(f"{API}/jobs/") :]
            if method in ("GET", "DELETE"):
                jobs = self.server.jobs
                state = jobs.get(job_id) if method == "GET" else jobs.cancel_id(job_id)
                if state is None:
                    raise _HttpError(404, f"no job {job_id[:64]!r} on this agent")
                return 200, state
        raise _HttpError(404, f"no {method} {path[:200]!r}; see GET {API}/info")

    def _info(self) -> dict[str, Any]:
        from edgerep import __version__

        return {
            "agent": "edgerep",
            "version": __version__,
            "fingerprint": self.server.fingerprint(),
            "runtimes": list(self.server.config.runtimes),
            **self.server.jobs.counts(),
            "max_upload_bytes": self.server.config.max_upload_bytes,
            "job_timeout_s": self.server.config.job_timeout_s,
        }

    def _request_json(self) -> dict[str, Any]:
        raw = self.headers.get("X-Edgerep-Request", "")
        if not raw or len(raw) > MAX_REQUEST_HEADER_BYTES:
            raise _HttpError(
                400,
                f"X-Edgerep-Request must hold the request JSON (1..{MAX_REQUEST_HEADER_BYTES} bytes)",
            )
        try:
            request = json.loads(raw)
        except json.JSONDecodeError as e:
            raise _HttpError(400, f"X-Edgerep-Request is not JSON: {e}") from e
        if not isinstance(request, dict) or set(request) - {"variant", "settings"}:
            raise _HttpError(400, "the request must be {'variant': NAME, 'settings': {...}}")
        variant = request.get("variant", "bundle")
        if not isinstance(variant, str) or not variant or len(variant) > 128 or "/" in variant:
            raise _HttpError(400, f"bad variant name {str(variant)[:64]!r}")
        settings = request.get("settings", {})
        if not isinstance(settings, dict):
            raise _HttpError(400, "request settings must be an object")
        from edgerep.devices._base import SETTINGS_KEYS

        unknown = sorted(set(settings) - set(SETTINGS_KEYS))
        if unknown:
            raise _HttpError(
                400, f"unknown settings {unknown}; allowed: {', '.join(SETTINGS_KEYS)}"
            )
        allowed = self.server.config.runtimes
        asked = settings.get("runtimes")
        if asked is None:
            pass  # the job picks those of `allowed` installed here with an artifact
        elif not isinstance(asked, list) or not all(isinstance(r, str) for r in asked):
            raise _HttpError(400, "settings.runtimes must be a list of names")
        elif set(asked) - set(allowed):
            raise _HttpError(
                400,
                f"this agent does not run {sorted(set(asked) - set(allowed))}; it runs "
                f"{', '.join(allowed)}",
            )
        return {"variant": variant, "settings": settings}

    def _create_job(self) -> tuple[int, dict[str, Any]]:
        limit = self.server.config.max_upload_bytes
        length_text = self.headers.get("Content-Length")
        if length_text is None or self.headers.get("Transfer-Encoding"):
            raise _HttpError(411, "a job upload needs a Content-Length (no chunked bodies)")
        try:
            length = int(length_text)
        except ValueError as e:
            raise _HttpError(400, f"bad Content-Length {length_text[:32]!r}") from e
        if length < 0:
            raise _HttpError(400, "negative Content-Length")
        if length > limit:
            self.close_connection = True
            raise _HttpError(
                413,
                f"the upload has {length} bytes; this agent accepts at most {limit} "
                "(edgerep agent serve --max-upload-mib)",
            )
        if self.headers.get("Content-Type", "") != "application/x-tar":
            raise _HttpError(415, "a job upload is Content-Type: application/x-tar")
        request = self._request_json()
        from edgerep.devices._archive import BUNDLE_DIR, DATA_NAME, safe_extract, verify_bundle

        job_id = uuid.uuid4().hex
        directory = self.server.workdir / f"job-{job_id}"
        directory.mkdir(mode=0o700)
        started = time.perf_counter()
        try:
            upload = directory / "upload.tar"
            self._receive(upload, length)
            received = time.perf_counter()
            with open(upload, "rb") as f:
                safe_extract(f, directory / "files", max_bytes=limit)
            upload.unlink()
            verify_bundle(directory / "files" / BUNDLE_DIR, key=self.server.config.bundle_key)
            data = directory / "files" / DATA_NAME
            job_request = {
                **request,
                "data": str(data) if data.is_file() else None,
                "allowed_runtimes": list(self.server.config.runtimes),
            }
            (directory / "request.json").write_text(json.dumps(job_request))
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        job = Job(job_id, directory, job_request)
        job.seconds = {
            "receive": received - started,
            "unpack_and_verify": time.perf_counter() - received,
        }
        try:
            self.server.jobs.submit(job)
        except QueueFullError as e:
            shutil.rmtree(directory, ignore_errors=True)
            raise _HttpError(503, str(e)) from e
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return 202, {"id": job_id, "state": job.state}

    def _receive(self, path: Path, length: int) -> None:
        left = length
        limit_s = self.server.config.request_timeout_s + length / MIN_UPLOAD_BYTES_PER_S
        deadline = time.monotonic() + limit_s
        with open(path, "xb") as f:
            while left > 0:
                if time.monotonic() > deadline:
                    raise _HttpError(
                        408, f"the upload took over {limit_s:.0f} s with {left} bytes to come"
                    )
                try:
                    chunk = self.rfile.read(min(_CHUNK, left))
                except TimeoutError as e:
                    raise _HttpError(
                        408, f"the upload stalled with {left} bytes still to come"
                    ) from e
                if not chunk:
                    raise _HttpError(
                        400, f"the upload ended {left} bytes before its Content-Length"
                    )
                f.write(chunk)
                left -= len(chunk)

    def _send(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(body, allow_nan=False, default=str).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if status == 401:
                self.send_header("WWW-Authenticate", 'Bearer realm="edgerep-agent"')
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            logger.info("agent: client %s went away", self.client_address[0])
        self.close_connection = True


def make_server(config: AgentConfig) -> AgentServer:
    """Bind the agent (port 0 picks a free one); warns when reachable from the network
    without TLS. Call ``serve()`` to run it and ``close()`` to stop it."""
    server = AgentServer(config)
    if not _is_loopback(config.host):
        if config.tls_cert:
            logger.warning(
                "agent: listening on %s (not loopback): anyone who can reach it and holds the "
                "token can run benchmarks here",
                server.url,
            )
        else:
            logger.warning(
                "agent: listening on %s WITHOUT TLS: the token and the bundles cross the network "
                "in clear; use --tls-cert/--tls-key, or an SSH tunnel to 127.0.0.1",
                server.url,
            )
    return server
