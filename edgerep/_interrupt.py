"""SIGINT and SIGTERM, handled the same way by every command.

Three layers, because a backend can swallow or mangle an interrupt:

1. `handle_signals` (the CLI installs it around a command): the first SIGINT
   raises `KeyboardInterrupt`, the first SIGTERM raises `Terminated`, and both set
   a flag that stays set. Later signals only set the flag, so a second Ctrl-C
   cannot break the clean-up of the first.
2. `check`: code that catches broad exceptions (an exporter's fallback to another
   converter, a parity run turned into a status) calls it first, so an interrupt a
   backend converted into its own ``RuntimeError`` still stops the run instead of
   falling back; `edgerep.bundle.atomic_output_dir` calls it before it replaces
   anything.
3. `supervise` (the ``edgerep`` command runs under it): the command runs in a
   forked child, so a backend that aborts on an interrupt (OpenVINO's frontend
   turns a ``KeyboardInterrupt`` raised inside a Python callback into
   ``std::terminate``) cannot take the parent down with it; the parent forwards
   signals, and when the child dies abnormally it removes the child's temporary
   directories and restores a previous output the child was swapping (see
   `edgerep.bundle.remove_stale`).

Exit codes: 130 after SIGINT, 143 after SIGTERM (128 + the signal number).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType

__all__ = [
    "Terminated",
    "check",
    "exit_code",
    "handle_signals",
    "received",
    "supervise",
]

#: the signals handled; SIGTERM is what `timeout`, CI cancellation and `docker stop` send
SIGNALS = (signal.SIGINT, signal.SIGTERM)

_received: list[int] = []


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM (a BaseException, like KeyboardInterrupt)."""


def received() -> int | None:
    """The first signal received while `handle_signals` was active, else None."""
    return _received[0] if _received else None


def exit_code(signum: int | None = None) -> int:
    """128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""
    signum = signum if signum is not None else received()
    return 128 + int(signum or signal.SIGINT)


def _raise_for(signum: int) -> None:
    if signum == signal.SIGTERM:
        raise Terminated(f"terminated by signal {signal.Signals(signum).name}")
    raise KeyboardInterrupt


def check() -> None:
    """Raise the interrupt again if one was received (call before any fallback)."""
    signum = received()
    if signum is not None:
        _raise_for(signum)


def _handler(signum: int, frame: FrameType | None) -> None:
    first = not _received
    _received.append(signum)
    if first:
        _raise_for(signum)


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """Install the handlers for the duration of a command (main thread only).

    The flag is cleared on entry and on exit: it belongs to one command, and a
    process may run several (tests, an app calling `edgerep.cli.main`).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _received.clear()


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Defer SIGINT/SIGTERM for a short critical section (a directory swap).

    A signal sent meanwhile is delivered when the block ends.
    """
    if not hasattr(signal, "pthread_sigmask") or (
        threading.current_thread() is not threading.main_thread()
    ):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


#: how long the parent waits for the child after forwarding a signal before SIGKILL
GRACE_S = 20.0


def supervise(run: Callable[[], int], cleanup: Callable[[], None]) -> int:
    """Run `run` in a forked child; return its exit code, cleaning up after a crash.

    Args:
        run: the command (called in the child; its return value is the exit code).
        cleanup: called in the parent when the child did not exit normally (killed
            by a signal, or forced after `GRACE_S`): removes what the child left.

    Where ``os.fork`` is missing (Windows), `run` runs in this process. Meant for a
    process's entry point: the signal handlers it installs stay until the process
    exits, so a signal arriving after the child finished cannot change the outcome.
    """
    if not hasattr(os, "fork"):
        return run()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            code = run()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    got: list[int] = []
    running = [True]

    def forward(signum: int, frame: FrameType | None) -> None:
        if not running[0]:
            return  # the child is done: the exit code is decided, the process is exiting
        got.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    # the handlers stay installed until this process exits: a signal that arrives after
    # the child finished must not kill the parent with its default action (exit -15)
    for s in SIGNALS:
        signal.signal(s, forward)
    status = _wait(pid, got)
    running[0] = False
    if os.WIFEXITED(status):
        # the child cleaned up itself (or finished its work before the signal took effect)
        return os.WEXITSTATUS(status)
    cleanup()
    dead_by = os.WTERMSIG(status) if os.WIFSIGNALED(status) else signal.SIGKILL
    if got:
        print(
            f"edgerep: interrupted ({signal.Signals(got[0]).name}); temporary files removed, "
            "earlier output left as it was",
            file=sys.stderr,
        )
        return exit_code(got[0])
    print(
        f"edgerep: the command died from signal {signal.Signals(dead_by).name} (a crash in a "
        "backend); temporary files removed, earlier output left as it was",
        file=sys.stderr,
    )
    return 128 + int(dead_by)


def _wait(pid: int, got: list[int]) -> int:
    deadline: float | None = None
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if got and deadline is None:
            deadline = time.monotonic() + GRACE_S
        if deadline is not None and time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            return status
        time.sleep(0.05)
