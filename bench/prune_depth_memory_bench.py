"""Peak memory of depth pruning's least-squares fit vs the number of calibration samples.

Run from the repository root, alone on the machine (it is CPU-heavy; see bench/README.md)::

    /work/notes/run-timed .venv/bin/python bench/prune_depth_memory_bench.py

It writes ``bench/results/prune_depth_memory_bench.json`` (``--out`` to change).
A ResNet-50 (He et al. 2016: bottleneck blocks [3, 4, 6, 3], BatchNorm, 1x1
projection shortcuts with the stride on the first 1x1 conv, random weights and
BN statistics) at ``--size`` (default 112), for each number of calibration samples
in ``--samples`` (default 32,128: one and four batches), each in a fresh process:

- ``full capture``: what depth pruning did before (edgerep <= the fourth session):
  every identity-shortcut block's input and output captured in float64 over the
  whole calibration set at once, then solved;
- ``batched``: ``edgerep.prune._depth.depth_prune`` now (Gram matrices accumulated
  per calibration batch of ``CALIB_BATCH`` samples, as each block's values appear;
  projection blocks are candidates too), with the MACs of each layer as its cost
  and ``max_blocks=1``.

The figure is the peak resident set size above the process's size once the model
and the (float32) calibration tensor are built (sampled every 2 ms,
`bench/_rss.py`), and the wall time of the call.
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
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _rss import PeakRss  # noqa: E402


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, stride: int) -> None:
        super().__init__()
        cout = 4 * mid
        self.conv1, self.bn1 = (
            nn.Conv2d(cin, mid, 1, stride=stride, bias=False),
            nn.BatchNorm2d(mid),
        )
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return torch.relu(self.bn3(self.conv3(h)) + self.shortcut(x))


class ResNet50(nn.Module):
    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        layers, cin = [], 64
        for i, (mid, n) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3))):
            for j in range(n):
                layers.append(Bottleneck(cin, mid, 2 if j == 0 and i > 0 else 1))
                cin = 4 * mid
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


def _model() -> nn.Module:
    torch.manual_seed(0)
    net = ResNet50()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.2, 0.6)  # keeps activations bounded through 16 blocks
    return net.eval()


def _full_capture(model: nn.Module, calib: torch.Tensor) -> int:
    """The previous implementation's memory pattern: capture all, then solve each block."""
    import copy

    from edgerep.prune._depth import _capture, _Normal, find_blocks, solve_map, to_graph

    gm = to_graph(copy.deepcopy(model).eval())
    blocks = [b for b in find_blocks(gm, [calib[:1]]) if not b.shortcut]
    ref = copy.deepcopy(gm).double()
    values = _capture(ref, {b.output for b in blocks} | {b.input for b in blocks}, [calib.double()])
    for b in blocks:
        normal = _Normal(b.channels, b.channels)
        x, y = values[b.input], values[b.output]
        eye = torch.eye(b.channels, dtype=torch.float64)
        rows = lambda t: t.transpose(0, 1).reshape(t.shape[1], -1).T  # noqa: E731
        normal.add(rows(x), rows(y), (eye, torch.zeros(b.channels, dtype=torch.float64)))
        solve_map(normal, eye, 1e-4)
    return len(blocks)


def _batched(model: nn.Module, calib: torch.Tensor) -> int:
    from edgerep.prune._depth import depth_prune

    _, _, rows = depth_prune(
        model,
        [calib[:1]],
        [calib],
        lambda shapes: [float(s.macs()) for s in shapes],
        max_blocks=1,
        max_error=10.0,
    )
    return len(rows)


def child(mode: str, samples: int, size: int) -> dict:
    model = _model()
    calib = torch.randn(samples, 3, size, size, generator=torch.Generator().manual_seed(1))
    run = {"full capture": _full_capture, "batched": _batched}[mode]
    start = time.perf_counter()
    with PeakRss() as rss:
        blocks = run(model, calib)
    return {
        "mode": mode,
        "samples": samples,
        "size": size,
        "blocks": blocks,
        "seconds": round(time.perf_counter() - start, 1),
        "rss_start_mib": round(rss.start / 2**20, 1),
        "peak_above_start_mib": round((rss.peak - rss.start) / 2**20, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--samples", default="32,128", help="calibration sample counts (32,128)")
    p.add_argument("--size", type=int, default=112, help="input resolution (112)")
    p.add_argument("--out", default=str(HERE / "results" / "prune_depth_memory_bench.json"))
    p.add_argument("--child", nargs=3, metavar=("MODE", "N", "SIZE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        mode, n, size = args.child
        print(json.dumps(child(mode, int(n), int(size))))
        return 0
    with open("/proc/loadavg") as f:
        load_before = f.read().strip()
    rows = []
    for n in (int(v) for v in args.samples.split(",")):
        for mode in ("batched", "full capture"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", mode, str(n), str(args.size)],
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
        "bench": "prune_depth_memory_bench",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "options": {"samples": args.samples, "size": args.size, "calib_batch": CALIB_BATCH},
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
