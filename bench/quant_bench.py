"""Quantization benchmark: fp32 vs int8 on onnxruntime (CPU, 1 thread), latency and top-1.

Run from the repository root (about 1-3 minutes on 2 idle cores)::

    .venv/bin/python bench/quant_bench.py

It writes ``bench/results/quant_bench.json`` (``--out`` to change; written to a
temporary name and renamed) and prints a table. Two nets are trained on
scikit-learn's digits (`edgerep.zoo.load_digits_tensors`, seed 0, 25% held out):

- ``digits_cnn``: conv(1→16)-ReLU-conv(16→32, s2)-ReLU-linear, 8x8 input;
- ``demo_net``: `edgerep.zoo.demo_net` (RepVGG/ACNet/DBB/MobileOne blocks),
  32x32 input, trained (at most ``--train-seconds``), then `edgerep.fold.fold`-ed;
  also measured after `edgerep.quantize.equalize` (cross-layer equalization),
  with per-tensor candidates added, where equalization matters most.

Each model is exported to ONNX (TorchScript exporter, opset default) and passed
to `edgerep.quantize.select_variant` with candidates int8 static QDQ U8S8 and
S8S8 (per-channel; MinMax on 256 training samples) and int8-dynamic: p50
latency at batch 1 with `edgerep.bench.benchmark_latency` (3 runs of >= 1 s),
top-1 on the held-out digits, the speed-up over fp32, and the status
(``no speed-up`` below 1.15x, ``over budget`` above one point of top-1 loss).
``loadavg`` before and after is recorded: the machine is shared, compare within
a run only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgerep.bench.latency import LatencyConfig
from edgerep.fold import fold
from edgerep.quantize import DEFAULT_CANDIDATES, OrtQuantConfig, equalize, select_variant
from edgerep.zoo import accuracy, demo_net, load_digits_tensors, train_classifier

HERE = Path(__file__).resolve().parent


def _digits_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


def _export(model: nn.Module, size: int, path: Path) -> Path:
    torch.onnx.export(
        model,
        (torch.zeros(1, 1, size, size),),
        str(path),
        dynamo=False,
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}},
    )
    return path


def _measure(
    name: str,
    model: nn.Module,
    size: int,
    data: tuple[torch.Tensor, ...],
    work: Path,
    candidates: tuple[OrtQuantConfig, ...],
    latency: LatencyConfig,
) -> dict[str, Any]:
    x_tr, _, x_te, y_te = data
    onnx_path = _export(model, size, work / f"{name}.onnx")
    calib = [{"x": x_tr[i : i + 1].numpy()} for i in range(256)]
    _, report = select_variant(
        onnx_path,
        work / name,
        calib=calib,
        eval_feeds={"x": x_te.numpy()},
        labels=y_te.numpy(),
        candidates=candidates,
        latency_config=latency,
    )
    rows = [
        {
            "variant": c.name,
            "p50_ms": round(c.latency_ms, 4),
            "p50_spread": round(c.latency_spread, 3),
            "speedup": round(c.speedup, 3),
            "top1": round(c.metric, 4),
            "top1_drop": round(c.drop, 4),
            "status": c.status,
        }
        for c in report.candidates
    ]
    for r in rows:
        print(
            f"{name:18s} {r['variant']:22s} {r['p50_ms']:9.4f} ms {r['speedup']:5.2f}x "
            f"top1 {r['top1']:.4f} (drop {r['top1_drop']:+.4f}) {r['status']}"
        )
    return {"net": name, "chosen": report.chosen, "variants": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "quant_bench.json")
    parser.add_argument("--train-seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    latency = LatencyConfig(min_seconds=1.0, repeats=3)
    per_tensor = tuple(OrtQuantConfig(types=t, per_channel=False) for t in ("U8S8", "S8S8"))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)

        d8 = load_digits_tensors(8, seed=0)
        torch.manual_seed(0)
        cnn = train_classifier(
            _digits_cnn(), d8[0], d8[1], epochs=10, lr=5e-3, batch_size=64, seed=0
        )
        results.append(_measure("digits_cnn", cnn, 8, d8, work, DEFAULT_CANDIDATES, latency))

        d32 = load_digits_tensors(32, seed=0)
        torch.manual_seed(0)
        net = train_classifier(
            demo_net(),
            d32[0],
            d32[1],
            epochs=10,
            lr=3e-3,
            batch_size=64,
            seed=0,
            max_seconds=args.train_seconds,
        )
        folded, _ = fold(net, (torch.zeros(1, 1, 32, 32),))
        print(f"demo_net torch top1 {accuracy(net, d32[2], d32[3]):.4f}")
        cands = DEFAULT_CANDIDATES + per_tensor
        results.append(_measure("demo_net_folded", folded, 32, d32, work, cands, latency))
        equalized, eq_report = equalize(folded)
        row = _measure("demo_net_folded_cle", equalized, 32, d32, work, cands, latency)
        row["equalized_pairs"] = len(eq_report.pairs)
        results.append(row)

    out = {
        "bench": "quant_bench",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "versions": {
            "torch": torch.__version__,
            "onnxruntime": __import__("onnxruntime").__version__,
        },
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "latency_config": latency.to_dict(),
        "runtime": "onnxruntime CPUExecutionProvider, intra_op_num_threads=1, batch 1",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(out, indent=2) + "\n")
    tmp_out.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
