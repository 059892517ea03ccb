"""SIGINT/SIGTERM/crashes never lose an earlier output nor leave temporary directories.

The subprocess cases freeze the worker once the run's temporary bundle holds a given
file and send the signal then (so it lands inside export/verification, not during
start-up, however fast the machine); the 30-interrupts-at-
random-moments target is in bench/interrupt_bench.py (too slow for the suite).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgerep import _interrupt
from edgerep.bundle import atomic_output_dir, private_dir, remove_stale
from edgerep.cli import main
from edgerep.exporters.onnx import OnnxExporter
from tests._models import CONV_BN


def _digest(directory: Path) -> dict[str, str]:
    return {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


@pytest.fixture(scope="module")
def previous(tmp_path_factory):
    """A model file and a finished bundle to protect (built once, copied per test)."""
    root = tmp_path_factory.mktemp("interrupt")
    (root / "model.py").write_text(CONV_BN)
    code = main(
        ["convert", f"{root / 'model.py'}:build", "--input", "x:1x3x8x8", "-o", str(root / "b")]
    )
    assert code == 0
    return root


def _copy_previous(previous: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(previous / "b", tmp_path / "b")
    shutil.copy(previous / "model.py", tmp_path / "model.py")
    return tmp_path / "b"


# --- stale leftovers ---------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporary_directories_are_removed_and_swaps_restored(tmp_path):
    from edgerep.bundle import _host_tag

    target = tmp_path / "out"
    live = private_dir(target, "tmp")  # ours: alive, kept
    dead_tag = f"p{_dead_pid()}s1h{_host_tag()}"
    dead_tmp = tmp_path / f".out.tmp-{dead_tag}-abcd1234"
    dead_tmp.mkdir()
    (dead_tmp / "half.onnx").write_bytes(b"half")
    dead_float = tmp_path / f".out.float-{dead_tag}-abcd1234"
    dead_float.mkdir()
    # a killed swap: the previous output was moved aside and the new one never arrived
    swapped = tmp_path / f".out.old-{dead_tag}-abcd1234"
    swapped.mkdir()
    (swapped / "manifest.json").write_text("{}")
    unknown = tmp_path / ".out.tmp-zzzz"
    unknown.mkdir()
    done = remove_stale(target)
    assert not dead_tmp.exists() and not dead_float.exists()
    assert (target / "manifest.json").read_text() == "{}", "previous output restored"
    assert live.exists(), "a live run's directory is never touched"
    assert unknown.exists() and any("owner is unknown" in d for d in done)
    assert any("restored the previous output" in d for d in done)


def test_reused_pid_is_not_taken_for_the_owner(tmp_path):
    # our own pid with another start time: a different (dead) process that had this pid
    from edgerep.bundle import _host_tag

    fake = tmp_path / f".out.tmp-p{os.getpid()}s1h{_host_tag()}-abcd1234"
    fake.mkdir()
    remove_stale(tmp_path / "out")
    assert not fake.exists()


# --- interrupts a backend swallows -------------------------------------------------------


def test_swallowed_interrupt_never_falls_back_nor_replaces(previous, tmp_path, monkeypatch):
    """Issue 14 case 3: OpenVINO turned Ctrl-C into a RuntimeError, edgerep fell back to
    another converter, exited 0 and replaced the directory the user wanted to keep."""
    bundle = _copy_previous(previous, tmp_path)
    before = _digest(bundle)
    fallbacks = []

    def swallowing_backend(*args, **kwargs):
        _interrupt._received.append(signal.SIGINT)  # the handler ran inside the backend ...
        raise RuntimeError("KeyboardInterrupt caught by a C++ frontend")  # ... which hid it

    monkeypatch.setattr(OnnxExporter, "_export_dynamo", swallowing_backend)
    monkeypatch.setattr(
        OnnxExporter, "_export_torchscript", lambda *a, **k: fallbacks.append(1) or 1 / 0
    )
    code = main(
        [
            "convert",
            f"{tmp_path / 'model.py'}:build",
            "--input",
            "x:1x3x8x8",
            "-o",
            str(bundle),
            "--force",
        ]
    )
    assert code == 130
    assert _interrupt.received() is None, "the flag belongs to that command only"
    assert not fallbacks, "no fallback after an interrupt"
    assert _digest(bundle) == before
    assert _leftovers(tmp_path, "b") == []


def test_interrupt_flag_blocks_the_final_swap(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep").write_text("old")
    with (
        _interrupt.handle_signals(),
        pytest.raises(KeyboardInterrupt),
        atomic_output_dir(target, overwrite=True) as tmp,
    ):
        (tmp / "keep").write_text("new")
        _interrupt._received.append(signal.SIGINT)  # arrived, swallowed by a backend
    assert (target / "keep").read_text() == "old"
    assert _leftovers(tmp_path, "out") == []


# --- real signals, in a subprocess ---------------------------------------------------------


def _start(model: Path, bundle: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "edgerep", "convert", f"{model}:build", "--input"]
    argv += ["x:1x3x8x8", "--to", "onnx,openvino", "--force", "-o", str(bundle)]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _child_of(pid: int) -> int:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            return int(stat.parent.name)
    raise AssertionError(f"process {pid} has no child: the command did not run supervised")


def _stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "tT"
    except OSError:
        return False


def _frozen_mid_run(model: Path, bundle: Path, marker: str) -> tuple[subprocess.Popen[bytes], int]:
    """Start a convert and freeze (SIGSTOP) its worker once `marker` is in the temp bundle.

    The temporary bundle lives for well under a second on an idle machine, so a fixed
    sleep before the signal races the end of the run (CI saw exit 0 instead of 143).
    Freezing the worker pins the moment: the signal sent next is handled when it is
    resumed, inside the export. A run that got past the swap before the freeze took
    hold is rerun (bounded), never taken for a pass.
    """
    parent, name = bundle.parent, bundle.name
    seen = ""
    for _ in range(5):
        proc = _start(model, bundle)
        deadline = time.monotonic() + 240
        tmp: list[str] = []
        while time.monotonic() < deadline and proc.poll() is None:
            tmp = [p for p in _leftovers(parent, name) if p.startswith(f".{name}.tmp-")]
            if tmp and (parent / tmp[0] / marker).exists():
                break
            time.sleep(0.01)
        if time.monotonic() >= deadline:
            raise AssertionError(f"the run never wrote {marker!r} in its temporary bundle")
        try:
            if not tmp:
                raise ProcessLookupError
            child = _child_of(proc.pid)
            os.kill(child, signal.SIGSTOP)
        except (AssertionError, ProcessLookupError):
            _, err = proc.communicate(timeout=120)  # ended before the freeze: run again
            seen = f"rc {proc.returncode}: {err.decode()[-1500:]}"
            continue
        while not _stopped(child) and proc.poll() is None:
            time.sleep(0.005)
        if (parent / tmp[0]).exists():
            return proc, child
        os.kill(child, signal.SIGCONT)  # frozen after its swap: too late, run again
        proc.communicate(timeout=120)
    raise AssertionError(f"five runs in a row ended before they could be frozen ({seen})")


def _wait_pending(pid: int, signum: int) -> None:
    """Until `signum` is pending in the stopped process `pid` (the parent forwarded it),
    read from /proc/PID/status, so the worker is never resumed before it arrives."""
    bit = 1 << (signum - 1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        fields = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        )
        if (int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)) & bit:
            return
        time.sleep(0.01)
    raise AssertionError(f"the parent never forwarded signal {signum} to its worker")


def _finish(proc: subprocess.Popen[bytes], child: int) -> bytes:
    """Resume the worker and wait for the run; a run still going after 120 s is killed
    (worker and parent), so a failing case never leaves a stopped process behind."""
    try:
        os.kill(child, signal.SIGCONT)
        return proc.communicate(timeout=120)[1]
    except BaseException:
        for pid in (child, proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.communicate()
        raise


@pytest.mark.parametrize(
    ("signum", "code", "marker"),
    [(signal.SIGINT, 130, ""), (signal.SIGTERM, 143, "onnx/model.onnx")],
    ids=["sigint", "sigterm"],
)
def test_signal_during_export(previous, tmp_path, signum, code, marker):
    """SIGINT lands as soon as the temporary bundle exists, SIGTERM once the ONNX file is
    written (during the OpenVINO conversion or the parity checks)."""
    bundle = _copy_previous(previous, tmp_path)
    before = _digest(bundle)
    proc, child = _frozen_mid_run(tmp_path / "model.py", bundle, marker)
    proc.send_signal(signum)  # forwarded by the parent; pending in the frozen worker
    try:
        _wait_pending(child, signum)
    finally:
        err = _finish(proc, child)  # resumed even when the signal never arrived
    assert proc.returncode == code, err.decode()[-2000:]
    assert _digest(bundle) == before
    assert _leftovers(tmp_path, "b") == []


def test_backend_abort_is_cleaned_up_by_the_parent(previous, tmp_path):
    """A backend that aborts (SIGABRT from std::terminate) kills only the child."""
    bundle = _copy_previous(previous, tmp_path)
    before = _digest(bundle)
    proc, child = _frozen_mid_run(tmp_path / "model.py", bundle, "")
    os.kill(child, signal.SIGABRT)  # pending until it is resumed
    err = _finish(proc, child)
    assert proc.returncode == 128 + signal.SIGABRT
    assert b"SIGABRT" in err
    assert _digest(bundle) == before
    assert _leftovers(tmp_path, "b") == []
