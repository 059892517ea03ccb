"""The client side of an edgerep agent (see `edgerep.devices._server` for the service).

Standard library only (``http.client``, ``ssl``): the agent's API is four calls,
so no HTTP library is needed on either side. URLs: ``agent://host:port`` and
``http://`` are plaintext (fine on loopback or through an SSH tunnel);
``agents://host:port`` and ``https://`` use TLS, verified against the system CAs
or the device's ``ca_file``. The token comes from the device's ``token_file``,
else ``--token-file``, else ``$EDGEREP_AGENT_TOKEN``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import ssl
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from edgerep.devices._base import BenchRequest, Device
from edgerep.errors import ConfigError, EdgerepError

__all__ = ["AgentClient", "AgentError", "AgentTransport", "parse_agent_url", "resolve_token"]

TOKEN_ENV = "EDGEREP_AGENT_TOKEN"
_MAX_ANSWER_BYTES = 128 * 1024 * 1024


class AgentError(EdgerepError):
    """The agent could not be reached, refused the request, or the job failed there."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def parse_agent_url(url: str) -> tuple[bool, str, int]:
    """``(tls, host, port)`` of an agent URL (default port 8765).

    Raises:
        ConfigError: another scheme, or no host.
    """
    parts = urlsplit(url)
    schemes = {"agent": False, "http": False, "agents": True, "https": True}
    if parts.scheme not in schemes or not parts.hostname:
        raise ConfigError(
            f"bad agent URL {url!r}; use agent://HOST:PORT (plaintext: loopback or a tunnel) or "
            "agents://HOST:PORT / https://HOST:PORT (TLS)"
        )
    try:
        port = parts.port or 8765
    except ValueError as e:
        raise ConfigError(f"bad port in agent URL {url!r}: {e}") from e
    return schemes[parts.scheme], parts.hostname, port


def resolve_token(token_file: str | None = None) -> str | None:
    """The client token: `token_file`'s content, else ``$EDGEREP_AGENT_TOKEN``, else None."""
    if token_file:
        from edgerep.devices._server import read_token

        return read_token(token_file).decode()
    return os.environ.get(TOKEN_ENV) or None


@dataclass
class AgentClient:
    """Talks to one agent. Every call takes at most `timeout_s` per network operation."""

    url: str
    token: str | None
    timeout_s: float = 10.0
    ca_file: str | None = None

    def _connection(self) -> http.client.HTTPConnection:
        tls, host, port = parse_agent_url(self.url)
        if not tls:
            return http.client.HTTPConnection(host, port, timeout=self.timeout_s)
        context = ssl.create_default_context(cafile=self.ca_file)
        return http.client.HTTPSConnection(host, port, timeout=self.timeout_s, context=context)

    def _call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        if not self.token:
            raise ConfigError(
                f"no token for agent {self.url}: give --token-file FILE, set ${TOKEN_ENV}, or "
                "token_file in devices.toml"
            )
        conn = self._connection()
        try:
            # the agent refuses a bad request from its headers and closes before reading
            # the body: its answer (e.g. 400 naming the problem) is already sent, so read
            # it instead of reporting an unreachable agent
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                conn.request(
                    method,
                    path,
                    body=body,
                    headers={"Authorization": f"Bearer {self.token}", **(headers or {})},
                )
            answer = conn.getresponse()
            raw = answer.read(_MAX_ANSWER_BYTES + 1)
        except (OSError, http.client.HTTPException) as e:
            raise AgentError(f"agent {self.url} cannot be reached: {e}") from e
        finally:
            conn.close()
        try:
            data = json.loads(raw) if raw else {}
        except json.JSONDecodeError as e:
            raise AgentError(f"agent {self.url} answered {answer.status} with non-JSON") from e
        if answer.status >= 400:
            raise AgentError(
                f"agent {self.url} refused {method} {path} ({answer.status}): "
                f"{data.get('error', '')}",
                status=answer.status,
            )
        return data

    def info(self) -> dict[str, Any]:
        """The agent's fingerprint, runtimes and queue."""
        return self._call("GET", "/v1/info")

    def submit(self, request: BenchRequest) -> str:
        """Upload `request`'s bundle (and dataset) and queue it; returns the job id."""
        from edgerep.devices._archive import pack_bundle

        with tempfile.TemporaryFile() as upload:
            size = pack_bundle(request.bundle, upload, data=request.data)
            upload.seek(0)
            header = json.dumps({"variant": request.variant, "settings": dict(request.settings)})
            answer = self._call(
                "POST",
                "/v1/jobs",
                body=upload,
                headers={
                    "Content-Type": "application/x-tar",
                    "Content-Length": str(size),
                    "X-Edgerep-Request": header,
                },
            )
        return str(answer["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        """The job's state (and report when done)."""
        return self._call("GET", f"/v1/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a queued or running job."""
        return self._call("DELETE", f"/v1/jobs/{job_id}")

    def run(self, request: BenchRequest, *, timeout_s: float, poll_s: float = 0.05) -> dict:
        """Submit, wait for the job and return its report (cancelled on timeout).

        Raises:
            AgentError: refused, failed, cancelled or over `timeout_s`.
        """
        job_id = self.submit(request)
        deadline = time.monotonic() + timeout_s
        wait = poll_s
        while True:
            state = self.job(job_id)
            if state["state"] == "done":
                return dict(state["report"])
            if state["state"] in ("failed", "cancelled", "timeout"):
                raise AgentError(f"job {job_id} on {self.url} {state['state']}: {state['error']}")
            if time.monotonic() > deadline:
                self.cancel(job_id)
                raise AgentError(f"job {job_id} on {self.url} took over {timeout_s:g} s; cancelled")
            time.sleep(wait)
            wait = min(wait * 1.5, 1.0)


def _client(device: Device, timeout_s: float) -> AgentClient:
    options = device.options
    token = resolve_token(options.get("token_file")) if options.get("token_file") else None
    token = token or options.get("_token") or resolve_token(None)
    return AgentClient(device.address, token, timeout_s, options.get("ca_file"))


class AgentTransport:
    """Remote agents named in devices.toml or given as URLs."""

    name = "agent"

    def discover(self, specs: Sequence[Mapping[str, Any]], *, timeout_s: float) -> list[Device]:
        from concurrent.futures import ThreadPoolExecutor

        devices = [self.device(spec) for spec in specs]
        if not devices:
            return []
        with ThreadPoolExecutor(max_workers=min(8, len(devices))) as pool:
            return list(pool.map(lambda d: self.probe(d, timeout_s), devices))

    def device(self, spec: Mapping[str, Any]) -> Device:
        """The (unprobed) device of a devices.toml entry or ``--device URL``."""
        url = str(spec["url"])
        parse_agent_url(url)
        options = {
            k: spec[k] for k in ("token_file", "ca_file", "_token", "timeout_s") if spec.get(k)
        }
        return Device("agent", str(spec.get("name", url)), url, {}, True, "", options)

    def probe(self, device: Device, timeout_s: float) -> Device:
        """`device` with its fingerprint, or with the reason it did not answer."""
        try:
            info = _client(device, timeout_s).info()
        except EdgerepError as e:
            return Device(
                device.transport, device.name, device.address, {}, False, str(e), device.options
            )
        description = {**info.get("fingerprint", {}), "agent_runtimes": info.get("runtimes")}
        return Device(
            device.transport, device.name, device.address, description, True, "", device.options
        )

    def bench(self, device: Device, request: BenchRequest, *, timeout_s: float) -> dict[str, Any]:
        return _client(device, min(timeout_s, 60.0)).run(request, timeout_s=timeout_s)
