"""Third-party console noise, kept out of a user's way and available under ``--verbose``.

Two kinds, found by running the demo and ``edgerep bench`` as a new user:

- Python loggers of other libraries that warn on every run about things an edgerep
  user cannot act on (`NOISY_LOGGERS`): `quiet_third_party` raises their level to
  ERROR for the duration of a command unless ``--verbose`` was given. Only those
  loggers are touched; edgerep's own warnings and every other library's are not.
- Messages of a library whose *other* warnings must stay visible (`NOISY_RECORDS`):
  coremltools logs on its ``coremltools`` logger at import that scikit-learn or torch
  is newer than it was tested with and, on any OS but macOS, eight ``Failed to load
  _ML...Proxy`` lines (its native predict library is macOS-only); the same logger
  carries conversion warnings a user does need. `quiet_third_party` adds a
  `logging.Filter` to such a logger that drops only the records matching the known
  pattern, unless ``--verbose``.
- Lines a native library prints straight to file descriptor 2 (ExecuTorch's
  ``cpuinfo_utils.cpp`` probes when its thread pool starts): `native_stderr_to_log`
  captures fd 2 around the call that prints them, sends the lines matching a known
  pattern to an edgerep logger at DEBUG (``-vv`` shows them) and writes every other
  captured line back to stderr unchanged, so a real native error is never hidden.

Nothing happens at import (STYLE 7): both are context managers that restore what
they changed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator

__all__ = [
    "NATIVE_NOISE",
    "NOISY_LOGGERS",
    "NOISY_RECORDS",
    "native_stderr_to_log",
    "quiet_third_party",
]

#: logger name -> what it says that is noise here
NOISY_LOGGERS: dict[str, str] = {
    "torchao": "'Failed to load ..._C_*.so' (its CUDA kernels, absent on a CPU machine) and "
    "'Detected no triton'",
    "torch.utils._pytree": "torchao registers an Enum as a pytree constant (a deprecation)",
    "torch.onnx._internal.exporter._registration": "torchvision's ops are not registered",
}

#: logger name -> the messages of it that are noise here (its other records pass)
NOISY_RECORDS: dict[str, re.Pattern[str]] = {
    # coremltools/_deps/__init__.py (version checks) and models/{model,compute_device,
    # compute_plan}.py (the macOS-only libcoremlpython proxies), all at import
    "coremltools": re.compile(
        r"^(Failed to load _ML\w*Proxy: "
        r"|\S+ version \S+ (is not supported|has not been tested with coremltools))"
    ),
}


class _DropMatching(logging.Filter):
    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


#: native stderr lines that are noise (ExecuTorch's CPU probing on x86 machines)
NATIVE_NOISE = re.compile(r"^\[cpuinfo_utils\.cpp:\d+\] ")


@contextlib.contextmanager
def quiet_third_party(verbose: int = 0) -> Iterator[None]:
    """Raise `NOISY_LOGGERS` to ERROR and filter `NOISY_RECORDS` out while inside, unless
    `verbose` > 0; levels and filters restored."""
    if verbose > 0:
        yield
        return
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    filtered = [(logging.getLogger(n), _DropMatching(p)) for n, p in NOISY_RECORDS.items()]
    for lg, flt in filtered:
        lg.addFilter(flt)
    try:
        yield
    finally:
        for lg, level in zip(loggers, old, strict=True):
            lg.setLevel(level)
        for lg, flt in filtered:
            lg.removeFilter(flt)


@contextlib.contextmanager
def native_stderr_to_log(log: logging.Logger, *, what: str) -> Iterator[None]:
    """Capture fd 2 while inside; `NATIVE_NOISE` lines go to `log` at DEBUG, the rest back
    to stderr.

    fd 2 is process-wide: a line another thread writes meanwhile is captured too and is
    written back (late, but not lost). Falls back to doing nothing when fd 2 cannot be
    duplicated (e.g. a closed stderr).
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    with tempfile.TemporaryFile() as sink:
        try:
            os.dup2(sink.fileno(), 2)
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()  # Python's own buffered writes belong to the capture
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode("utf-8", "replace")
            kept = []
            for line in text.splitlines():
                if NATIVE_NOISE.match(line):
                    log.debug("%s (native stderr): %s", what, line)
                else:
                    kept.append(line)
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")
                sys.stderr.flush()
