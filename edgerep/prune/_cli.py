"""``edgerep prune``: the argument wiring of the prune verb (the CLI spine only registers it).

    edgerep prune SRC --target latency=0.5 --calib DATA -o OUT [--backend onnxruntime]
                  [--method channels,depth,rank] [--depth-blocks N] [--depth-error E]
                  [--rank-error E]
                  [--importance l2|l1|taylor] [--recovery ls|mean|none] [--keep NAME ...]
                  [--plan prune_plan.json] [--latency-input SPEC ...] [--to onnx,...]
                  [--no-fold] [--weights W] [--input SPEC ...] [--force] [--json]

SRC, ``--input``, ``--weights`` and the calibration formats are those of the other
commands. The model is folded (unless ``--no-fold``), pruned, exported and verified
through `edgerep.pipeline.convert` (no second fold); OUT is that bundle plus
``pruned_state_dict.pt`` (plain tensors), ``prune_plan.json`` and
``prune_report.json`` (with depth pruning, the exported graph is folded again so
that adjacent maps merge). ``--plan`` re-applies a saved plan instead of searching
(with the same ``--calib`` when the plan has a recovery).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["add_prune_parser", "run_prune"]


def add_prune_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register ``prune`` on the CLI's subparsers."""
    p = sub.add_parser(
        "prune",
        parents=parents,
        help="fold, then prune whole channels to a measured latency (or MACs/params) target",
        description="Fold the model, prune channel groups (Torch-Pruning's dependency graph) to "
        "--target, re-solve the consuming layers on --calib (no training), export and verify; "
        "latency targets are met by measurement on --backend.",
    )
    p.add_argument(
        "--target",
        metavar="T",
        help="latency=R, macs=R, params=R (fraction that remains, 0<R<1) or "
        "widths=GROUP:W,...; required unless --plan",
    )
    p.add_argument("--plan", metavar="JSON", help="re-apply a prune_plan.json instead of searching")
    p.add_argument(
        "--method",
        default="channels",
        metavar="M,M",
        help="what to remove: channels (default), depth (residual blocks -> fitted linear maps, "
        "needs --calib), rank (SVD of Linear/1x1 conv), comma-separated",
    )
    p.add_argument(
        "--depth-blocks", type=int, metavar="N", help="replace at most N residual blocks"
    )
    p.add_argument(
        "--depth-error",
        type=float,
        default=0.1,
        metavar="E",
        help="largest relative output error of a replaced block (0.1)",
    )
    p.add_argument(
        "--rank-error",
        type=float,
        default=0.05,
        metavar="E",
        help="largest relative output error of a factorized layer (0.05)",
    )
    p.add_argument(
        "--backend", default="onnxruntime", help="where latency is measured: onnxruntime, openvino"
    )
    p.add_argument("--importance", default="l2", help="l2 (default), l1 or taylor (needs labels)")
    p.add_argument(
        "--recovery", help="ls (default with --calib), mean or none (default without --calib)"
    )
    p.add_argument(
        "--keep", action="append", default=[], metavar="NAME", help="module never pruned (repeat)"
    )
    p.add_argument(
        "--latency-input",
        action="append",
        default=[],
        metavar="SPEC",
        help="input shape latency is measured at (default: --input), e.g. x:1x3x224x224",
    )
    p.add_argument("--threads", type=int, default=1, help="runtime threads for timing (1)")
    p.add_argument(
        "--min-ratio", type=float, default=0.125, help="narrowest width as a fraction (0.125)"
    )
    p.add_argument("--to", action="append", default=[], metavar="FORMAT", help="formats (onnx)")
    p.add_argument("--no-fold", action="store_true", help="prune the model as it is")
    p.add_argument("--calib", metavar="DATA", help=".npz (x[, y]), image folder or file.py:fn")
    p.add_argument("--calib-samples", type=int, default=256, metavar="N")
    p.add_argument("--calib-seed", type=int, default=0, metavar="N")
    p.add_argument("--x-key", default="x", metavar="K")
    p.add_argument("--y-key", default="y", metavar="K")
    p.add_argument("--image-size", type=int, metavar="PX")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--mean", type=float, nargs="+", default=[0.0])
    p.add_argument("--std", type=float, nargs="+", default=[1.0])
    p.add_argument(
        "--cache-dir", metavar="DIR", help="latency table cache (~/.cache/edgerep/prune)"
    )
    p.set_defaults(handler=run_prune)


def _calibration(args: argparse.Namespace, names: list[str]) -> tuple[Any, Any, Any]:
    """(calib tensors batched, eval tensors, labels) or Nones without --calib."""
    if not args.calib:
        return None, None, None
    import numpy as np
    import torch

    from edgerep.quantize import load_calibration

    data = load_calibration(
        args.calib,
        input_names=names,
        samples=args.calib_samples,
        seed=args.calib_seed,
        x_key=args.x_key,
        y_key=args.y_key,
        image_size=args.image_size,
        channels=args.channels,
        mean=args.mean if len(args.mean) > 1 else args.mean[0],
        std=args.std if len(args.std) > 1 else args.std[0],
    )
    calib = [torch.from_numpy(np.concatenate([f[n] for f in data.calib])) for n in names]
    evals = [torch.from_numpy(np.asarray(data.eval_feeds[n])) for n in names]
    labels = torch.from_numpy(np.asarray(data.labels)) if data.labels is not None else None
    return calib, evals, labels


def run_prune(args: argparse.Namespace) -> int:
    from edgerep.cli import EXIT_OK, _formats_and_options, _load, _parse_specs
    from edgerep.errors import ConfigError
    from edgerep.prune import PrunePlan, apply_plan, parse_target, prune, save_pruned
    from edgerep.prune._engine import parse_methods
    from edgerep.prune._latency import get_backend
    from edgerep.spec import example_inputs

    problems = []
    target = None
    methods: tuple[str, ...] = ("channels",)
    try:
        methods = parse_methods(args.method)
    except ConfigError as e:
        problems.append(str(e))
    if args.plan is None and not args.target and "channels" in methods:
        problems.append("give --target (e.g. latency=0.5) or --plan prune_plan.json")
    if args.target and "channels" not in methods:
        problems.append(
            f"--target sets how many channels go but --method {args.method} prunes no "
            "channels; add channels to --method or drop --target"
        )
    if args.target:
        try:
            target = parse_target(args.target)
        except ConfigError as e:
            problems.append(str(e))
    try:
        get_backend(args.backend)
    except ConfigError as e:
        problems.append(str(e))
    needs_calib = (args.recovery in ("ls", "mean")) or args.importance == "taylor"
    if needs_calib and not args.calib:
        problems.append(
            f"--recovery {args.recovery} / --importance {args.importance} need --calib DATA "
            "(an .npz, image folder or file.py:fn of representative inputs)"
        )
    if "depth" in methods and not args.calib and args.plan is None:
        problems.append(
            "--method depth fits each replaced block on calibration data: give --calib DATA "
            "(an .npz, image folder or file.py:fn of representative inputs)"
        )
    if problems:
        raise ConfigError("; ".join(problems))
    args.option = getattr(args, "option", [])
    formats, options = _formats_and_options(args)
    model, specs, description = _load(args)
    inputs = example_inputs(specs, seed=args.seed)
    lat_specs = _parse_specs(args.latency_input) if args.latency_input else None
    lat_inputs = example_inputs(lat_specs, seed=args.seed) if lat_specs else None
    if not args.no_fold:
        from edgerep.fold import fold

        model, _ = fold(model, inputs)
    calib, evals, labels = _calibration(args, [s.name for s in specs])
    if args.plan:
        plan = PrunePlan.load(args.plan)
        pruned = apply_plan(model, inputs, plan, calib=calib)
        report_dict: dict[str, Any] = {"plan": str(Path(args.plan).resolve()), "reapplied": True}
        text = (
            f"re-applied {args.plan} ({len(plan.kept)} groups, {len(plan.depth)} blocks, "
            f"{len(plan.ranks)} factorized layers)"
        )
    else:
        pruned, report = prune(
            model,
            inputs,
            target=target,
            method=methods,
            depth_blocks=args.depth_blocks,
            depth_error=args.depth_error,
            rank_error=args.rank_error,
            importance=args.importance,
            calib=evals if args.importance == "taylor" else calib,
            labels=labels if args.importance == "taylor" else None,
            backend=args.backend,
            keep=args.keep,
            recovery=args.recovery,
            latency_inputs=lat_inputs,
            threads=args.threads,
            min_ratio=args.min_ratio,
            cache_dir=args.cache_dir,
        )
        assert report.plan is not None  # prune() always records its plan
        plan = report.plan
        report_dict, text = report.to_dict(), report.to_text()
    from edgerep.pipeline import convert

    _, result = convert(
        pruned,
        specs,
        to=formats,
        out_dir=args.out,
        overwrite=args.force,
        # replaced blocks leave affine 1x1 maps that the fold merges where adjacent
        fold=bool(plan.depth),
        seed=args.seed,
        source=description,
        exporter_options=options,
    )
    out = Path(result.bundle)
    save_pruned(pruned, plan, out)
    (out / "prune_report.json").write_text(json.dumps(report_dict, indent=2, default=str) + "\n")
    if args.json:
        print(json.dumps({"prune": report_dict, "bundle": str(out)}, indent=2, default=str))
    else:
        print(text)
        print()
        print("formats:")
        print(result.status_table())
        print()
        print(f"bundle: {out}")
    return EXIT_OK
