"""GEMM peaks per precision: why a bf16 row's "% peak" must not divide by the fp32 peak.

Measures, interleaved over rounds and without the cache, the attainable GEMM rate
`edgerep.bench.roofline.measure_peak_gflops` reports at float32 (numpy's BLAS) and
at bf16 / f16 (OpenVINO's CPU plugin with that inference precision hint), with the
threads given (default 1, as the demo and the recorded benches). A precision the CPU
does not compute natively is recorded with the reason instead of a figure.

Run alone (nothing else using the cores):

    python bench/peak_bench.py [--threads 1] [--rounds 5] [--seconds 0.5] [--out FILE]

Like every script here, it writes its recorded result, ``bench/results/peak_bench.json``
next to this file, unless ``--out`` names another file (use one for trial runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from _args import positive_float, positive_int

from edgerep.bench.env import isa_flags
from edgerep.bench.roofline import measure_peak_gflops
from edgerep.devices.local import describe_local
from edgerep.errors import UnsupportedError

PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "peak_bench.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--rounds", type=positive_int, default=5)
    p.add_argument("--seconds", type=positive_float, default=0.5, help="per measurement")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON to write")
    args = p.parse_args(argv)
    load_before = os.getloadavg()
    rounds = []
    reasons: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "peak.json"
        for r in range(args.rounds):
            order = PRECISIONS if r % 2 == 0 else PRECISIONS[::-1]
            row = {"order": list(order)}
            for precision in order:
                try:
                    got = measure_peak_gflops(
                        threads=args.threads,
                        seconds=args.seconds,
                        cache=cache,
                        refresh=True,
                        precision=precision,
                    )
                    row[precision] = got["gflops"]
                except UnsupportedError as e:
                    reasons[precision] = str(e)
            rounds.append(row)
    load_after = os.getloadavg()
    medians = {p: statistics.median(r[p] for r in rounds) for p in PRECISIONS if p in rounds[0]}
    result = {
        "script": "bench/peak_bench.py",
        "command": "python " + " ".join(sys.argv),
        "cpu": describe_local().get("cpu"),
        "isa_flags": isa_flags(),
        "threads": args.threads,
        "seconds_per_measurement": args.seconds,
        "rounds": rounds,
        "median_gflops": medians,
        "ratio_to_fp32": {p: v / medians["fp32"] for p, v in medians.items()},
        "not_measured": reasons,
        "loadavg_before": list(load_before),
        "loadavg_after": list(load_after),
        "note": "fp32: numpy float32 GEMM 512x512; bf16/f16: OpenVINO CPU MatMul 1024x1024 "
        "with that INFERENCE_PRECISION_HINT (refused when the plugin computes it in another "
        "precision); best call of each measurement, median over rounds",
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_gflops", "ratio_to_fp32", "not_measured")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
