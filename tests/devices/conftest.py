"""Each test decides afresh how adb is reached (the decision is kept per process)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _fresh_adb_choice():
    from edgerep.devices._adb_host import forget_adb_server

    forget_adb_server()
    yield
    forget_adb_server()
