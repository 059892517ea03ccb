"""Peak memory of least-squares channel recovery vs the number of calibration samples.

Run from the repository root, alone on the machine (it is CPU-heavy; see bench/README.md)::

    /work/notes/run-timed .venv/bin/python bench/prune_recover_memory_bench.py

It writes ``bench/results/prune_recover_memory_bench.json`` (``--out`` to change).
The ResNet-50 of ``bench/prune_depth_memory_bench.py`` (random weights and BN
statistics) at ``--size`` (default 112), folded, the middle channels of the first
stage's bottlenecks halved (``TARGET``, l2 importance); recovery (``ls``, ridge
1e-4) of the first ``--layers`` consuming layers in execution order (default 2: the
first block's 3x3 conv, 289 design columns after pruning, and its 1x1 conv, on the
28x28 feature maps at 112). For each number of calibration samples in ``--samples``
(default 32,128: one and four batches of ``CALIB_BATCH``), each in a fresh process:

- ``full design matrix``: what recovery did before this change: the calibration
  set converted to float64 at once, and for each layer the unfolded inputs of every
  sample (and the unpruned model's outputs) captured, then solved;
- ``batched``: ``edgerep.prune._recover.recover`` now (XᵀX, XᵀY and the error sums
  accumulated per calibration batch, the error after the solve summed in a second
  pass).

The figure is the peak resident set size above the process's size once the folded
and pruned models and the float32 calibration tensor are built and the set-up's
freed heap is returned (``malloc_trim``), sampled every 2 ms (`bench/_rss.py`), and
the wall time of the call. The rows also carry each layer's error after recovery,
which both implementations must report alike.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _args import positive_int  # noqa: E402
from _rss import PeakRss  # noqa: E402
from prune_depth_memory_bench import _model  # noqa: E402

#: the middle (3x3-conv) channels of the first stage's three bottlenecks halved: their
#: consumers are 3x3 and 1x1 convs on the largest (28x28 at 112) feature maps
TARGET = "widths=" + ",".join(f"fold_layers_{b}{s}:32" for b in "012" for s in ("", "2"))


def _setup(size: int, layers: int) -> tuple[Any, ...]:
    """(folded, pruned, the first `layers` consumers, out_index) of the pruned ResNet-50."""
    from edgerep.fold import fold
    from edgerep.prune import _engine, _recover, prune

    x1 = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    folded, _ = fold(_model(), (x1,))
    got: dict[str, Any] = {}

    def capture(original, pruned, consumers, out_index, calib, **kw):  # no solve here
        got.update(pruned=pruned, consumers=consumers, out_index=out_index)
        return copy.deepcopy(pruned).eval(), []

    real = _engine.recover
    _engine.recover = capture
    try:
        prune(folded, x1, target=TARGET, calib=x1, recovery="ls", measure=False)
    finally:
        _engine.recover = real
    pruned = got["pruned"]
    order = _recover._execution_order(copy.deepcopy(pruned).double(), [x1.double()])
    first = sorted(got["consumers"], key=lambda n: order.get(n, 1 << 30))[:layers]
    return folded, pruned, first, got["out_index"]


def _full_design(
    original: nn.Module,
    pruned: nn.Module,
    consumers: Sequence[str],
    out_index: Any,
    calib: Sequence[torch.Tensor],
) -> list[float]:
    """The previous implementation's memory pattern (its loop, ``ls`` mode)."""
    from edgerep.prune._recover import _capture, _design, _set, _targets, _weights

    ref = copy.deepcopy(original).double().eval()
    work = copy.deepcopy(pruned).eval().double()
    x64 = [t.to(torch.float64) for t in calib]
    errors = []
    for name in consumers:
        layer = work.get_submodule(name)
        x = _design(layer, _capture(work, layer, x64, output=False))
        y = _targets(layer, _capture(ref, ref.get_submodule(name), x64, output=True))
        y = y[:, torch.as_tensor(out_index[name])]
        w0 = _weights(layer)
        before = float((x @ w0 - y).norm() / y.norm())
        gram = x.T @ x
        d = gram.shape[0] - 1
        lam = 1e-4 * float(torch.trace(gram[:d, :d])) / d
        penalty = torch.full((d + 1,), lam, dtype=torch.float64)
        penalty[-1] = 0.0
        gram = gram + torch.diag(penalty)
        solution = torch.linalg.solve(gram, x.T @ y)
        float(torch.linalg.cond(gram))
        after = float((x @ solution - y).norm() / y.norm())
        if after < before:
            _set(layer, solution)
        errors.append(min(after, before))
        del x, y, gram
    return errors


def _batched(original, pruned, consumers, out_index, calib) -> list[float]:
    from edgerep.prune._recover import recover

    _, rows = recover(original, pruned, consumers, out_index, calib, mode="ls")
    return [r.rel_error_after for r in rows]


def child(mode: str, samples: int, size: int, layers: int) -> dict:
    original, pruned, consumers, out_index = _setup(size, layers)
    calib = torch.randn(samples, 3, size, size, generator=torch.Generator().manual_seed(1))
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # the set-up's freed heap back to the system
    run = {"full design matrix": _full_design, "batched": _batched}[mode]
    start = time.perf_counter()
    with PeakRss() as rss:
        errors = run(original, pruned, consumers, out_index, [calib])
    return {
        "mode": mode,
        "samples": samples,
        "size": size,
        "layers": list(consumers),
        "layer_in_channels": [pruned.get_submodule(n).weight.shape[1] for n in consumers],
        "rel_error_after": errors,
        "seconds": round(time.perf_counter() - start, 1),
        "rss_start_mib": round(rss.start / 2**20, 1),
        "peak_above_start_mib": round((rss.peak - rss.start) / 2**20, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--samples", default="32,128", help="calibration sample counts (32,128)")
    p.add_argument("--size", type=positive_int, default=112, help="input resolution (112)")
    p.add_argument("--layers", type=positive_int, default=2, help="consumers recovered (2)")
    p.add_argument("--out", default=str(HERE / "results" / "prune_recover_memory_bench.json"))
    p.add_argument("--child", nargs=4, metavar=("MODE", "N", "SIZE", "L"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        mode, n, size, layers = args.child
        print(json.dumps(child(mode, int(n), int(size), int(layers))))
        return 0
    with open("/proc/loadavg") as f:
        load_before = f.read().strip()
    rows = []
    for n in (int(v) for v in args.samples.split(",")):
        for mode in ("batched", "full design matrix"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    mode,
                    str(n),
                    str(args.size),
                    str(args.layers),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            row = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps(row), flush=True)
            rows.append(row)
    with open("/proc/loadavg") as f:
        load_after = f.read().strip()
    from edgerep.prune._calib import CALIB_BATCH

    result = {
        "bench": "prune_recover_memory_bench",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "options": {
            "samples": args.samples,
            "size": args.size,
            "layers": args.layers,
            "calib_batch": CALIB_BATCH,
            "target": TARGET,
            "ridge": 1e-4,
        },
        "rows": rows,
    }
    out_path = Path(args.out)
    tmp = out_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out_path)
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
