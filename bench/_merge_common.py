"""What the merge benches share: the BERT-base model, workers in subprocesses, the machine record."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from typing import Any


def bert_base(seed: int = 0) -> Any:
    """A BERT-base-shaped ``transformers.BertModel`` (``BertConfig()`` defaults), random weights."""
    import torch
    import transformers

    torch.manual_seed(seed)
    return transformers.BertModel(transformers.BertConfig())


def run_worker(script: str, args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``script args`` in a fresh interpreter; its last stdout line is the JSON result."""
    done = subprocess.run(
        [sys.executable, script, *args],
        capture_output=True,
        text=True,
        check=False,
        env=None if env is None else {**os.environ, **env},
    )
    if done.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine(load_before: Any, load_after: Any) -> dict[str, Any]:
    """The machine record of a results JSON, with the load averages around the run."""
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_before": list(load_before),
        "load_average_after": list(load_after),
    }


def busy_note(load_before: Any, load_after: Any) -> list[str]:
    """A note when the 1-minute load average was above 0.5 before or after the run."""
    if max(load_before[0], load_after[0]) <= 0.5:
        return []
    return [
        f"the machine was busy (1-min load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after, on {os.cpu_count()} cores): times are upper bounds"
    ]
