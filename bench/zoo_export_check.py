"""Every zoo net through every format: `edgerep.pipeline.convert(..., to=("all",))`.

Issue 4's target "every zoo net exports to every format, or the op-coverage check
names exactly why not", checked on this machine. Writes
``bench/results/zoo_export_check.json``: per net and format the status
(verified / exported-not-verified-here / not-built-here / failed) with its reason, who
verified it where that matters (Core ML: "reference evaluator" off macOS), the worst
relative parity error,
and the wall time of the whole convert call. Run:
``.venv/bin/python bench/zoo_export_check.py``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from edgerep.errors import EdgerepError
from edgerep.pipeline import convert
from edgerep.spec import parse_input_spec
from edgerep.zoo import nets, randomize_

OUT = Path(__file__).parent / "results" / "zoo_export_check.json"

CASES = {
    "demo_net": (lambda: nets.demo_net(num_classes=10, in_channels=1), "x:N[1..1..4]x1x32x32"),
    "mobileone_net": (
        lambda: nets.mobileone_net(num_classes=10, in_channels=3),
        "x:N[1..1..4]x3x64x64",
    ),
    "repvgg_a0": (lambda: nets.repvgg_a0(num_classes=10, in_channels=3), "x:N[1..1..4]x3x64x64"),
}


def main() -> int:
    results: dict[str, dict] = {}
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for name, (make, spec) in CASES.items():
            model = randomize_(make(), seed=0).eval()
            start = time.perf_counter()
            entry: dict = {"input": spec}
            try:
                _, res = convert(
                    model, [parse_input_spec(spec)], to=("all",), out_dir=Path(tmp) / name
                )
                entry["formats"] = {
                    f.format: {
                        "status": f.status,
                        # who verified it where it matters, e.g. "reference evaluator"
                        # for Core ML off macOS ("Core ML framework" on macOS)
                        **({"verified_by": f.verified_by} if f.verified_by else {}),
                        **(
                            {"max_rel_error": max(p.max_rel_error for p in f.parity)}
                            if f.parity
                            else {}
                        ),
                        "reason": f.reason,
                    }
                    for f in res.formats
                }
            except EdgerepError as e:
                entry["error"] = f"{type(e).__name__}: {e}"
            entry["seconds"] = round(time.perf_counter() - start, 2)
            results[name] = entry
            print(name, json.dumps(entry, indent=1), flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(
        json.dumps(
            {
                "schema_version": 1,
                "date": started,
                # "seconds" are wall times of a run sharing the CPU, not measurements
                "loadavg_before": load_before,
                "loadavg": os.getloadavg(),
                "nets": results,
            },
            indent=2,
        )
        + "\n"
    )
    failed = [n for n, e in results.items() if "error" in e]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
