"""Merge benchmark: `edgerep.merge` on a ~110M-parameter transformer, next to PEFT's merge.

Run from the repository root (about 1-2 minutes on 2 idle cores)::

    .venv/bin/python bench/merge_bench.py

It writes ``bench/results/merge_bench.json`` (``--out`` to change). The model is
BERT-base-shaped (``transformers.BertConfig()`` defaults: 12 layers, hidden 768,
intermediate 3072, vocabulary 30522), built offline from its config with random
weights, float32, with LoRA r=16 (alpha 32) on query, key, value and every
``dense`` Linear (attention output, intermediate, output, pooler: 73 layers) and
random LoRA factors (B != 0).

Each measurement runs in a fresh subprocess (``--worker``) so that peak memory is
its own: the model is built, then the merge is timed once. Memory is the
process's resident set size (``/proc/self/statm``) sampled every 2 ms by a thread
during the merge; ``peak_extra_rss_bytes`` is the highest sample minus the RSS
just before the merge, i.e. what the merge added on top of the model it was
given (the returned model itself is a new model, so at least 1x the model size).

Workers: ``peft`` (PEFT's ``merge_and_unload``, float32, in place), ``edgerep`` (the
default: the fast path, PEFT's own merge run on a float64 copy of each layer, then
8 random rows through the verifier), ``edgerep_malloc`` (the same, with glibc's
``MALLOC_MMAP_THRESHOLD_=1048576`` so that freed float64 scratch goes back to the
system instead of staying in the heap between the new layers: the difference is
the allocator's, not live memory) and ``edgerep_probe`` (``fast=False``: every layer
read off by the identity probe, the previous default).

Fields per worker: ``seconds`` (wall time of the merge call), ``peak_extra_rss_bytes``,
``peak_extra_over_model_size`` (that divided by the fp32 size of the base model's
parameters), ``rel_error_float32`` (merged vs unmerged output on a 2x32 token batch,
float32, relative to max |output|), ``layers_merged``, and for edgerep
``max_rel_error_float64`` (the largest per-layer verifier error, float64).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from _rss import PeakRss as _PeakRss

WORKERS = ["peft", "edgerep", "edgerep_malloc", "edgerep_probe"]


def _build(rank: int) -> tuple[Any, int]:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = transformers.BertModel(transformers.BertConfig())
    n_base = sum(p.numel() for p in base.parameters())
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=["query", "key", "value", "dense"]
    )
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.eval(), n_base


def _worker(which: str, rank: int) -> dict[str, Any]:
    import torch

    warnings.filterwarnings("ignore")
    model, n_base = _build(rank)
    ids = torch.randint(0, 30522, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    result: dict[str, Any] = {
        "worker": which,
        "base_params": n_base,
        "lora_params": n_lora,
        "model_size_bytes_fp32": 4 * n_base,
        "torch_threads": torch.get_num_threads(),
    }
    with _PeakRss() as mem:
        start = time.perf_counter()
        if which.startswith("edgerep"):
            import edgerep

            merged, report = edgerep.merge(model, fast=which != "edgerep_probe")
        else:
            merged = model.merge_and_unload()  # in place, PEFT's per-type formulas
        seconds = time.perf_counter() - start
    with torch.no_grad():
        out = merged(input_ids=ids).last_hidden_state
    result.update(
        seconds=seconds,
        rss_before_bytes=mem.start,
        peak_extra_rss_bytes=mem.peak - mem.start,
        peak_extra_over_model_size=(mem.peak - mem.start) / (4 * n_base),
        rel_error_float32=((out - ref).abs().max() / ref.abs().max()).item(),
    )
    if which.startswith("edgerep"):
        result.update(
            routes=report.routes,
            layers_merged=len(report.merged),
            layers_kept=len(report.kept),
            max_rel_error_float64=report.max_error,
        )
    else:
        result["layers_merged"] = sum(
            1 for n, _ in model.named_modules() if n.endswith(("query", "key", "value", "dense"))
        )
    return result


def _run_worker(which: str, rank: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", which, "--rank", str(rank)]
    env = dict(os.environ)
    if which == "edgerep_malloc":
        env["MALLOC_MMAP_THRESHOLD_"] = "1048576"
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{which} worker failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/merge_bench.json")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.rank)))
        return
    load_before = os.getloadavg()
    results = {w: _run_worker(w, args.rank) for w in WORKERS}
    load_after = os.getloadavg()
    ours, theirs = results["edgerep"], results["peft"]
    notes = [
        "edgerep (fast path) runs PEFT's own merge on a float64 copy of each layer and keeps the "
        "result only if 8 random float64 rows through the wrapped layer agree to 1e-9; "
        "edgerep_probe reads every layer off its function (identity basis) instead; PEFT adds "
        "its delta in float32 in place. edgerep never mutates its input, so it builds a new "
        "model (the wrappers' weights are not copied first: each new layer is built from the "
        "input's).",
        "peak_extra_rss counts what the call added on top of the model it was given; for "
        "edgerep that includes the returned model (1x the model size) and float64 scratch for "
        "one layer at a time; edgerep_malloc shows how much of the rest is glibc keeping freed "
        "scratch in its heap.",
    ]
    if max(load_before[0], load_after[0]) > 0.5:
        notes.append(
            f"the machine was busy (1-min load average {load_before[0]:.2f} before, "
            f"{load_after[0]:.2f} after, on {os.cpu_count()} cores): times are upper bounds"
        )
    record = {
        "bench": "merge_bench",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_before": load_before,
            "load_average_after": load_after,
        },
        "model": {
            "config": "transformers.BertConfig() defaults (BERT-base shape), random weights",
            "dtype": "float32",
            "base_params": ours["base_params"],
            "lora": {
                "r": args.rank,
                "alpha": 2 * args.rank,
                "targets": ["query", "key", "value", "dense"],
                "params": ours["lora_params"],
            },
        },
        "edgerep": ours,
        "edgerep_malloc_threshold": results["edgerep_malloc"],
        "edgerep_probe": results["edgerep_probe"],
        "peft_merge_and_unload": theirs,
        "seconds_over_peft": ours["seconds"] / theirs["seconds"],
        "probe_seconds_over_fast": results["edgerep_probe"]["seconds"] / ours["seconds"],
        "targets": {
            "seconds_over_peft": 3.0,
            "peak_extra_over_model_size": 1.1,
            "max_rel_error_float64": 1e-9,
        },
        "meets_targets": {
            "seconds_over_peft": ours["seconds"] <= 3.0 * theirs["seconds"],
            "peak_extra_over_model_size": ours["peak_extra_over_model_size"] <= 1.1,
            "peak_extra_over_model_size_malloc_threshold": results["edgerep_malloc"][
                "peak_extra_over_model_size"
            ]
            <= 1.1,
            "max_rel_error_float64": ours["max_rel_error_float64"] <= 1e-9,
        },
        "notes": notes,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"edgerep.merge (probe): {results['edgerep_probe']['seconds']:.2f} s\n"
        f"edgerep.merge: {ours['seconds']:.2f} s, peak extra "
        f"{ours['peak_extra_rss_bytes'] / 2**20:.0f} MiB "
        f"({ours['peak_extra_over_model_size']:.2f}x model), "
        f"float64 max rel err {ours['max_rel_error_float64']:.1e}\n"
        f"peft merge_and_unload: {theirs['seconds']:.2f} s, peak extra "
        f"{theirs['peak_extra_rss_bytes'] / 2**20:.0f} MiB\n-> {out}"
    )


if __name__ == "__main__":
    main()
