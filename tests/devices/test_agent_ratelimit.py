"""Failed-login rate limiting: 429 with Retry-After after N failures in a window, logged,
lifted when the window slides past; the tracking table stays bounded."""

from __future__ import annotations

import http.client
import logging
import time

import pytest

from edgerep.devices._server import AgentConfig, FailedLogins
from edgerep.errors import ConfigError
from tests.devices._agent import TOKEN, running_agent


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_sliding_window():
    clock = Clock()
    table = FailedLogins(3, 10.0, clock=clock)
    assert table.retry_after_s("a") == 0
    assert table.failed("a") is False
    clock.now += 5
    assert table.failed("a") is False
    clock.now += 4  # t = 109: the third failure within 10 s blocks
    assert table.failed("a") is True
    assert table.retry_after_s("a") == pytest.approx(1.0)  # oldest (t=100) + 10 - 109
    assert table.retry_after_s("b") == 0  # per address
    clock.now += 1.5  # the oldest failure left the window: 2 remain, not blocked
    assert table.retry_after_s("a") == 0
    assert table.failed("a") is False  # back to 3 in the window, already warned once
    assert table.retry_after_s("a") == pytest.approx(4.5)  # until t=105 + 10
    clock.now += 100
    assert table.retry_after_s("a") == 0 and len(table) == 0  # forgotten entirely


def test_table_is_bounded():
    clock = Clock()
    table = FailedLogins(5, 60.0, max_addresses=100, clock=clock)
    for i in range(5000):
        table.failed(f"10.0.{i // 256}.{i % 256}")
    for _ in range(50):
        table.failed("attacker")
    assert len(table) == 100
    assert len(table._failures["attacker"]) == 5  # at most `limit` timestamps per address
    assert table.retry_after_s("attacker") > 0
    assert table.retry_after_s("10.0.0.0") == 0  # the least recently failed were dropped


def test_limits_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="failed-login"):
        AgentConfig(token=TOKEN.encode(), workdir=tmp_path, max_failed_logins=0)
    # an endless window would block an address forever (and Retry-After cannot be inf)
    for window in (float("inf"), float("nan"), 0.0, 86401.0):
        with pytest.raises(ConfigError, match="failed-login"):
            AgentConfig(token=TOKEN.encode(), workdir=tmp_path, failed_login_window_s=window)


def _get(server, token):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(str(host), port, timeout=10)
    try:
        conn.request("GET", "/v1/info", headers={"Authorization": f"Bearer {token}"})
        answer = conn.getresponse()
        answer.read()
        return answer.status, answer.getheader("Retry-After")
    finally:
        conn.close()


def test_agent_answers_429_after_failed_logins(tmp_path, caplog):
    with (
        running_agent(tmp_path / "work", max_failed_logins=3, failed_login_window_s=1.5) as server,
        caplog.at_level(logging.INFO, logger="edgerep.devices._server"),
    ):
        assert _get(server, TOKEN)[0] == 200
        assert [_get(server, "wrong-token-0123456789")[0] for _ in range(3)] == [401] * 3
        # blocked: even the right token is refused before it is compared
        status, retry_after = _get(server, TOKEN)
        assert status == 429 and 1 <= int(retry_after) <= 2
        assert _get(server, "wrong-token-0123456789")[0] == 429
        deadline = time.monotonic() + 5
        while _get(server, TOKEN)[0] == 429:  # bounded: the window is 1.5 s
            assert time.monotonic() < deadline, "the block was never lifted"
            time.sleep(0.25)
        assert _get(server, TOKEN)[0] == 200
    messages = [r.getMessage() for r in caplog.records]
    blocked = [m for m in messages if "refusing it (429)" in m]
    assert len(blocked) == 1 and "127.0.0.1" in blocked[0]
    assert any("blocked for" in m for m in messages)
