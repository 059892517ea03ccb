"""Loopback agent vs local harness on the same bundle: p50, accuracy and per-job overhead.

A ~12 MB ONNX bundle (three 1024x1024 float32 MatMuls with ReLUs) and a seeded
.npz dataset. Each round measures three sides with the same request and the same
latency settings (same warm-up calls and time, same runs), in an order that cycles
through all six permutations so that no side always goes first:

- ``agent``: through an agent on 127.0.0.1 (upload, checks, unpack, and the harness
  ``edgerep bench`` runs, `run_request`, in a fresh job process);
- ``local``: `run_request` in a fresh process, as ``edgerep bench`` runs on this
  machine: the like-for-like comparison (the agent's job is a fresh process too);
- ``local_inproc``: `run_request` inside this driver process, the method of the first
  recording. Kept to show what it did: this process also serves the agent (its thread)
  and has run every earlier round.

A first round of all three, not recorded, warms every side equally. Records per
round the p50 of each side and the paired ratios agent/local and
agent/local_inproc, the accuracy of each, and the agent's overhead per job: client
wall time minus the in-process local wall time (upload, checks, unpack and the job
process starting), with the agent's own split (receive, unpack + verify).

Run under the exclusive lock (it records /proc/loadavg before and after):

    /work/notes/run-timed .venv/bin/python bench/agent_bench.py
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgerep.bundle import sha256_file, write_manifest  # noqa: E402
from edgerep.devices._base import BenchRequest  # noqa: E402
from edgerep.devices._server import AgentConfig, make_server  # noqa: E402
from edgerep.devices.agent import AgentClient  # noqa: E402
from edgerep.devices.local import run_request  # noqa: E402

ROUNDS = int(os.environ.get("AGENT_BENCH_ROUNDS", "12"))
ORDERS = [
    ["local", "agent", "local_inproc"],
    ["agent", "local_inproc", "local"],
    ["local_inproc", "local", "agent"],
    ["agent", "local", "local_inproc"],
    ["local", "local_inproc", "agent"],
    ["local_inproc", "agent", "local"],
]
# the local harness in a fresh process: the request as JSON in, the report as JSON out
CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
from edgerep.devices._base import BenchRequest
from edgerep.devices.local import run_request
r = json.loads(sys.argv[2])
report = run_request(BenchRequest(r["bundle"], r["variant"], r["settings"], r["data"]))
print(json.dumps(report["rows"][0]))
"""
SIZE = 1024
TOKEN = "bench-token-0123456789abcdef"
LATENCY = {"min_iters": 200, "min_seconds": 0.5, "warmup_iters": 20, "repeats": 3}


def make_bundle(directory: Path) -> tuple[Path, Path]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [(rng.standard_normal((SIZE, SIZE)) / 32).astype(np.float32) for _ in range(3)]
    (directory / "onnx").mkdir(parents=True)
    nodes, prev = [], "x"
    for i in range(3):
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [f"m{i}"]))
        out = "output" if i == 2 else f"r{i}"
        if i < 2:
            nodes.append(helper.make_node("Relu", [f"m{i}"], [out]))
        else:
            nodes[-1].output[0] = "output"
        prev = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", SIZE])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", SIZE])],
        [numpy_helper.from_array(w, f"W{i}") for i, w in enumerate(weights)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(directory / "onnx" / "model.onnx"))
    art = {
        "format": "onnx",
        "file": "onnx/model.onnx",
        "precision": "fp32",
        "status": "verified",
        "sha256": sha256_file(directory / "onnx" / "model.onnx"),
        "tool_versions": {},
        "parity": {},
        "files": ["onnx/model.onnx"],
    }
    write_manifest(
        directory,
        {
            "inputs": [{"name": "x", "shape": ["N", SIZE], "dtype": "float32"}],
            "outputs": [{"name": "output", "shape": ["N", SIZE], "dtype": "float32"}],
            "artifacts": [art],
            "ledger": [],
        },
    )
    x = rng.standard_normal((64, SIZE)).astype(np.float32)
    h = x
    for i, w in enumerate(weights):
        h = h @ w
        if i < 2:
            h = np.maximum(h, 0)
    y = h.argmax(1)
    y[::4] = (y[::4] + 1) % SIZE  # accuracy 75%, not a trivial 100%
    data = directory.parent / "data.npz"
    np.savez(data, x=x, y=y)
    return directory, data


def loadavg() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


def main() -> None:
    load_before = loadavg()
    tmp = Path(tempfile.mkdtemp(prefix="agent-bench-"))
    bundle, data = make_bundle(tmp / "mlp")
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    settings = {"latency": LATENCY, "roofline": False, "threads": 1, "runtimes": ["onnxruntime"]}
    request = BenchRequest(str(bundle), "mlp", settings, str(data))
    server = make_server(AgentConfig(token=TOKEN.encode(), workdir=tmp / "work", port=0))
    thread = threading.Thread(target=server.serve, kwargs={"max_seconds": 600}, daemon=True)
    thread.start()
    client = AgentClient(server.url, TOKEN, timeout_s=60)
    rounds = []
    child_request = json.dumps(
        {"bundle": str(bundle), "variant": "mlp", "settings": settings, "data": str(data)}
    )
    try:
        # round -1, not recorded: every side once first, so that no side pays alone for
        # the first import of the runtime in this process, the page cache or the agent's
        # first connection
        for r in range(-1, ROUNDS):
            order = ORDERS[r % len(ORDERS)]
            entry: dict = {"order": order}
            for where in order:
                start = time.perf_counter()
                if where == "local_inproc":
                    row = run_request(request)["rows"][0]
                elif where == "local":
                    out = subprocess.run(
                        [sys.executable, "-c", CHILD, str(ROOT), child_request],
                        capture_output=True,
                        text=True,
                        check=True,
                        timeout=120,
                    )
                    row = json.loads(out.stdout.strip().splitlines()[-1])
                else:
                    job_id = client.submit(request)
                    submitted = time.perf_counter()
                    while (state := client.job(job_id))["state"] in ("queued", "running"):
                        time.sleep(0.02)
                    entry["agent_submit_s"] = submitted - start
                    entry["agent_server_seconds"] = state["seconds"]
                    row = state["report"]["rows"][0]
                entry[f"{where}_wall_s"] = time.perf_counter() - start
                entry[f"{where}_p50_ms"] = row["latency"]["stats"]["p50_ms"]
                entry[f"{where}_spread"] = row["latency"]["p50_spread"]
                entry[f"{where}_accuracy"] = row["accuracy"]
            entry["p50_ratio_agent_over_local"] = entry["agent_p50_ms"] / entry["local_p50_ms"]
            entry["p50_ratio_agent_over_local_inproc"] = (
                entry["agent_p50_ms"] / entry["local_inproc_p50_ms"]
            )
            entry["overhead_s"] = entry["agent_wall_s"] - entry["local_inproc_wall_s"]
            entry["transport_overhead_s"] = entry["agent_wall_s"] - entry["local_wall_s"]
            if r < 0:
                print("warm-up round (not recorded):", json.dumps(entry), flush=True)
                continue
            rounds.append(entry)
            print(json.dumps(entry), flush=True)
    finally:
        server.close()
    load_after = loadavg()

    def paired(key: str) -> dict:
        ratios = [e[key] for e in rounds]
        return {
            "per_round": [round(v, 4) for v in ratios],
            "median": statistics.median(ratios),
            "min_max": [min(ratios), max(ratios)],
            "rounds_within_5_percent": sum(abs(v - 1) <= 0.05 for v in ratios),
            "rounds": len(ratios),
        }

    sides = ("agent", "local", "local_inproc")
    result = {
        "script": "bench/agent_bench.py",
        "command": "/work/notes/run-timed .venv/bin/python bench/agent_bench.py",
        "bundle_bytes": size,
        "latency_config": LATENCY,
        "threads": 1,
        "rounds": rounds,
        "summary": {
            **{
                f"{w}_p50_ms_median": statistics.median(e[f"{w}_p50_ms"] for e in rounds)
                for w in sides
            },
            "agent_over_local (fresh process, paired)": paired("p50_ratio_agent_over_local"),
            "agent_over_local_inproc (paired)": paired("p50_ratio_agent_over_local_inproc"),
            "accuracy_identical": all(
                e["local_accuracy"] == e["agent_accuracy"] == e["local_inproc_accuracy"]
                for e in rounds
            ),
            "overhead_s_median (agent wall - in-process local wall: upload, checks, unpack, "
            "job process start)": statistics.median(e["overhead_s"] for e in rounds),
            "transport_overhead_s_median (agent wall - fresh-process local wall)": (
                statistics.median(e["transport_overhead_s"] for e in rounds)
            ),
            "submit_s_median (pack + upload + unpack + verify)": statistics.median(
                e["agent_submit_s"] for e in rounds
            ),
        },
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "note": "load above 0.5 means other processes shared the 2 cores"
        if max(load_before[0], load_after[0]) > 0.5
        else "",
        "cpu_count": os.cpu_count(),
    }
    out = Path(os.environ.get("AGENT_BENCH_OUT", ROOT / "bench" / "results" / "agent_bench.json"))
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
