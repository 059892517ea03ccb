"""Pruning benchmark: RepVGG-A0 on digits, folded, pruned to a measured latency.

Run from the repository root (a few minutes on 2 idle cores; timings belong under
the exclusive lock, see bench/README.md)::

    OMP_NUM_THREADS=1 flock -x -w 900 /tmp/edgerep-cpu.lock .venv/bin/python bench/prune_bench.py

It writes ``bench/results/prune_bench.json`` (``--out`` to change) and prints a
summary. Steps:

1. `edgerep.zoo.repvgg_a0` (10 classes) trained ``--a0-epochs`` on the 32x32
   digits (grey repeated to 3 channels), as in ``quant_bench.py``; folded;
2. ``edgerep.prune(target="latency=0.5", backend="onnxruntime")``, latency measured at
   the deployment size 1x3x224x224 (onnxruntime CPU, 1 thread, batch 1), importance
   l2, recovery by least squares on 256 training digits (no fine-tuning); the same
   plan without recovery for comparison; the latency table build time (cold cache);
3. Torch-Pruning's own magnitude pruning (``MetaPruner`` + ``MagnitudeImportance(p=2)``,
   uniform ratio, first conv and classifier ignored, no fine-tuning) with its ratio
   bisected to the same MACs as edgerep's result;
4. edgerep's pruned model then onnxruntime static int8 (U8S8 per-channel, 128
   training digits; exported with dynamic height/width so that one file is scored at
   32x32 and timed at 224x224);
5. unpruned, edgerep, Torch-Pruning and edgerep + int8 timed interleaved in one
   process (4 rounds of >= 1 s, alternating order, p50 = median of rounds); top-1 on
   the 450 held-out digits at 32x32;
6. the same target searched on OpenVINO (``backend="openvino"``, CPU, f32 inference
   precision hint, 1 thread), then unpruned and that pruned model timed interleaved on
   OpenVINO; the precision the sessions report running is recorded;
7. the fine-tune target: edgerep's onnxruntime result fine-tuned through the
   ``--finetune`` hook (`edgerep.prune._finetune.run_finetune`) by `finetune_kd` below:
   Adam, knowledge distillation from the unpruned model plus the labels, on the digits
   training split, ``--finetune-epochs`` (8) epochs, stopped at 60 s of wall time; the
   unpruned model given the same recipe for comparison (it is trained only 6 epochs, so
   more training alone lifts it).

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
from typing import Any

import numpy as np
import torch
from _args import positive_float
from torch import nn

from edgerep.bench.latency import LatencyConfig, benchmark_latency
from edgerep.fold import fold
from edgerep.prune import prune
from edgerep.prune._engine import _export_onnx
from edgerep.prune._finetune import FinetuneData, run_finetune
from edgerep.prune._latency import get_backend, layer_shapes
from edgerep.zoo import accuracy, load_digits_tensors, repvgg_a0, train_classifier

HERE = Path(__file__).resolve().parent


def _macs(model: nn.Module, x: torch.Tensor) -> int:
    return int(sum(s.macs() for s in layer_shapes(model, [x]).values()))


def _tp_prune(model: nn.Module, x: torch.Tensor, macs_goal: int) -> tuple[nn.Module, float]:
    """Torch-Pruning magnitude pruning with the uniform ratio that reaches `macs_goal`."""
    import torch_pruning as tp

    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]

    def run(ratio: float) -> nn.Module:
        work = copy.deepcopy(model)
        names = {id(m): n for n, m in model.named_modules()}
        mods = dict(work.named_modules())
        pruner = tp.pruner.MetaPruner(
            work,
            x,
            importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=ratio,
            ignored_layers=[mods[names[id(first)]], mods[names[id(head)]]],
        )
        pruner.step()
        return work.eval()

    lo, hi = 0.0, 0.95
    best = run(0.5)
    for _ in range(12):
        mid = (lo + hi) / 2
        cand = run(mid)
        if _macs(cand, x) > macs_goal:
            lo = mid
        else:
            hi, best = mid, cand
    return best, hi


def _int8(model: nn.Module, calib: torch.Tensor, work: Path) -> Path:
    """`model` exported with dynamic height and width, then onnxruntime static int8
    (U8S8 per-channel, edgerep's default choice) calibrated on `calib` (one sample a feed)."""
    from edgerep.quantize import OrtQuantConfig, quantize_onnx

    src = work / f"{id(model)}_fp32.onnx"
    # a torch.fx GraphModule's .graph confuses the TorchScript exporter's dynamic-axes check
    wrapped = nn.Sequential(copy.deepcopy(model).float().eval())
    with torch.no_grad():
        torch.onnx.export(
            wrapped,
            (calib[:1],),
            str(src),
            dynamo=False,
            input_names=["input_0"],
            opset_version=17,
            dynamic_axes={"input_0": {0: "n", 2: "h", 3: "w"}},
        )
    out = work / f"{id(model)}_int8.onnx"
    feeds = [{"input_0": calib[i : i + 1].numpy()} for i in range(len(calib))]
    quantize_onnx(
        src, out, OrtQuantConfig(mode="int8", types="U8S8", per_channel=True), calib=feeds
    )
    return out


def _ort_top1(path: Path, x: torch.Tensor, y: torch.Tensor) -> float:
    from edgerep.runtimes import get_runtime

    session = get_runtime("onnxruntime").load(path, options={"threads": 1})
    try:
        logits = np.concatenate(
            [session.run({"input_0": x[i : i + 64].numpy()})[0] for i in range(0, len(x), 64)]
        )
    finally:
        session.close()
    return float((logits.argmax(1) == y.numpy()).mean())


def _time_models(
    models: dict[str, nn.Module | Path],
    x: torch.Tensor,
    config: LatencyConfig,
    backend_name: str = "onnxruntime",
) -> dict[str, dict[str, Any]]:
    from edgerep.runtimes import get_runtime

    backend = get_backend(backend_name)
    runtime = get_runtime(backend.runtime)
    one = LatencyConfig(**{**config.to_dict(), "repeats": 1})
    out: dict[str, list[float]] = {n: [] for n in models}
    ran: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {
            n: runtime.load(
                m
                if isinstance(m, Path)
                else backend.prepare(_export_onnx(m, [x], Path(tmp) / f"{n}.onnx")),
                options=backend.options(1),
            )
            for n, m in models.items()
        }
        feeds = {"input_0": x.numpy()}
        order = list(models)
        for r in range(config.repeats):
            for n in order if r % 2 == 0 else order[::-1]:
                out[n].append(benchmark_latency(sessions[n].run, feeds, config=one).stats.p50_ms)
        for n, s in sessions.items():
            ran[n] = s.describe().get("inference_precision")
            s.close()
    return {
        n: {
            "p50_ms": float(np.median(v)),
            "spread": float((max(v) - min(v)) / np.median(v)),
            "inference_precision": ran[n],
        }
        for n, v in out.items()
    }


def finetune_kd(
    model: nn.Module, data: FinetuneData, *, epochs: int = 8, max_seconds: float = 60.0
) -> nn.Module:
    """A ``--finetune`` hook: Adam (lr 3e-4), batch 64, loss = 0.5 * cross-entropy on the
    labels + 0.5 * T^2 * KL(teacher || student) at temperature T = 4, `epochs` epochs over
    ``data.inputs``, stopped early if `max_seconds` of wall time pass (checked per batch;
    the epochs done are recorded on the model as ``_finetune_epochs``)."""
    x, y = data.inputs[0], data.labels
    assert y is not None, "finetune_kd needs labelled data"
    teacher = data.teacher.eval()
    with torch.no_grad():
        soft = torch.cat([teacher(x[i : i + 256]) for i in range(0, len(x), 256)])
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    t, start, gen = 4.0, time.perf_counter(), torch.Generator().manual_seed(0)
    model.train()
    done = 0.0
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = order[i : i + 64]
            logits = model(x[idx])
            kd = nn.functional.kl_div(
                nn.functional.log_softmax(logits / t, 1),
                nn.functional.softmax(soft[idx] / t, 1),
                reduction="batchmean",
            )
            loss = 0.5 * nn.functional.cross_entropy(logits, y[idx]) + 0.5 * t * t * kd
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += len(idx) / len(x)
            if time.perf_counter() - start >= max_seconds:
                break
        if time.perf_counter() - start >= max_seconds:
            break
    model._finetune_epochs = done  # type: ignore[assignment]
    return model.eval()


def _table_only(
    folded: nn.Module, x: torch.Tensor, big: torch.Tensor, out: Path, load_before: Any
) -> int:
    """Time the latency tables as `edgerep.prune` builds them for a latency target."""
    from edgerep.prune._groups import build_groups
    from edgerep.prune._latency import (
        LatencyTables,
        build_tables,
        get_backend,
        layer_shapes,
        measure_step,
    )

    _, groups = build_groups(folded, [x])
    prunable = [g for g in groups if g.prunable]
    shapes = layer_shapes(folded, [big])
    backend = get_backend("onnxruntime")
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as cache:
        for variant in ("measured_step_cold", "fixed_step8_cold", "measured_step_warm"):
            where = Path(cache) / ("fixed" if variant.startswith("fixed") else "measured")
            lat = LatencyTables(backend, cache_dir=where)
            t = time.perf_counter()
            if variant.startswith("fixed"):
                step, probe = 8, {}
            else:
                step, probe = measure_step(prunable, shapes, lat.ms, min_ratio=0.125)
            probe_s = time.perf_counter() - t
            tables = build_tables(prunable, shapes, lat.ms, min_ratio=0.125, step=step)
            rows[variant] = {
                "seconds": round(time.perf_counter() - t, 2),
                "probe_seconds": round(probe_s, 2),
                "layers_measured": lat.measured,
                "layers_from_cache": lat.from_cache,
                "step": step,
                "probe": probe,
                "widths": {g: sorted(t_) for g, t_ in tables.items()},
            }
            print(f"{variant}: {rows[variant]['seconds']} s, step {step}, {lat.measured} layers")
    result = {
        "bench": "prune_bench.py --table-only",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "model": "RepVGG-A0 (10 classes), folded; latency input "
        + "x".join(str(d) for d in big.shape),
        "backend": "onnxruntime CPU, 1 thread",
        "groups": len(prunable),
        "loadavg_before": list(load_before),
        "loadavg_after": list(os.getloadavg()),
        "target": "latency tables of the A0-sized net built in under 2 minutes (cold cache)",
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "prune_bench.json")
    parser.add_argument("--a0-epochs", type=int, default=4)
    parser.add_argument("--target", default="latency=0.5")
    parser.add_argument("--size", type=int, default=224, help="latency input size")
    parser.add_argument(
        "--weights",
        type=Path,
        help="cache of the trained A0 state_dict: loaded if it exists, else written after "
        "training (train under the shared lock, time under the exclusive one)",
    )
    parser.add_argument("--train-only", action="store_true", help="train (and cache), then stop")
    parser.add_argument("--finetune-epochs", type=int, default=8)
    parser.add_argument("--finetune-max-seconds", type=positive_float, default=60.0)
    parser.add_argument("--no-openvino", action="store_true", help="skip the OpenVINO target")
    parser.add_argument(
        "--table-only",
        action="store_true",
        help="only time the latency table build of the folded A0 (cold cache, then warm): "
        "the channel-step probe plus the tables at the measured step, next to the fixed "
        "step-8 grid; writes --out (default results/prune_table_bench.json)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    x_tr, y_tr, x_te, y_te = load_digits_tensors(32, seed=0)
    x3_tr, x3_te = x_tr.repeat(1, 3, 1, 1), x_te.repeat(1, 3, 1, 1)
    torch.manual_seed(0)
    a0 = repvgg_a0(num_classes=10)
    if args.weights is not None and args.weights.is_file():
        a0.load_state_dict(torch.load(args.weights, weights_only=True))
        a0.eval()
    else:
        for epoch in range(args.a0_epochs):
            train_classifier(a0, x3_tr, y_tr, epochs=1, lr=5e-4, batch_size=64, seed=epoch)
        if args.weights is not None:
            torch.save(a0.state_dict(), args.weights)
    train_s = time.perf_counter() - t0
    if args.train_only:
        print(f"trained in {train_s:.0f} s; top-1 {accuracy(a0, x3_te, y_te):.4f}")
        return 0
    folded, _ = fold(a0, (x3_te[:1],))
    big = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    if args.table_only:
        out = args.out
        if out == HERE / "results" / "prune_bench.json":
            out = HERE / "results" / "prune_table_bench.json"
        return _table_only(folded, x3_te[:1], big, out, load_before)
    top1 = {"unpruned": accuracy(folded, x3_te, y_te)}
    calib, labels = x3_tr[:256], y_tr[:256]
    with tempfile.TemporaryDirectory() as cache:
        t1 = time.perf_counter()
        pruned, report = prune(
            folded,
            (x3_te[:1],),
            target=args.target,
            calib=calib,
            labels=labels,
            latency_inputs=(big,),
            cache_dir=cache,
        )
        prune_s = time.perf_counter() - t1
    no_rec, _ = prune(
        folded,
        (x3_te[:1],),
        target="widths="
        + ",".join(f"{g.name}:{g.width}" for g in report.groups if g.width != g.size),
        recovery="none",
    )
    top1["edgerep_ls"] = accuracy(pruned, x3_te, y_te)
    top1["edgerep_no_recovery"] = accuracy(no_rec, x3_te, y_te)
    macs = {"unpruned": _macs(folded, big), "edgerep": _macs(pruned, big)}
    tp_model, tp_ratio = _tp_prune(folded, x3_te[:1], _macs(pruned, x3_te[:1]))
    macs["torch_pruning"] = _macs(tp_model, big)
    top1["torch_pruning"] = accuracy(tp_model, x3_te, y_te)
    work = Path(tempfile.mkdtemp())
    int8_path = _int8(pruned, x3_tr[:128], work)
    top1["edgerep_int8"] = _ort_top1(int8_path, x3_te, y_te)
    timing = _time_models(
        {
            "unpruned": folded,
            "edgerep": pruned,
            "torch_pruning": tp_model,
            "edgerep_int8": int8_path,
        },
        big,
        LatencyConfig(min_seconds=1.0, repeats=4),
    )
    base = timing["unpruned"]["p50_ms"]

    # the fine-tune target, through the --finetune hook's own code path
    label = f"bench/prune_bench.py:finetune_kd ({args.finetune_epochs} epochs)"

    def hook(m: nn.Module, d: FinetuneData) -> nn.Module:
        return finetune_kd(m, d, epochs=args.finetune_epochs, max_seconds=args.finetune_max_seconds)

    ft_data = FinetuneData((x3_tr,), y_tr, copy.deepcopy(folded).eval(), ("x",))
    tuned, ft_record = run_finetune(hook, label, pruned, ft_data)
    top1["edgerep_ls_finetuned"] = accuracy(tuned, x3_te, y_te)
    # the same recipe on the unpruned model (self-distillation + labels): the A0 here is
    # trained only 6 epochs, so extra training alone lifts it; this row says how much
    ref_tuned, ref_record = run_finetune(hook, label, folded, ft_data)
    top1["unpruned_finetuned_same_recipe"] = accuracy(ref_tuned, x3_te, y_te)

    ov: dict[str, Any] = {}
    if not args.no_openvino:
        with tempfile.TemporaryDirectory() as cache:
            t2 = time.perf_counter()
            ov_pruned, ov_report = prune(
                folded,
                (x3_te[:1],),
                target=args.target,
                backend="openvino",
                calib=calib,
                latency_inputs=(big,),
                cache_dir=cache,
            )
            ov_seconds = time.perf_counter() - t2
        top1["edgerep_openvino_ls"] = accuracy(ov_pruned, x3_te, y_te)
        ov_timing = _time_models(
            {"unpruned": folded, "edgerep_openvino": ov_pruned},
            big,
            LatencyConfig(min_seconds=1.0, repeats=4),
            backend_name="openvino",
        )
        ov = {
            "runtime": f"OpenVINO {__import__('openvino').__version__} CPU, 1 thread, "
            "inference_precision_hint f32, performance_hint LATENCY, batch 1, input "
            f"1x3x{args.size}x{args.size}",
            "precision_ran": sorted({str(v["inference_precision"]) for v in ov_timing.values()}),
            "timing": ov_timing,
            "measured_ratio_in_search": ov_report.achieved,
            "measured_ratio_final": ov_timing["edgerep_openvino"]["p50_ms"]
            / ov_timing["unpruned"]["p50_ms"],
            "top1_drop_points": 100 * (top1["unpruned"] - top1["edgerep_openvino_ls"]),
            "macs_ratio": _macs(ov_pruned, big) / macs["unpruned"],
            "latency_table_seconds_cold": ov_report.table.get("seconds"),
            "prune_seconds_total": ov_seconds,
            "report": ov_report.to_dict(),
        }

    summary = {
        "asked": report.asked,
        "measured_ratio_in_search": report.achieved,
        "measured_ratio_final": timing["edgerep"]["p50_ms"] / base,
        "torch_pruning_ratio_final": timing["torch_pruning"]["p50_ms"] / base,
        "edgerep_int8_speedup_vs_unpruned_fp32": base / timing["edgerep_int8"]["p50_ms"],
        "top1_drop_points_edgerep_int8": 100 * (top1["unpruned"] - top1["edgerep_int8"]),
        "top1": top1,
        "top1_drop_points_edgerep": 100 * (top1["unpruned"] - top1["edgerep_ls"]),
        "top1_drop_points_torch_pruning": 100 * (top1["unpruned"] - top1["torch_pruning"]),
        "macs_ratio_edgerep": macs["edgerep"] / macs["unpruned"],
        "macs_ratio_torch_pruning": macs["torch_pruning"] / macs["unpruned"],
        "latency_table_seconds_cold": report.table.get("seconds"),
        "prune_seconds_total": prune_s,
        "finetune": {
            **ft_record.to_dict(),
            "epochs_done": getattr(tuned, "_finetune_epochs", None),
            "top1_before": top1["edgerep_ls"],
            "top1_after": top1["edgerep_ls_finetuned"],
            "top1_drop_points_after": 100 * (top1["unpruned"] - top1["edgerep_ls_finetuned"]),
            "unpruned_same_recipe_seconds": ref_record.seconds,
            "unpruned_same_recipe_top1": top1["unpruned_finetuned_same_recipe"],
            "top1_drop_points_vs_unpruned_same_recipe": 100
            * (top1["unpruned_finetuned_same_recipe"] - top1["edgerep_ls_finetuned"]),
        },
        "openvino_measured_ratio_final": ov.get("measured_ratio_final"),
        "openvino_precision_ran": ov.get("precision_ran"),
        "openvino_top1_drop_points": ov.get("top1_drop_points"),
    }
    out = {
        "bench": "prune_bench",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "versions": {
            n: __import__(n).__version__
            for n in ("torch", "onnxruntime", "openvino", "torch_pruning")
        },
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "runtime": f"onnxruntime CPU, 1 thread, batch 1, input 1x3x{args.size}x{args.size}",
        "train": {"a0_epochs": args.a0_epochs, "seconds": train_s},
        "summary": summary,
        "timing": timing,
        "macs": macs,
        "torch_pruning_uniform_ratio": tp_ratio,
        "report": report.to_dict(),
        "openvino": ov,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(out, indent=2, default=str) + "\n")
    tmp_out.replace(args.out)
    print(report.to_text())
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
