"""Do the equivalence transforms pay? int8 SQNR and top-1 with and without each one.

Run from the repository root (about 2-3 minutes on 2 cores)::

    .venv/bin/python bench/transform_bench.py

It writes ``bench/results/transform_bench.json`` (``--out`` to change; written to a
temporary name and renamed) and prints a table. Two nets, trained on scikit-learn's
digits (`edgerep.zoo.load_digits_tensors`, seed 0, 25% held out):

- ``demo_net_folded``: `edgerep.zoo.demo_net` (RepVGG/ACNet/DBB/MobileOne blocks) at
  16x16, trained (at most ``--train-seconds``) and `edgerep.fold.fold`-ed (as in
  ``quant_bench.py``). Variants: ``plain``, ``cle`` (`equalize`), ``cle+absorb``
  (`equalize(absorb_bias=True, calib=...)`).
- ``tiny_vit``: a transformer classifier built here: the 8x8 digit cut into 16
  patches of 2x2 (tokens), Linear embedding + learned positions, two pre-LN blocks
  (2 heads, width 32, MLP 64), final LayerNorm, per-token Linear head averaged
  over tokens. Variants: ``plain``, ``smooth_a0.5`` (`smooth_quant(alpha=0.5)`),
  ``smooth_a0.5+shift`` (Outlier Suppression+), ``repq`` (`reparam_scales`).

Each variant is exported to ONNX (TorchScript exporter) and quantized with
`edgerep.quantize.quantize_onnx`: onnxruntime static int8 QDQ, U8S8, MinMax on 256
training samples, per-tensor (``pt``) and per-channel (``pc``) weights. Measured on
the 450 held-out digits: SQNR (dB) of the int8 logits against the float32 logits of
the *untransformed* model, and top-1. Every transform is verified exact in float64
by the stage itself (its report's ``max_rel_error`` is recorded). One run, one
seed: differences of a few tenths of a dB or one or two test images are noise.
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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _args import positive_float
from torch import nn

from edgerep.fold import fold
from edgerep.quantize import (
    OrtQuantConfig,
    equalize,
    quantize_onnx,
    reparam_scales,
    smooth_quant,
    sqnr_db,
)
from edgerep.zoo import demo_net, load_digits_tensors, train_classifier

HERE = Path(__file__).resolve().parent
CONFIGS = {
    "int8-U8S8-pt": OrtQuantConfig(types="U8S8", per_channel=False),
    "int8-U8S8-pc": OrtQuantConfig(types="U8S8", per_channel=True),
}


class TinyViT(nn.Module):
    """Patches-as-tokens transformer for 1x8x8 images (2x2 patches → 16 tokens)."""

    def __init__(self, d: int = 32, heads: int = 2, depth: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(4, d)
        self.pos = nn.Parameter(torch.zeros(1, 16, d))
        self.blocks = nn.ModuleList(_Block(d, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        tokens = x.reshape(n, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(n, 16, 4)
        h = self.embed(tokens) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h)).mean(dim=1)


class _Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.proj = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (
            m(h).reshape(n, t, self.heads, d // self.heads).transpose(1, 2)
            for m in (self.q, self.k, self.v)
        )
        att = torch.softmax(q @ k.transpose(-1, -2) * (d // self.heads) ** -0.5, dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(n, t, d))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))


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


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"x": x})[0])


def _measure(
    net: str,
    variants: dict[str, tuple[nn.Module, dict[str, Any]]],
    size: int,
    data: tuple[torch.Tensor, ...],
    work: Path,
) -> list[dict[str, Any]]:
    x_tr, _, x_te, y_te = data
    calib = [{"x": x_tr[i : i + 32].numpy()} for i in range(0, 256, 32)]
    x_eval, labels = x_te.numpy(), y_te.numpy()
    reference = None
    rows = []
    for name, (model, info) in variants.items():
        fp32 = _export(model, size, work / f"{net}-{name}.onnx")
        logits = _run(fp32, x_eval)
        if reference is None:
            reference = logits
        row: dict[str, Any] = {
            "net": net,
            "variant": name,
            "fp32_top1": round(float((logits.argmax(1) == labels).mean()), 4),
            "fp32_sqnr_db_vs_plain": round(sqnr_db(reference, logits), 2),
            **info,
        }
        for cname, config in CONFIGS.items():
            art = quantize_onnx(fp32, work / f"{net}-{name}-{cname}.onnx", config, calib=calib)
            q = _run(art.path, x_eval)
            row[cname] = {
                "sqnr_db": round(sqnr_db(reference, q), 2),
                "top1": round(float((q.argmax(1) == labels).mean()), 4),
            }
        print(
            f"{net:16s} {name:18s} fp32 top1 {row['fp32_top1']:.4f}  "
            + "  ".join(
                f"{c}: {row[c]['sqnr_db']:6.2f} dB top1 {row[c]['top1']:.4f}" for c in CONFIGS
            )
        )
        rows.append(row)
    return rows


def _stage(fn: Callable[[], tuple[nn.Module, Any]]) -> tuple[nn.Module, dict[str, Any]]:
    start = time.perf_counter()
    model, report = fn()
    info: dict[str, Any] = {
        "transform_seconds": round(time.perf_counter() - start, 3),
        "max_rel_error_float64": report.max_rel_error,
        "refused": report.refused,
        "declined": [list(d) for d in report.declined],
    }
    if hasattr(report, "pairs"):
        info["pairs"] = len(report.pairs)
        info["absorbed"] = [
            {
                "first": a.first,
                "second": a.second,
                "channels": a.channels,
                "max_shift": max(a.shift),
            }
            for a in report.absorbed
        ]
    else:
        info["groups"] = [
            {
                "producer": g.producer,
                "consumers": list(g.consumers),
                "spread_before": round(g.spread_before, 2),
                "spread_after": round(g.spread_after, 2),
                "act_absmax_before": round(g.act_absmax_before, 3),
                "act_absmax_after": round(g.act_absmax_after, 3),
                "weight_absmax_before": round(g.weight_absmax_before, 3),
                "weight_absmax_after": round(g.weight_absmax_after, 3),
            }
            for g in report.groups
        ]
    return model, info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "transform_bench.json")
    parser.add_argument("--train-seconds", type=positive_float, default=35.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # onnxruntime warns on the root logger
    torch.set_num_threads(1)
    start, load_before = time.perf_counter(), os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)

        d16 = load_digits_tensors(16, seed=0)
        torch.manual_seed(0)
        net = train_classifier(
            demo_net(),
            d16[0],
            d16[1],
            epochs=8,
            lr=3e-3,
            batch_size=64,
            seed=0,
            max_seconds=args.train_seconds,
        )
        folded, _ = fold(net, (torch.zeros(1, 1, 16, 16),))
        calib16 = d16[0][:256]
        results += _measure(
            "demo_net_folded",
            {
                "plain": (folded, {}),
                "cle": _stage(lambda: equalize(folded)),
                "cle+absorb": _stage(lambda: equalize(folded, absorb_bias=True, calib=calib16)),
            },
            16,
            d16,
            work,
        )

        d8 = load_digits_tensors(8, seed=0)
        torch.manual_seed(0)
        vit = train_classifier(
            TinyViT(),
            d8[0],
            d8[1],
            epochs=30,
            lr=3e-3,
            batch_size=64,
            seed=0,
            max_seconds=args.train_seconds,
        )
        calib8 = d8[0][:256]
        results += _measure(
            "tiny_vit",
            {
                "plain": (vit, {}),
                "smooth_a0.5": _stage(lambda: smooth_quant(vit, calib8, alpha=0.5)),
                "smooth_a0.5+shift": _stage(
                    lambda: smooth_quant(vit, calib8, alpha=0.5, shift=True)
                ),
                "repq": _stage(lambda: reparam_scales(vit, calib8)),
            },
            8,
            d8,
            work,
        )

    out = {
        "bench": "transform_bench",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/transform_bench.py " + " ".join(argv or sys.argv[1:]),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnxruntime": __import__("onnxruntime").__version__,
            "onnx": __import__("onnx").__version__,
            "numpy": np.__version__,
        },
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "quantization": {k: v.to_dict() for k, v in CONFIGS.items()},
        "metric": "SQNR of int8 logits vs the untransformed float32 model's logits on the "
        "450 held-out digits; top-1 on the same",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(out, indent=2) + "\n")
    tmp_out.replace(args.out)
    print(f"wrote {args.out} in {out['wall_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
