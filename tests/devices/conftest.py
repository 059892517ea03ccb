"""Each test decides afresh how adb is reached (the decision is kept per process), and
the session leaves no adb server behind that it started."""

from __future__ import annotations

import shutil
import subprocess

import pytest


@pytest.fixture(scope="session", autouse=True)
def _no_adb_daemon_left():
    """`edgerep devices` runs ``adb devices -l`` when adb is installed (the README's set-up
    installs it), and adb then forks its server, which would outlive the tests. Stop it
    at the end unless one was already answering before the session."""
    from edgerep.devices._adb_host import adb_server, adb_server_address, forget_adb_server

    forget_adb_server()
    was_running = adb_server() is not None
    forget_adb_server()
    yield
    forget_adb_server()
    exe = shutil.which("adb")
    if not was_running and exe and adb_server() is not None:
        host, port = adb_server_address()
        subprocess.run([exe, "-H", host, "-P", str(port), "kill-server"], timeout=30, check=False)
    forget_adb_server()


@pytest.fixture(autouse=True)
def _fresh_adb_choice():
    from edgerep.devices._adb_host import forget_adb_server

    forget_adb_server()
    yield
    forget_adb_server()
