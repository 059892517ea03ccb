"""Interrupt a `convert --to all --force` run at random moments; the earlier bundle must survive.

Issue 14's target: 30 SIGINT/SIGTERM sent at random moments of a ``--to all --force``
run -> 30/30 with the previous bundle byte-identical and no temporary directory left,
exit 130/143 (or 0 when the signal came after the new bundle was complete, which this
script then reports separately: the bundle must then be the new, valid one).

The moments are drawn uniformly over the measured duration of an uninterrupted run
(start-up included: an interrupt during imports must be as harmless as one during
export). Results: bench/results/interrupt_bench.json.

    .venv/bin/python bench/interrupt_bench.py --runs 30
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from _args import positive_int

MODEL = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu(self.bn(self.conv(x))))

def build():
    torch.manual_seed(0)
    return Net()
"""


def digest(directory: Path) -> dict[str, str]:
    return {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def argv(model: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "edgerep",
        "convert",
        f"{model}:build",
        "--input",
        "x:1x3x16x16",
        "--to",
        "all",
        "--force",
        "-o",
        str(out),
    ]


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=positive_int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "interrupt_bench.json")
    )
    args = ap.parse_args()
    rng = random.Random(args.seed)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / "model.py").write_text(textwrap.dedent(MODEL))
        out = root / "bundle"
        t0 = time.monotonic()
        subprocess.run(argv(root / "model.py", out), env=env, check=True, capture_output=True)
        duration = time.monotonic() - t0
        print(f"uninterrupted run: {duration:.1f} s", flush=True)
        rows = []
        for i in range(args.runs):
            before = digest(out)
            signum = rng.choice([signal.SIGINT, signal.SIGTERM])
            delay = rng.uniform(0.2, duration)
            proc = subprocess.Popen(
                argv(root / "model.py", out),
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            time.sleep(delay)
            proc.send_signal(signum)
            _, err = proc.communicate(timeout=600)
            after = digest(out)
            left = leftovers(out)
            code = proc.returncode
            expected = 128 + int(signum)
            if code == expected:
                ok = after == before and not left
                outcome = "interrupted, previous bundle intact" if ok else "LOST OR LEFT FILES"
            elif code == 0:
                # finished before the signal took effect: the new bundle must be complete
                from edgerep.bundle import read_manifest

                read_manifest(out)
                ok = not left
                outcome = "finished before the signal took effect"
            else:
                ok = False
                outcome = f"unexpected exit {code}: {err.decode()[-300:]}"
            rows.append(
                {
                    "run": i,
                    "signal": signal.Signals(signum).name,
                    "delay_s": round(delay, 2),
                    "exit": code,
                    "previous_intact": after == before,
                    "leftovers": left,
                    "ok": ok,
                    "outcome": outcome,
                }
            )
            print(
                f"{i:2d} {signal.Signals(signum).name:7s} at {delay:5.1f} s -> exit {code:3d} "
                f"{outcome}",
                flush=True,
            )
    summary = {
        "runs": len(rows),
        "ok": sum(r["ok"] for r in rows),
        "interrupted_intact": sum(r["ok"] and r["exit"] != 0 for r in rows),
        "finished_first": sum(r["exit"] == 0 for r in rows),
        "uninterrupted_run_s": round(duration, 1),
        "loadavg_end": Path("/proc/loadavg").read_text().split()[:3],
    }
    result = {"command": "bench/interrupt_bench.py", "summary": summary, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary))
    return 0 if summary["ok"] == summary["runs"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
