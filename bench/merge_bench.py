"""Merge benchmark: `edgerep.merge` on a ~110M-parameter transformer, next to PEFT's merge.

Run from the repository root (about 2-3 minutes on 2 idle cores)::

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
given (PEFT merges in place; edgerep returns a new model and leaves its input as
it was, so its figure includes the merged layers it returns: 0.78x the model for
these 73 layers).

Workers, run interleaved for ``--rounds`` rounds (peft, edgerep, edgerep_copy per
round at torch's default thread count; then peft and edgerep again with
``OMP_NUM_THREADS=1`` per entry of ``--threads``; the medians are reported), then
``edgerep_probe`` once: ``peft``
(``merge_and_unload``, float32, in place), ``edgerep`` (the default: the LoRA rule,
``W0 + s·B·A`` as one float64 ``addmm`` per layer, gated by 8 random float64 rows
through the wrapped layer; unchanged tensors shared with the input),
``edgerep_copy`` (the same with ``share_unchanged=False``: a fully independent copy,
so at least 1x the model) and ``edgerep_probe`` (``fast=False``: every layer read
off by the identity probe).

Why a single-thread series too: with 2 OpenMP threads on 2 cores, any other process
on the machine (one outside the CPU lock) stalls every parallel op at its barrier;
merges then take several times longer, and by how much depends on how many parallel
ops each merge runs. One thread per merge is the comparison that such load distorts
least. ``threads`` names the setting of each series; every worker records the
1-minute load average when it started.

What the times include: edgerep's is the whole ``edgerep.merge`` call (finding the
wrappers, building the returned model, the float64 work and the verifier for every
layer, the report); PEFT's is ``merge_and_unload`` on its own model, in place (no copy,
no check). Neither includes importing its package: edgerep's merge modules are
imported before the clock starts (PEFT's came with the model), and that one-time
cost is recorded as ``import_seconds`` (until 2026-12-06 10:20 UTC it was inside
edgerep's time).

Fields per run: ``seconds`` (wall time of the merge call), ``peak_extra_rss_bytes``,
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
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

from _args import positive_int
from _merge_common import bert_base, busy_note, machine, run_worker
from _rss import PeakRss as _PeakRss

INTERLEAVED = ["peft", "edgerep", "edgerep_copy"]
WORKERS = [*INTERLEAVED, "edgerep_probe"]


def _build(rank: int) -> tuple[Any, int]:
    import torch
    from peft import LoraConfig, get_peft_model

    base = bert_base(0)
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
        "loadavg_1min_at_start": os.getloadavg()[0],
        "base_params": n_base,
        "lora_params": n_lora,
        "model_size_bytes_fp32": 4 * n_base,
        "torch_threads": torch.get_num_threads(),
    }
    if which.startswith("edgerep"):
        # imported before the clock starts, as PEFT's merge code is (it came with the
        # model); the one-time cost of the import is recorded on its own
        start = time.perf_counter()
        import edgerep
        import edgerep.merge._engine  # what the first merge() call imports

        result["import_seconds"] = time.perf_counter() - start
    with _PeakRss() as mem:
        start = time.perf_counter()
        if which.startswith("edgerep"):
            merged, report = edgerep.merge(
                model, fast=which != "edgerep_probe", share_unchanged=which != "edgerep_copy"
            )
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


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median time, with every run's time and memory alongside."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    out = dict(ordered[len(ordered) // 2])
    out["seconds_runs"] = [r["seconds"] for r in runs]
    out["peak_extra_over_model_size_runs"] = [r["peak_extra_over_model_size"] for r in runs]
    out["seconds"] = statistics.median(out["seconds_runs"])
    out["peak_extra_over_model_size_max"] = max(out["peak_extra_over_model_size_runs"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/merge_bench.json")
    parser.add_argument("--rank", type=positive_int, default=16)
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument(
        "--threads",
        default="1",
        help="comma-separated thread counts of the extra peft/edgerep series per round "
        "(OMP_NUM_THREADS; '' for none)",
    )
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.rank)))
        return
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    load_before = os.getloadavg()
    runs: dict[str, list[dict[str, Any]]] = {w: [] for w in WORKERS}
    by_threads: dict[int, dict[str, list[dict[str, Any]]]] = {
        n: {"peft": [], "edgerep": []} for n in threads
    }
    for _ in range(args.rounds):
        for w in INTERLEAVED:
            runs[w].append(run_worker(__file__, ["--worker", w, "--rank", str(args.rank)]))
        for n in threads:
            for w in ("peft", "edgerep"):
                by_threads[n][w].append(
                    run_worker(
                        __file__,
                        ["--worker", w, "--rank", str(args.rank)],
                        env={"OMP_NUM_THREADS": str(n)},
                    )
                )
    runs["edgerep_probe"].append(
        run_worker(__file__, ["--worker", "edgerep_probe", "--rank", str(args.rank)])
    )
    load_after = os.getloadavg()
    results = {w: _median(r) for w, r in runs.items()}
    ours, theirs = results["edgerep"], results["peft"]
    ratios = [a["seconds"] / b["seconds"] for a, b in zip(runs["edgerep"], runs["peft"])]
    series = {}
    for n, r in by_threads.items():
        per_round = [a["seconds"] / b["seconds"] for a, b in zip(r["edgerep"], r["peft"])]
        series[f"{n}_thread{'s' if n != 1 else ''}"] = {
            "threads": n,
            "edgerep": _median(r["edgerep"]),
            "peft_merge_and_unload": _median(r["peft"]),
            "seconds_over_peft_per_round": per_round,
            "seconds_over_peft_median_of_rounds": statistics.median(per_round),
        }
    notes = [
        "edgerep's LoRA rule adds s·B·A into a float64 copy of each base weight (one addmm) and "
        "keeps the result only if 8 random float64 rows through the wrapped layer (recorded "
        "before the rule wrote into the copy) agree to 1e-9; edgerep_probe reads every layer "
        "off its function (identity basis) instead; PEFT adds its delta in float32 in place.",
        "peak_extra_rss counts what the call added on top of the model it was given. edgerep "
        "never mutates its input, so it includes the merged layers it returns (0.78x the model "
        "here) plus one float64 buffer the size of the largest layer; with share_unchanged=True "
        "(the default) the embeddings, norms and other unchanged tensors are shared with the "
        "input (new Parameter objects over the same storage); edgerep_copy copies them too.",
        "seconds_over_peft is the ratio of the medians; seconds_over_peft_per_round pairs the "
        "runs of each interleaved round (median: seconds_over_peft_median_of_rounds).",
        "edgerep's seconds are the whole merge call, building the returned model included "
        "(new float32 tensors for the merged layers, the others shared with the input); "
        "PEFT's merge_and_unload writes into the model it was given and checks nothing. "
        "Neither time includes importing the package (edgerep's one-time import of its merge "
        "modules is import_seconds; earlier runs of this bench counted it in edgerep's time).",
        "series_by_threads repeats peft and edgerep in each round with OMP_NUM_THREADS set "
        "(2 OpenMP threads on 2 cores stall at every parallel op's barrier while any other "
        "process runs).",
    ]
    notes += busy_note(load_before, load_after)
    record = {
        "bench": "merge_bench",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(load_before, load_after),
        "rounds": args.rounds,
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
        "edgerep_copy": results["edgerep_copy"],
        "edgerep_probe": results["edgerep_probe"],
        "peft_merge_and_unload": theirs,
        "seconds_over_peft": ours["seconds"] / theirs["seconds"],
        "seconds_over_peft_per_round": ratios,
        "seconds_over_peft_median_of_rounds": statistics.median(ratios),
        "threads": "torch's default (edgerep/peft/edgerep_copy/edgerep_probe above)",
        "series_by_threads": series,
        "probe_seconds_over_fast": results["edgerep_probe"]["seconds"] / ours["seconds"],
        "targets": {
            "seconds_over_peft": 3.0,
            "peak_extra_over_model_size": 1.1,
            "max_rel_error_float64": 1e-9,
        },
        "meets_targets": {
            "seconds_over_peft": ours["seconds"] <= 3.0 * theirs["seconds"],
            "peak_extra_over_model_size": ours["peak_extra_over_model_size_max"] <= 1.1,
            "max_rel_error_float64": ours["max_rel_error_float64"] <= 1e-9,
        },
        "notes": notes,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"edgerep.merge (probe): {results['edgerep_probe']['seconds']:.2f} s\n"
        f"edgerep.merge: {ours['seconds']:.2f} s (median of {args.rounds}), peak extra "
        f"{ours['peak_extra_rss_bytes'] / 2**20:.0f} MiB "
        f"({ours['peak_extra_over_model_size_max']:.2f}x model at most), "
        f"float64 max rel err {ours['max_rel_error_float64']:.1e}\n"
        f"edgerep.merge share_unchanged=False: {results['edgerep_copy']['seconds']:.2f} s, "
        f"{results['edgerep_copy']['peak_extra_over_model_size_max']:.2f}x model\n"
        f"peft merge_and_unload: {theirs['seconds']:.2f} s, peak extra "
        f"{theirs['peak_extra_rss_bytes'] / 2**20:.0f} MiB\n"
        f"ratio {ours['seconds'] / theirs['seconds']:.2f}x (per round "
        f"{', '.join(f'{r:.2f}' for r in ratios)})"
    )
    for name, s in series.items():
        print(
            f"{name}: edgerep {s['edgerep']['seconds']:.2f} s, peft "
            f"{s['peft_merge_and_unload']['seconds']:.2f} s, per round "
            f"{', '.join(f'{r:.2f}' for r in s['seconds_over_peft_per_round'])}"
        )
    print(f"-> {out}")


if __name__ == "__main__":
    main()
