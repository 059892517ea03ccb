"""The agent's jobs: a bounded queue and one worker that runs each job in a child process.

A job's child (``python -m edgerep.devices._job DIR``) runs in its own session, so a
timeout or a cancel kills its whole process group; the job's directory is removed
when it ends, whatever the outcome. Finished jobs keep their state and report in
memory (the last `KEPT_RESULTS`) for the client to fetch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from edgerep.errors import EdgerepError

__all__ = ["KEPT_RESULTS", "MAX_RESULT_BYTES", "Job", "JobQueue", "QueueFullError", "kill_group"]

logger = logging.getLogger(__name__)

MAX_RESULT_BYTES = 64 * 1024 * 1024
KEPT_RESULTS = 32


class QueueFullError(EdgerepError):
    """As many jobs are queued or running as the agent allows."""


class Job:
    """One upload's benchmark: its directory, request, state and result."""

    def __init__(self, job_id: str, directory: Path, request: dict[str, Any]) -> None:
        self.id = job_id
        self.directory = directory
        self.request = request
        self.state = "queued"
        self.report: dict[str, Any] | None = None
        self.error = ""
        self.process: subprocess.Popen[bytes] | None = None
        self.created = time.time()
        self.seconds: dict[str, float] = {}

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "error": self.error,
            "report": self.report,
            "seconds": self.seconds,
        }


class JobQueue:
    """Jobs run one at a time, in submission order, each under `job_timeout_s`."""

    def __init__(self, *, max_queue: int, job_timeout_s: float, python: str) -> None:
        self.max_queue = max_queue
        self.job_timeout_s = job_timeout_s
        self.python = python
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.lock = threading.Lock()
        self.pending: queue.Queue[Job | None] = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="edgerep-agent-worker", daemon=True)
        self._worker.start()

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The public state of a job (None if unknown)."""
        with self.lock:
            job = self.jobs.get(job_id)
            return None if job is None else job.public()

    def counts(self) -> dict[str, int]:
        """How many jobs are running and queued."""
        with self.lock:
            states = [j.state for j in self.jobs.values()]
        return {"running": states.count("running"), "queued": states.count("queued")}

    def cancel_id(self, job_id: str) -> dict[str, Any] | None:
        """Cancel a job by id; its public state after (None if unknown)."""
        with self.lock:
            job = self.jobs.get(job_id)
        if job is None:
            return None
        self.cancel(job)
        return self.get(job_id)

    def close(self) -> None:
        """Cancel every job and stop the worker."""
        with self.lock:
            jobs = list(self.jobs.values())
        for job in jobs:
            self.cancel(job)
        self.pending.put(None)
        self._worker.join(timeout=10)

    def submit(self, job: Job) -> None:
        with self.lock:
            waiting = sum(j.state in ("queued", "running") for j in self.jobs.values())
            if waiting >= self.max_queue:
                raise QueueFullError(f"the agent's queue is full ({waiting} jobs); retry later")
            self.jobs[job.id] = job
            while len(self.jobs) > KEPT_RESULTS + self.max_queue:
                oldest = next(iter(self.jobs))
                if self.jobs[oldest].state in ("queued", "running"):
                    break
                del self.jobs[oldest]
        self.pending.put(job)

    def cancel(self, job: Job) -> None:
        with self.lock:
            if job.state == "queued":
                job.state = "cancelled"
                job.error = "cancelled before it started"
            elif job.state == "running" and job.process is not None:
                job.state = "cancelled"
                job.error = "cancelled while running"
                kill_group(job.process)

    def _work(self) -> None:
        while True:
            job = self.pending.get()
            if job is None:
                return
            with self.lock:
                if job.state != "queued":
                    shutil.rmtree(job.directory, ignore_errors=True)
                    continue
                job.state = "running"
            try:
                self._run(job)
            except Exception as e:  # the worker must survive anything one job does
                logger.exception("agent: job %s failed", job.id)
                job.state, job.error = "failed", f"{type(e).__name__}: {e}"
            finally:
                shutil.rmtree(job.directory, ignore_errors=True)

    def _run(self, job: Job) -> None:
        started = time.perf_counter()
        log_path = job.directory / "job.log"
        with open(log_path, "wb") as log:
            cmd = [self.python, "-m", "edgerep.devices._job", str(job.directory)]
            with self.lock:
                if job.state != "running":
                    return
                job.process = subprocess.Popen(
                    cmd,
                    cwd=job.directory,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
                )
            try:
                code = job.process.wait(timeout=self.job_timeout_s)
            except subprocess.TimeoutExpired:
                kill_group(job.process)
                with self.lock:
                    job.state = "timeout"
                    job.error = (
                        f"the job ran over the agent's limit of {self.job_timeout_s:g} s "
                        "(edgerep agent serve --job-timeout)"
                    )
                return
        job.seconds["run"] = time.perf_counter() - started
        with self.lock:
            if job.state != "running":
                return
        result = job.directory / "result.json"
        if code == 0 and result.is_file() and result.stat().st_size <= MAX_RESULT_BYTES:
            job.report = json.loads(result.read_text())
            job.state = "done"
        else:
            tail = log_path.read_bytes()[-4000:].decode("utf-8", "replace")
            job.state = "failed"
            job.error = f"the benchmark process exited with {code}: {tail.strip()}"


def kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not ignorable
        logger.error("agent: job process %d did not exit", process.pid)
