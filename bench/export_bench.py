"""Export benchmark: export time and artifact size per format, for two folded zoo nets.

Run from the repository root (about 2-4 minutes on 2 idle cores)::

    .venv/bin/python bench/export_bench.py

It writes ``bench/results/export_bench.json`` (``--out`` to change; written to a
temporary name and renamed) and prints a table. For each net —
`edgerep.zoo.demo_net` (1x32x32 input, ~90k parameters) and
`edgerep.zoo.repvgg_a0` (3x224x224, 8.3M parameters once folded) — with random
weights and BN statistics (``randomize_(seed=0)``), input spec
``x:N[1..1..8]xCxHxW`` (dynamic batch):

1. ``fold_s``: one `edgerep.fold.fold` call (the folded model is what every
   format exports);
2. per format (onnx, openvino, coreml, tensorrt, executorch; default options,
   fp32): ``check_s`` (the op-coverage check, in memory) and ``export_s`` (the
   exporter's ``export`` into an empty folder), each one wall-clock call, the
   first export of a format in the process included (it pays the SDK's import
   and warm-up: the ``first_in_process`` flag says so); ``size_bytes`` (every file
   of the artifact), ``files``; ``built`` (False for a TensorRT plan without
   TensorRT here);
3. ``parity``: where a runtime runs the format here, the max relative error
   (max abs error / max |reference|) of the artifact against the *unfolded*
   PyTorch model on one random batch-1 and one batch-8 input, with the runtime
   options of `edgerep.parity.parity_runs` (OpenVINO: f32 precision hint).

Timings are single calls on a shared machine: compare them within a run, not
across machines; ``loadavg`` before and after is recorded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import edgerep
from edgerep.devices import describe_local
from edgerep.exporters import get_exporter
from edgerep.fold import fold
from edgerep.parity import parity_runs
from edgerep.runtimes import get_runtime
from edgerep.spec import example_inputs, parse_input_spec
from edgerep.zoo import demo_net, randomize_, repvgg_a0

FORMATS = ("onnx", "openvino", "coreml", "tensorrt", "executorch")
NETS = {
    "demo_net": (lambda: demo_net(), "x:N[1..1..8]x1x32x32"),
    "repvgg_a0": (lambda: repvgg_a0(), "x:N[1..1..8]x3x224x224"),
}


def _size(root: Path, files: tuple[str, ...]) -> int:
    return sum((root / f).stat().st_size for f in files if (root / f).is_file())


def _parity(
    fmt: str, path: Path, model: torch.nn.Module, specs: list[Any]
) -> dict[str, Any] | None:
    runtime = get_runtime(get_exporter(fmt).runtime)
    if runtime.unavailable_reason():
        return {"ran": False, "reason": runtime.unavailable_reason()}
    options = dict(parity_runs(fmt)[0].options) or None
    worst = 0.0
    with runtime.load(path, options=options) as session:
        for batch in (1, 8):
            (x,) = example_inputs(specs, seed=batch, dims={"N": batch})
            with torch.no_grad():
                ref = model(x).numpy()
            (got,) = session.run({session.input_names[0]: x.numpy()})
            worst = max(worst, float(np.abs(got - ref).max() / np.abs(ref).max()))
        desc = session.describe()
    return {"ran": True, "max_rel_error": worst, "runtime": desc}


def bench_net(name: str, seen: set[str]) -> dict[str, Any]:
    build, spec_text = NETS[name]
    specs = [parse_input_spec(spec_text)]
    model = randomize_(build(), seed=0).eval()
    ex = example_inputs(specs, seed=0)
    t0 = time.perf_counter()
    folded, report = fold(model, ex)
    fold_s = time.perf_counter() - t0
    out: dict[str, Any] = {
        "input": spec_text,
        "params": sum(p.numel() for p in model.parameters()),
        "params_folded": sum(p.numel() for p in folded.parameters()),
        "fold_s": fold_s,
        "fold_max_rel_error": report.max_rel_error,
        "formats": {},
    }
    for fmt in FORMATS:
        exporter = get_exporter(fmt)
        row: dict[str, Any] = {"first_in_process": fmt not in seen}
        seen.add(fmt)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            problems = exporter.check(folded, ex, specs)
            row["check_s"] = time.perf_counter() - t0
            row["problems"] = [str(p) for p in problems]
            t0 = time.perf_counter()
            art = exporter.export(folded, ex, specs, Path(tmp))
            row["export_s"] = time.perf_counter() - t0
            row["size_bytes"] = _size(Path(tmp), art.files)
            row["files"] = list(art.files)
            row["built"] = art.built
            row["precision"] = art.precision
            row["tool_versions"] = dict(art.tool_versions)
            row["parity"] = _parity(fmt, art.path, model, specs) if art.built else None
        out["formats"][fmt] = row
        print(
            f"  {name:<10} {fmt:<10} check {row['check_s']:6.2f} s  export {row['export_s']:6.2f} s  "
            f"{row['size_bytes'] / 1e6:8.2f} MB"
            + (
                f"  max rel err {row['parity']['max_rel_error']:.1e}"
                if row["parity"] and row["parity"].get("ran")
                else ""
            ),
            flush=True,
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", default="bench/results/export_bench.json", help="where to write the JSON"
    )
    parser.add_argument("--nets", default=",".join(NETS), help="comma-separated subset of nets")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    torch.manual_seed(0)
    load_before = os.getloadavg()
    started = time.perf_counter()
    seen: set[str] = set()
    nets = {}
    for name in args.nets.split(","):
        nets[name] = bench_net(name.strip(), seen)
    result = {
        "bench": "export",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "edgerep": edgerep.__version__,
        "device": describe_local(),
        "loadavg_before": list(load_before),
        "loadavg_after": list(os.getloadavg()),
        "total_s": time.perf_counter() - started,
        "method": (
            "one wall-clock call per check/export, folded model, default exporter options "
            "(fp32); sizes are every file of the artifact; parity vs the unfolded model on "
            "batch 1 and 8 where the runtime runs here"
        ),
        "nets": nets,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out} ({result['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
