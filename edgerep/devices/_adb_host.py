"""How edgerep reaches adb: the adb server through adbutils, else the adb executable.

See `edgerep.devices.adb` for the choice; `_adb` is the one entry point, taking
adb's own argument shapes (``devices -l``, ``shell ...``, ``push LOCAL REMOTE``,
``pull REMOTE LOCAL``) and returning what adb prints, whichever way is used;
`_pull_bytes` reads a device file back.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Sequence

from edgerep.errors import EdgerepError

__all__ = [
    "ADB_ENV",
    "AdbError",
    "adb_executable",
    "adb_server",
    "adb_server_address",
    "adb_unavailable_reason",
    "forget_adb_server",
]

ADB_ENV = "EDGEREP_ADB"


class AdbError(EdgerepError):
    """adb is missing, the device is not there, or a command on it failed."""


def adb_executable() -> str | None:
    """``$EDGEREP_ADB``, else ``adb`` on PATH, else None."""
    return os.environ.get(ADB_ENV) or shutil.which("adb")


def adb_server_address() -> tuple[str, int]:
    """Where the adb server listens: ``$ANDROID_ADB_SERVER_HOST:$ANDROID_ADB_SERVER_PORT``
    (adb's own variables; default 127.0.0.1:5037)."""
    host = os.environ.get("ANDROID_ADB_SERVER_HOST") or "127.0.0.1"
    text = os.environ.get("ANDROID_ADB_SERVER_PORT") or "5037"
    port = int(text) if text.strip().isdigit() else 0
    if not 0 < port < 65536:
        raise AdbError(
            f"$ANDROID_ADB_SERVER_PORT={text!r} is not a port (1 to 65535); unset it for 5037"
        )
    return host, port


#: the server decision and what it was decided for (see `adb_server`)
_choice_lock = threading.Lock()
_choice: tuple[tuple[str, str, int], tuple[str, int] | None] | None = None


def _choice_key() -> tuple[str, str, int]:
    return (os.environ.get(ADB_ENV) or "", *adb_server_address())


def adb_server() -> tuple[str, int] | None:
    """The adb server to use through adbutils: None when ``$EDGEREP_ADB`` asks for the
    command line, adbutils is not installed, or no server answers within 0.5 s.

    Decided once and kept, so that an operation over several devices (and each of its
    many adb calls) probes the server once. The decision is dropped, and the next call
    probes again, when `forget_adb_server` is called: at the start of every discovery
    (`edgerep.devices.adb.AdbTransport.discover`), after a call through the server
    fails (it may have gone), and when no way to adb was found; and when
    ``$EDGEREP_ADB`` or ``$ANDROID_ADB_SERVER_HOST``/``_PORT`` change.
    """
    global _choice
    key = _choice_key()
    with _choice_lock:  # devices run in threads: one probe, the others wait for it
        if _choice is None or _choice[0] != key:
            _choice = (key, _probe_server(key))
        return _choice[1]


def forget_adb_server() -> None:
    """Drop the decision `adb_server` keeps: the next adb call probes the server again."""
    global _choice
    with _choice_lock:
        _choice = None


def _probe_server(key: tuple[str, str, int]) -> tuple[str, int] | None:
    explicit_exe, host, port = key
    if explicit_exe or importlib.util.find_spec("adbutils") is None:
        return None
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return host, port
    except OSError:
        return None


def adb_unavailable_reason() -> str | None:
    """Why neither an adb server (adbutils) nor the adb command line can be used, or None."""
    if adb_server() is not None or adb_executable() is not None:
        return None
    host, port = adb_server_address()
    return (
        f"adb is not on PATH and no adb server answers at {host}:{port}; install Android "
        f"platform-tools (or apt install adb), or set ${ADB_ENV}"
    )


def _adb(args: Sequence[str], *, serial: str | None = None, timeout_s: float = 10.0) -> str:
    """Run ``adb [-s SERIAL] ARGS`` (``devices -l``, ``shell ...``, ``push L R``) through
    the adb server when one answers (adbutils), else the adb executable; its stdout."""
    server = adb_server()
    if server is not None:
        return _via_server(server, args, serial=serial, timeout_s=timeout_s)
    exe = adb_executable()
    if exe is None:
        reason = adb_unavailable_reason() or "adb is not available"
        forget_adb_server()  # nothing to keep: look again next time
        raise AdbError(reason)
    cmd = [exe, *(["-s", serial] if serial else []), *args]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise AdbError(f"`{' '.join(cmd[1:])}` took over {timeout_s:g} s") from e
    except OSError as e:
        raise AdbError(f"cannot run {exe!r}: {e}") from e
    if out.returncode != 0:
        raise AdbError(
            f"`adb {' '.join(cmd[1:])}` failed ({out.returncode}): "
            f"{(out.stderr or out.stdout).strip()[-500:]}"
        )
    return out.stdout


def _pull_bytes(remote: str, *, serial: str, timeout_s: float = 10.0) -> bytes:
    """The bytes of the device file `remote` (``adb pull``: the sync protocol's RECV)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="edgerep-pull-") as tmp:
        local = os.path.join(tmp, "file")
        _adb(["pull", remote, local], serial=serial, timeout_s=timeout_s)
        with open(local, "rb") as f:
            return f.read()


def _via_server(
    server: tuple[str, int], args: Sequence[str], *, serial: str | None, timeout_s: float
) -> str:
    """`_adb` through adbutils: the same operations, answers shaped like adb's output."""
    import adbutils

    client = adbutils.AdbClient(host=server[0], port=server[1], socket_timeout=timeout_s)
    shown = f"adb {'-s ' + serial + ' ' if serial else ''}{' '.join(args)}"
    try:
        if list(args[:2]) == ["devices", "-l"]:
            lines = ["List of devices attached"]
            for info in client.list(extended=True):
                tags = " ".join(f"{k}:{v}" for k, v in (info.tags or {}).items())
                lines.append(f"{info.serial} {info.state} {tags}".rstrip())
            return "\n".join(lines) + "\n"
        if serial is None:
            raise AdbError(f"`{shown}` needs a device serial")
        device = client.device(serial=serial)
        if args[0] == "shell":
            # one command line, as `adb shell A B C` sends it (adb joins with spaces)
            result = device.shell2(" ".join(args[1:]), timeout=timeout_s)
            if result.returncode != 0:
                raise AdbError(
                    f"`{shown}` failed ({result.returncode}): {result.output.strip()[-500:]}"
                )
            return str(result.output)
        if args[0] == "push" and len(args) == 3:
            device.sync.push(str(args[1]), str(args[2]), mode=0o644)
            return ""
        if args[0] == "pull" and len(args) == 3:
            data = device.sync.read_bytes(str(args[1]))  # RECV; a missing file fails
            with open(str(args[2]), "wb") as f:
                f.write(data)
            return ""
    except adbutils.AdbTimeout as e:
        forget_adb_server()
        raise AdbError(
            f"`{shown}` took over {timeout_s:g} s (adb server {server[0]}:{server[1]})"
        ) from e
    except (adbutils.AdbError, OSError) as e:
        forget_adb_server()
        raise AdbError(
            f"`{shown}` failed through the adb server {server[0]}:{server[1]}: {e}"
        ) from e
    raise AdbError(f"`{shown}`: not an operation edgerep uses")
