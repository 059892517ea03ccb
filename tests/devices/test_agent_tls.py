"""The agent over TLS on loopback, with a self-signed certificate made by the openssl CLI."""

from __future__ import annotations

import shutil
import socket
import subprocess

import pytest

from edgerep.devices._base import BenchRequest
from edgerep.devices.agent import AgentClient, AgentError
from tests._tiny_bundle import make_bundle
from tests.devices._agent import FAST, TOKEN, running_agent


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed: cannot make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(d / "key.pem"),
            "-out",
            str(d / "cert.pem"),
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return d / "cert.pem", d / "key.pem"


def test_tls_agent(tmp_path, cert):
    cert_file, key_file = cert
    bundle = make_bundle(tmp_path / "tiny", openvino=False)
    with running_agent(tmp_path / "w", tls_cert=str(cert_file), tls_key=str(key_file)) as server:
        assert server.url.startswith("https://127.0.0.1:")
        port = server.server_address[1]
        # a plaintext client stalls nothing and gets no answer
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /v1/info HTTP/1.0\r\n\r\n")
            assert not s.recv(100).startswith(b"HTTP/")
        # the certificate is verified: without its CA the client refuses the agent
        with pytest.raises(AgentError, match="CERTIFICATE_VERIFY_FAILED"):
            AgentClient(server.url, TOKEN).info()
        client = AgentClient(f"agents://127.0.0.1:{port}", TOKEN, ca_file=str(cert_file))
        assert client.info()["agent"] == "edgerep"
        report = client.run(
            BenchRequest(str(bundle), "tiny", {"latency": FAST, "roofline": False}), timeout_s=120
        )
        assert report["rows"][0]["runtime"] == "onnxruntime"
        with pytest.raises(AgentError) as e:
            AgentClient(server.url, "wrong-token-0123456789", ca_file=str(cert_file)).info()
        assert e.value.status == 401
