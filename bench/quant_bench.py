"""Quantization benchmark: fp32 vs int8/fp16 per backend, latency, accuracy, SQNR.

Run from the repository root (about 5-10 minutes on 2 idle cores)::

    .venv/bin/python bench/quant_bench.py

It writes ``bench/results/quant_bench.json`` (``--out`` to change; written to a
temporary name and renamed) and prints a table. For each net and each backend
(onnxruntime CPU and OpenVINO CPU, one thread, batch 1, OpenVINO with the f32
precision hint so that "fp32" is true float32) it runs
`edgerep.quantize.select_variant` on the candidates `edgerep quantize` tries by
default (`edgerep.quantize.candidates_for(backend, "int8")`) plus fp16 and, on
onnxruntime, dynamic int8: p50 latency with `edgerep.bench.benchmark_latency`
(3 runs of >= 1 s), the metric, the speed-up over fp32 on the same backend and the
status (``no speed-up`` below 1.15x, ``over budget`` above one point lost); the
``chosen`` variant is edgerep's default choice. Output SQNR of each variant against
the backend's fp32 is recorded too.

Nets:

- ``digits_cnn``: conv(1→16)-ReLU-conv(16→32, s2)-ReLU-linear, 8x8 digits, trained
  10 epochs; metric top-1 on the 450 held-out digits (scikit-learn's bundled set).
- ``demo_net``: `edgerep.zoo.demo_net` (RepVGG/ACNet/DBB/MobileOne blocks) on 32x32
  digits, trained for at most ``--train-seconds`` then folded; and the same after
  `edgerep.quantize.equalize` (cross-layer equalization): top-1.
- ``repvgg_a0``: `edgerep.zoo.repvgg_a0` (10 classes: 7.8M parameters at train
  time, 7.0M folded), trained for ``--a0-epochs`` on the 32x32 digits (grey
  repeated to 3 channels), folded, exported with dynamic height and width: top-1
  on the 32x32 held-out digits, latency at its deployment size 1x3x224x224 (the
  same ONNX/IR; `select_variant(latency_feeds=...)`).

Equalization plus mixed precision (the issue's second target): for each net and
backend onnxruntime, per-tensor U8S8 int8 on the folded net, after cross-layer
equalization, and after equalization plus `mixed_precision` (the most sensitive
layers kept in float until the drop is within one point), with its latency. Also
``demo_net_folded_unbalanced``: the folded demo_net made badly balanced by an exact
per-channel rescaling of its layer pairs (`_imbalance`, sigma 1; the float32
logits change by ~1e-6 relative), the situation of a folded re-parameterized net
whose plain per-tensor int8 collapses.

Calibration: 256 training digits, seeded. ``loadavg`` before and after is
recorded: the machine is shared, compare within a run only.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _args import positive_float
from torch import nn

from edgerep.bench.latency import LatencyConfig, benchmark_latency
from edgerep.fold import fold
from edgerep.quantize import (
    OrtQuantConfig,
    OvQuantConfig,
    candidates_for,
    equalize,
    mixed_precision,
    quantize_onnx,
    select_variant,
    sqnr_db,
)
from edgerep.runtimes import get_runtime
from edgerep.zoo import accuracy, demo_net, load_digits_tensors, repvgg_a0, train_classifier

HERE = Path(__file__).resolve().parent
BACKENDS = ("onnxruntime", "openvino")
EXTRA: dict[str, tuple[Any, ...]] = {
    "onnxruntime": (OrtQuantConfig(mode="int8-dynamic"), OrtQuantConfig(mode="fp16")),
    "openvino": (OvQuantConfig(mode="fp16"),),
}
RUNTIME_OPTIONS = {
    "onnxruntime": {"threads": 1},
    "openvino": {"threads": 1, "inference_precision": "f32"},
}


def _digits_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


def _export(model: nn.Module, shape: tuple[int, ...], path: Path, backend: str) -> Path:
    torch.onnx.export(
        model,
        (torch.zeros(*shape),),
        str(path),
        dynamo=False,
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}, "logits": {0: "n"}},
    )
    if backend == "openvino":
        import openvino as ov

        xml = path.with_suffix(".xml")
        ov.save_model(ov.convert_model(str(path)), str(xml), compress_to_fp16=False)
        return xml
    return path


def _outputs(backend: str, path: Path, x: np.ndarray) -> np.ndarray:
    session = get_runtime(backend).load(path, options=RUNTIME_OPTIONS[backend])
    try:
        return np.concatenate([session.run({"x": x[i : i + 16]})[0] for i in range(0, len(x), 16)])
    finally:
        session.close()


def _measure(
    name: str,
    model: nn.Module,
    shape: tuple[int, ...],
    calib_x: torch.Tensor,
    eval_x: torch.Tensor,
    labels: torch.Tensor | None,
    work: Path,
    latency: LatencyConfig,
    latency_x: torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    rows = []
    for backend in BACKENDS:
        src = _export(model, shape, work / f"{name}-{backend}.onnx", backend)
        candidates = candidates_for(backend, "int8") + EXTRA[backend]
        calib = [{"x": calib_x[i : i + 1].numpy()} for i in range(len(calib_x))]
        _, report = select_variant(
            src,
            work / f"{name}-{backend}",
            calib=calib,
            eval_feeds={"x": eval_x.numpy()},
            labels=None if labels is None else labels.numpy(),
            candidates=candidates,
            latency_config=latency,
            latency_feeds=None if latency_x is None else {"x": latency_x.numpy()},
        )
        variants = []
        for c in report.candidates:
            sqnr = float("nan") if c.sqnr_db is None else c.sqnr_db  # measured by the selection
            variants.append(
                {
                    "variant": c.name,
                    "p50_ms": round(c.latency_ms, 4),
                    "p50_spread": round(c.latency_spread, 3),
                    "speedup": round(c.speedup, 3),
                    report.metric: round(c.metric, 4),
                    "drop": round(c.drop, 4),
                    "sqnr_db": None if not np.isfinite(sqnr) else round(sqnr, 1),
                    "precision_ran": c.precision or None,
                    "status": c.status,
                }
            )
            print(
                f"{name:22s} {backend:11s} {c.name:16s} {c.latency_ms:9.4f} ms "
                f"{c.speedup:5.2f}x {report.metric} {c.metric:.4f} (drop {c.drop:+.4f}) "
                f"SQNR {sqnr:6.1f} dB  {c.status}",
                flush=True,
            )
        rows.append(
            {
                "net": name,
                "backend": backend,
                "input": list(shape if latency_x is None else latency_x.shape),
                "metric": report.metric,
                "chosen": report.chosen,
                "variants": variants,
            }
        )
    return rows


def _equalize_and_mix(
    name: str,
    folded: nn.Module,
    eq_report: Any,
    x_tr: torch.Tensor,
    x_te: torch.Tensor,
    y_te: torch.Tensor,
    work: Path,
    equalized: nn.Module | None = None,
    latency_x: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Per-tensor U8S8 int8 on onnxruntime: plain, after CLE, after CLE + mixed precision."""
    config = OrtQuantConfig(types="U8S8", per_channel=False)
    calib = [{"x": x_tr[i : i + 1].numpy()} for i in range(256)]
    shape = (1, *x_te.shape[1:])
    plain = _export(folded, shape, work / f"{name}-mp-plain.onnx", "onnxruntime")
    if equalized is None or eq_report is None:
        equalized, eq_report = equalize(folded)
    cle = _export(equalized, shape, work / f"{name}-mp-cle.onnx", "onnxruntime")
    row: dict[str, Any] = {
        "net": name,
        "config": config.name,
        "equalized_pairs": len(eq_report.pairs),
    }
    reference = _outputs("onnxruntime", plain, x_te.numpy())
    fp32_top1 = float((reference.argmax(1) == y_te.numpy()).mean())
    row["fp32_top1"] = round(fp32_top1, 4)
    for label, src in (("plain", plain), ("cle", cle)):
        out = work / f"{name}-mp-{label}-int8.onnx"
        quantize_onnx(src, out, config, calib=calib)
        q = _outputs("onnxruntime", out, x_te.numpy())
        row[f"{label}_int8_top1_drop"] = round(
            fp32_top1 - float((q.argmax(1) == y_te.numpy()).mean()), 4
        )
        row[f"{label}_int8_sqnr_db"] = round(sqnr_db(reference, q), 1)
    path, mp = mixed_precision(
        cle,
        work / f"{name}-mp-mixed.onnx",
        calib=calib,
        eval_feeds={"x": x_te.numpy()},
        labels=y_te.numpy(),
        config=config,
        max_drop=0.01,
    )
    row["mixed"] = {
        "status": mp.status,
        "kept_float": list(mp.kept_float),
        "drop": round(mp.steps[-1].drop, 4) if mp.steps else None,
    }
    one = {"x": (x_te[:1] if latency_x is None else latency_x).numpy()}
    for label, p in (("fp32", plain), ("cle_mixed", path)):
        session = get_runtime("onnxruntime").load(p, options=RUNTIME_OPTIONS["onnxruntime"])
        row[f"{label}_p50_ms"] = round(
            benchmark_latency(
                session.run, one, config=LatencyConfig(min_seconds=1.0, repeats=3)
            ).stats.p50_ms,
            4,
        )
        session.close()
    print(name, json.dumps(row), flush=True)
    return row


def _imbalance(model: nn.Module, pairs: Any, sigma: float, seed: int) -> nn.Module:
    """An exactly equivalent copy whose layer pairs (layer → ReLU → layer, groups 1)
    have badly balanced channel ranges: output channel c of the first layer scaled by
    s_c = exp(sigma * N(0, 1)), input channel c of the second divided by s_c (ReLU is
    positively homogeneous). Folded re-parameterized nets come out of training
    unbalanced like this; per-tensor int8 suffers, equalization undoes it."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    for pair in pairs:
        a, b = out.get_submodule(pair.first), out.get_submodule(pair.second)
        if getattr(a, "groups", 1) != 1 or getattr(b, "groups", 1) != 1:
            continue
        s = torch.exp(sigma * torch.randn(a.weight.shape[0], generator=gen))
        with torch.no_grad():
            a.weight.mul_(s.view(-1, *[1] * (a.weight.dim() - 1)))
            if a.bias is not None:
                a.bias.mul_(s)
            b.weight.div_(s.view(1, -1, *[1] * (b.weight.dim() - 2)))
    return out


def _targets(results: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for row in results:
        chosen = next(v for v in row["variants"] if v["variant"] == row["chosen"])
        key = f"{row['net']}/{row['backend']}"
        out[key] = {
            "chosen": row["chosen"],
            "speedup": chosen["speedup"],
            "drop": chosen["drop"],
            "metric": row["metric"],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "quant_bench.json")
    parser.add_argument("--train-seconds", type=positive_float, default=60.0)
    parser.add_argument("--skip-a0", action="store_true", help="skip the RepVGG-A0 net")
    parser.add_argument("--a0-epochs", type=int, default=6, help="RepVGG-A0 training epochs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("nncf").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    latency = LatencyConfig(min_seconds=1.0, repeats=3)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)

        x_tr, y_tr, x_te, y_te = load_digits_tensors(8, seed=0)
        torch.manual_seed(0)
        cnn = train_classifier(_digits_cnn(), x_tr, y_tr, epochs=10, lr=5e-3, batch_size=64, seed=0)
        results += _measure("digits_cnn", cnn, (1, 1, 8, 8), x_tr[:256], x_te, y_te, work, latency)

        x_tr, y_tr, x_te, y_te = load_digits_tensors(32, seed=0)
        torch.manual_seed(0)
        net = train_classifier(
            demo_net(),
            x_tr,
            y_tr,
            epochs=10,
            lr=3e-3,
            batch_size=64,
            seed=0,
            max_seconds=args.train_seconds,
        )
        print(f"demo_net torch top1 {accuracy(net, x_te, y_te):.4f}")
        folded, _ = fold(net, (torch.zeros(1, 1, 32, 32),))
        shape = (1, 1, 32, 32)
        results += _measure("demo_net_folded", folded, shape, x_tr[:256], x_te, y_te, work, latency)
        equalized, eq_report = equalize(folded)
        rows = _measure(
            "demo_net_folded_cle", equalized, shape, x_tr[:256], x_te, y_te, work, latency
        )
        for row in rows:
            row["equalized_pairs"] = len(eq_report.pairs)
        results += rows

        mixed_rows = [
            _equalize_and_mix(
                "demo_net_folded", folded, eq_report, x_tr, x_te, y_te, work, equalized
            )
        ]

        unbalanced = _imbalance(folded, eq_report.pairs, sigma=1.0, seed=0)
        with torch.no_grad():
            ref, got = folded(x_te), unbalanced(x_te)
        row = _equalize_and_mix(
            "demo_net_folded_unbalanced", unbalanced, None, x_tr, x_te, y_te, work
        )
        row["float32_max_rel_change"] = float((got - ref).abs().max() / ref.abs().max())
        mixed_rows.append(row)

        if not args.skip_a0:
            x3_tr, x3_te = x_tr.repeat(1, 3, 1, 1), x_te.repeat(1, 3, 1, 1)
            torch.manual_seed(0)
            a0 = repvgg_a0(num_classes=10)
            for epoch in range(args.a0_epochs):
                train_classifier(a0, x3_tr, y_tr, epochs=1, lr=5e-4, batch_size=64, seed=epoch)
            print(f"repvgg_a0 torch top1 {accuracy(a0, x3_te, y_te):.4f}")
            a0_folded, _ = fold(a0, (x3_te[:1],))
            big = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
            results += _measure(
                "repvgg_a0_folded",
                a0_folded,
                (1, 3, 32, 32),
                x3_tr[:256],
                x3_te,
                y_te,
                work,
                latency,
                latency_x=big,
            )
            a0_eq, a0_eq_report = equalize(a0_folded)
            mixed_rows.append(
                _equalize_and_mix(
                    "repvgg_a0_folded",
                    a0_folded,
                    a0_eq_report,
                    x3_tr,
                    x3_te,
                    y_te,
                    work,
                    a0_eq,
                    big,
                )
            )

    out = {
        "bench": "quant_bench",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "versions": {
            name: __import__(name).__version__
            for name in ("torch", "onnxruntime", "openvino", "nncf")
        },
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "latency_config": latency.to_dict(),
        "runtime": "CPU, 1 thread, batch 1; OpenVINO with INFERENCE_PRECISION_HINT=f32",
        "targets": _targets(results),
        "equalize_and_mixed_precision": mixed_rows,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(out, indent=2) + "\n")
    tmp_out.replace(args.out)
    print(json.dumps(out["targets"], indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
