"""Depth and rank pruning benchmark: a residual net trained on digits, no fine-tuning.

Run from the repository root (train under the shared lock, time under the exclusive
one, see bench/README.md)::

    /work/notes/run-test .venv/bin/python bench/prune_depth_bench.py --weights /tmp/rn.pt --train-only
    /work/notes/run-timed .venv/bin/python bench/prune_depth_bench.py --weights /tmp/rn.pt

It writes ``bench/results/prune_depth_bench.json`` (``--out`` to change). Steps:

1. a ResNet-style net with BatchNorm (stem, 2 stages of 4 residual blocks, each
   ``x + conv1x1(relu(conv1x1(relu(dwconv3x3(x)))))``, inverted bottleneck x4, a
   strided projection block between the stages, head) trained ``--epochs`` on the
   32x32 digits (grey repeated to 3 channels); folded with `edgerep.fold`;
2. ``edgerep.prune(method="depth", depth_blocks=k)`` for k in ``--blocks`` (blocks
   chosen by the onnxruntime per-layer latency saved per reconstruction error; the
   error bound ``--depth-error`` 1.0 leaves the choice to ``depth_blocks``), the same
   blocks simply removed (identity) for comparison; ``method="rank"``
   (``--rank-error`` 0.3); ``method="depth,rank"``; the first depth-pruned model
   folded again (adjacent maps merge); 256 training digits as calibration data;
3. every model exported to ONNX and timed interleaved on onnxruntime CPU, 1 thread,
   batch 1 at 1x3x224x224 (4 rounds of >= 1 s, alternating order, p50 = median of
   rounds); top-1 and the relative error of the logits against the unpruned model on
   the 450 held-out digits at 32x32.

``loadavg`` before and after is recorded: the machine is shared.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from edgerep.bench.latency import LatencyConfig
from edgerep.fold import fold
from edgerep.prune import prune
from edgerep.prune._depth import find_blocks, replace_blocks, to_graph
from edgerep.zoo import accuracy, load_digits_tensors, train_classifier

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from prune_bench import _macs, _time_models  # noqa: E402


class Block(nn.Module):
    """Inverted-bottleneck residual block (MobileNetV2 / ConvNeXt style, identity shortcut)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c))
        self.pw1 = nn.Sequential(nn.Conv2d(c, 4 * c, 1), nn.BatchNorm2d(4 * c))
        self.pw2 = nn.Sequential(nn.Conv2d(4 * c, c, 1), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pw2(torch.relu(self.pw1(torch.relu(self.dw(x)))))


class ResNetish(nn.Module):
    def __init__(self, c: int = 32, blocks: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, stride=2, padding=1), nn.BatchNorm2d(c))
        self.stage1 = nn.Sequential(*[Block(c) for _ in range(blocks)])
        self.down = nn.Sequential(
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.BatchNorm2d(2 * c)
        )
        self.stage2 = nn.Sequential(*[Block(2 * c) for _ in range(blocks)])
        self.head = nn.Linear(2 * c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage1(torch.relu(self.stem(x)))
        x = self.stage2(torch.relu(self.down(x)))
        return self.head(x.mean((2, 3)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "prune_depth_bench.json")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--size", type=int, default=224, help="latency input size")
    parser.add_argument(
        "--blocks", type=int, nargs="+", default=[2, 4], help="depth_blocks variants"
    )
    parser.add_argument("--depth-error", type=float, default=1.0)
    parser.add_argument("--rank-error", type=float, default=0.3)
    parser.add_argument("--weights", type=Path, help="trained state_dict cache (load or write)")
    parser.add_argument("--train-only", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    x_tr, y_tr, x_te, y_te = load_digits_tensors(32, seed=0)
    x3_tr, x3_te = x_tr.repeat(1, 3, 1, 1), x_te.repeat(1, 3, 1, 1)
    torch.manual_seed(0)
    net = ResNetish()
    if args.weights is not None and args.weights.is_file():
        net.load_state_dict(torch.load(args.weights, weights_only=True))
        net.eval()
    else:
        train_classifier(net, x3_tr, y_tr, epochs=args.epochs, lr=2e-3, batch_size=64, seed=0)
        if args.weights is not None:
            torch.save(net.state_dict(), args.weights)
    train_s = time.perf_counter() - t0
    if args.train_only:
        print(f"trained in {train_s:.0f} s; top-1 {accuracy(net, x3_te, y_te):.4f}")
        return 0
    folded, _ = fold(net, (x3_te[:1],))
    big = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    calib = x3_tr[:256]
    # the per-layer tables are measured inside prune(); the end-to-end timing is the
    # interleaved run below (all models in one loop), so prune() does not time again
    common = {"calib": calib, "latency_inputs": (big,), "measure": False}
    models: dict[str, nn.Module] = {"unpruned": folded}
    reports = {}
    seconds = {}
    variants = {
        f"depth{k}": {"method": "depth", "depth_blocks": k, "depth_error": args.depth_error}
        for k in args.blocks
    }
    variants["rank"] = {"method": "rank", "rank_error": args.rank_error}
    k0 = args.blocks[0]
    variants[f"depth{k0}_rank"] = {
        "method": "depth,rank",
        "depth_blocks": k0,
        "depth_error": args.depth_error,
        "rank_error": args.rank_error,
    }
    with tempfile.TemporaryDirectory() as cache:
        for name, kw in variants.items():
            t1 = time.perf_counter()
            model, report = prune(folded, (x3_te[:1],), cache_dir=cache, **common, **kw)
            seconds[name] = time.perf_counter() - t1
            models[name], reports[name] = model, report
    for k in args.blocks:
        replaced = {d.block for d in reports[f"depth{k}"].depth if d.replaced}
        gm = to_graph(copy.deepcopy(folded))
        blocks = [b for b in find_blocks(gm, [x3_te[:1]]) if b.output in replaced]
        # the same blocks simply dropped (identity maps, nothing fitted)
        models[f"depth{k}_removed"] = replace_blocks(gm, blocks)
    models[f"depth{k0}_refolded"], _ = fold(models[f"depth{k0}"], (x3_te[:1],))
    top1 = {n: accuracy(m, x3_te, y_te) for n, m in models.items()}
    with torch.no_grad():
        ref = folded(x3_te)
        logit_err = {n: float((m(x3_te) - ref).norm() / ref.norm()) for n, m in models.items()}
    convs = {n: sum(isinstance(c, nn.Conv2d) for c in m.modules()) for n, m in models.items()}
    macs = {n: _macs(m, big) for n, m in models.items()}
    timing = _time_models(models, big, LatencyConfig(min_seconds=1.0, repeats=4))
    base = timing["unpruned"]["p50_ms"]
    summary = {
        n: {
            "p50_ratio": timing[n]["p50_ms"] / base,
            "top1": top1[n],
            "top1_drop_points": 100 * (top1["unpruned"] - top1[n]),
            "macs_ratio": macs[n] / macs["unpruned"],
            "logit_rel_error_held_out": logit_err[n],
            "conv_layers": convs[n],
        }
        for n in models
    }
    summary["blocks_replaced"] = {
        f"depth{k}": [d.block for d in reports[f"depth{k}"].depth if d.replaced]
        for k in args.blocks
    }
    summary["blocks_found"] = len(reports[f"depth{k0}"].depth)
    summary["layers_factorized"] = {
        r.layer: r.rank for r in reports["rank"].rank if r.rank is not None
    }
    out = {
        "bench": "prune_depth_bench",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "versions": {n: __import__(n).__version__ for n in ("torch", "onnxruntime")},
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "runtime": f"onnxruntime CPU, 1 thread, batch 1, input 1x3x{args.size}x{args.size}",
        "options": {
            "depth_blocks": args.blocks,
            "depth_error": args.depth_error,
            "rank_error": args.rank_error,
        },
        "train": {"epochs": args.epochs, "seconds": train_s},
        "prune_seconds": seconds,
        "summary": summary,
        "timing": timing,
        "reports": {n: r.to_dict() for n, r in reports.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(out, indent=2, default=str) + "\n")
    tmp_out.replace(args.out)
    for n, r in reports.items():
        print(f"[{n}]\n{r.to_text()}")
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
