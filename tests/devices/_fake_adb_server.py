"""A fake adb server on loopback: the subset of adb's host protocol edgerep uses.

adb's smart-socket protocol (AOSP ``packages/modules/adb/SERVICES.TXT``,
``SYNC.TXT``): every request is 4 hex digits of length plus the service name; the
server answers ``OKAY`` or ``FAIL`` + a length-prefixed message. Served here:

- ``host:version`` (answers 41, today's adb), ``host:devices`` / ``host:devices-l``;
- ``host:tport:serial:S`` (OKAY + an 8-byte transport id) and ``host:transport:S``,
  after which the same connection carries one device service:
  - ``shell:CMD``: the canned answer whose key occurs in CMD, then close; a trailing
    ``; echo X4EXIT:$?`` (how a shell reports its exit status) is honoured;
  - ``sync:``: ``STAT`` (a regular file or nothing), ``SEND path,mode`` with
    ``DATA``/``DONE`` chunks, the pushed bytes kept in `files`, ``RECV path`` answered
    with ``DATA``/``DONE`` chunks of a pushed file or one the shell wrote
    (`device_files`; ``FAIL`` when there is none); ``QUIT``.

Connections closed before any request are counted in `bare_connections` (that is
how edgerep probes for a server). Serves at most `max_connections` connections (each in its own thread, 5 s socket
timeout) for at most `max_seconds`.
"""

from __future__ import annotations

import contextlib
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Mapping


class FakeAdbServer:
    def __init__(
        self,
        devices: str,
        shell: Callable[[str, str], tuple[str, int]],
        *,
        max_connections: int = 400,
        max_seconds: float = 60.0,
    ) -> None:
        self.devices = devices
        self.shell = shell  # (serial, command) -> (output, exit status)
        self.files: dict[str, tuple[bytes, int]] = {}  # pushed (SEND)
        #: files the shell's commands wrote (e.g. a runner's result file), for RECV
        self.device_files: dict[str, tuple[bytes, int]] = getattr(shell, "device_files", {})
        self.services: list[str] = []
        #: connections closed before any request (how edgerep probes for a server)
        self.bare_connections = 0
        self._count_lock = threading.Lock()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._max_connections = max_connections
        self._deadline = time.monotonic() + max_seconds
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> FakeAdbServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def _serve(self) -> None:
        served = 0
        while not self._stop.is_set() and served < self._max_connections:
            if time.monotonic() > self._deadline:
                break
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            served += 1
            # one thread per connection: adbutils opens a second one (host:version) while
            # its transport connection waits
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError, ValueError):
            conn.settimeout(5)
            try:
                head = self._read(conn, 4)
            except ValueError:  # connected and closed without a request: a probe
                with self._count_lock:
                    self.bare_connections += 1
                return
            self._handle(conn, head)

    @staticmethod
    def _read(conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise ValueError("client went away")
            data += chunk
        return data

    def _request(self, conn: socket.socket, head: bytes | None = None) -> str:
        return self._read(conn, int(head or self._read(conn, 4), 16)).decode()

    @staticmethod
    def _block(text: str) -> bytes:
        data = text.encode()
        return f"{len(data):04x}".encode() + data

    def _fail(self, conn: socket.socket, message: str) -> None:
        conn.sendall(b"FAIL" + self._block(message))

    def _handle(self, conn: socket.socket, head: bytes) -> None:
        service = self._request(conn, head)
        self.services.append(service)
        if service == "host:version":
            conn.sendall(b"OKAY" + self._block(f"{41:04x}"))
            return
        if service in ("host:devices", "host:devices-l"):
            lines = [ln for ln in self.devices.splitlines()[1:] if ln.strip()]
            if service == "host:devices":
                lines = ["\t".join(ln.split()[:2]) for ln in lines]
            conn.sendall(b"OKAY" + self._block("".join(ln + "\n" for ln in lines)))
            return
        for prefix in ("host:tport:serial:", "host:transport:"):
            if service.startswith(prefix):
                serial = service[len(prefix) :]
                break
        else:
            self._fail(conn, f"unknown host service {service!r}")
            return
        states = {
            ln.split()[0]: ln.split()[1] for ln in self.devices.splitlines()[1:] if ln.split()
        }
        if states.get(serial) != "device":
            self._fail(conn, f"device '{serial}' not found")
            return
        conn.sendall(b"OKAY" + (struct.pack("<Q", 1) if "tport" in service else b""))
        service = self._request(conn)
        self.services.append(f"{serial}:{service}")
        if service.startswith("shell:"):
            self._shell(conn, serial, service[len("shell:") :])
        elif service == "sync:":
            conn.sendall(b"OKAY")
            self._sync(conn)
        else:
            self._fail(conn, f"unsupported service {service!r}")

    def _shell(self, conn: socket.socket, serial: str, command: str) -> None:
        marker = "; echo X4EXIT:$?"
        wants_status = command.endswith(marker)
        output, status = self.shell(serial, command.removesuffix(marker))
        conn.sendall(
            b"OKAY" + output.encode() + (f"X4EXIT:{status}".encode() if wants_status else b"")
        )

    def _sync(self, conn: socket.socket) -> None:
        while True:
            command = self._read(conn, 4)
            if command == b"QUIT":
                return
            length = struct.unpack("<I", self._read(conn, 4))[0]
            argument = self._read(conn, length).decode()
            if command == b"STAT":
                known = self.files.get(argument)
                mode = stat.S_IFREG | known[1] if known else 0
                size = len(known[0]) if known else 0
                conn.sendall(b"STAT" + struct.pack("<III", mode, size, 0))
            elif command == b"RECV":
                known = self.files.get(argument) or self.device_files.get(argument)
                if known is None:
                    message = b"No such file or directory"
                    conn.sendall(b"FAIL" + struct.pack("<I", len(message)) + message)
                    return
                data = known[0]
                for at in range(0, len(data), 64 * 1024):
                    chunk = data[at : at + 64 * 1024]
                    conn.sendall(b"DATA" + struct.pack("<I", len(chunk)) + chunk)
                conn.sendall(b"DONE" + struct.pack("<I", 0))
            elif command == b"SEND":
                path, _, mode = argument.rpartition(",")
                data = b""
                while True:
                    kind = self._read(conn, 4)
                    size = struct.unpack("<I", self._read(conn, 4))[0]
                    if kind == b"DONE":
                        break
                    if kind != b"DATA" or size > 64 * 1024:
                        conn.sendall(b"FAIL" + struct.pack("<I", 3) + b"bad")
                        return
                    data += self._read(conn, size)
                self.files[path] = (data, int(mode) & 0o7777)
                conn.sendall(b"OKAY" + struct.pack("<I", 0))
            else:
                conn.sendall(b"FAIL" + struct.pack("<I", 7) + b"unknown")
                return


def canned_shell(
    canned: Mapping[str, str], runs: list[str]
) -> Callable[[str, str], tuple[str, int]]:
    """A shell answering from `canned` by substring (the fake adb executable's table);
    runner invocations are appended to `runs` and answered in the real tools' formats
    (`tests.devices._fake_runners`), onnxruntime_perf_test appending its per-call times
    to the result file that ``cat`` reads back and ``rm -f`` removes."""
    from tests.devices._fake_runners import ort_run

    files: dict[str, tuple[bytes, int]] = {}  # device path -> (bytes, mode), what RECV reads

    def shell(serial: str, command: str) -> tuple[str, int]:
        argv = command.split()
        if "onnxruntime_perf_test" in command and " -m " in command:
            out, written = ort_run(
                len(runs), int(argv[argv.index("-r") + 1]), statistics="-s" in argv
            )
            runs.append(command)
            files[argv[-1]] = (files.get(argv[-1], (b"", 0o644))[0] + written.encode(), 0o644)
            return out, 0
        if command.startswith("rm -f "):
            files.pop(argv[2], None)
            return "", 0
        for key in (
            "getprop",
            "thermalservice",
            "dumpsys battery",
            "scaling_cur_freq",
            "cpuinfo_max_freq",
        ):
            if key in command:
                return canned[key], 0
        if command.startswith(("mkdir", "rm -rf", "chmod")):
            return "", 0
        if command.startswith("false"):
            return "boom\n", 1
        return "", 0

    shell.device_files = files  # type: ignore[attr-defined]  # the server's RECV reads them
    return shell
