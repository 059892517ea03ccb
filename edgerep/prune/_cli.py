"""``edgerep prune``: the argument wiring of the prune verb (the CLI spine only registers it).

    edgerep prune SRC --target latency=0.5 --calib DATA -o OUT [--backend onnxruntime]
                  [--method channels,depth,rank] [--depth-blocks N] [--depth-error E]
                  [--rank-error E]
                  [--importance l2|l1|taylor|reconstruction|bn] [--recovery ls|mean|none]
                  [--keep NAME ...]
                  [--plan prune_plan.json] [--latency-input SPEC ...] [--to onnx,...]
                  [--no-fold] [--weights W] [--input SPEC ...] [--force] [--json]

SRC, ``--input``, ``--weights`` and the calibration formats are those of the other
commands. The model is folded (unless ``--no-fold``), pruned, exported and verified
through `edgerep.pipeline.convert` (no second fold); OUT is that bundle plus
``pruned_state_dict.pt`` (plain tensors), ``prune_plan.json`` and
``prune_report.json`` (with depth pruning, the exported graph is folded again so
that adjacent maps merge). ``--plan`` re-applies a saved plan instead of searching
(with the same ``--calib`` when the plan has a recovery); it refuses every search
option (``--target``, ``--importance``, ``--backend``, ...), which it would not read.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["add_prune_parser", "run_prune"]


def add_prune_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register ``prune`` on the CLI's subparsers."""
    from edgerep.cli import _add_calib_args  # the calibration options of every verb

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
        metavar="E",
        help="largest relative output error of a replaced block (default 0.1; --method depth)",
    )
    p.add_argument(
        "--rank-error",
        type=float,
        metavar="E",
        help="largest relative output error of a factorized layer (default 0.05; --method rank)",
    )
    # search options default to None so that one given with --plan (which reads none of
    # them) is seen and refused; the effective defaults are applied in `_options`
    p.add_argument(
        "--backend",
        help="where latency is measured: onnxruntime (default), openvino, executorch",
    )
    p.add_argument(
        "--importance",
        help="l2 (default), l1, taylor (needs labels in --calib), reconstruction (needs --calib: "
        "each channel's share of its consumers' output energy), bn (BatchNorm |gamma|, read "
        "before folding; groups without a BN fall back to l2, named in the report)",
    )
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
    p.add_argument("--threads", type=int, help="runtime threads for timing (1)")
    p.add_argument("--min-ratio", type=float, help="narrowest width as a fraction (0.125)")
    p.add_argument("--to", action="append", default=[], metavar="FORMAT", help="formats (onnx)")
    p.add_argument("--no-fold", action="store_true", help="prune the model as it is")
    _add_calib_args(p)
    p.add_argument(
        "--cache-dir", metavar="DIR", help="latency table cache (~/.cache/edgerep/prune)"
    )
    p.add_argument("--seconds", type=float, metavar="S", help="with --sweep: timed seconds per row")
    p.add_argument("--repeats", type=int, metavar="N", help="with --sweep: latency runs per row")
    _add_finetune_sweep_args(p)
    p.set_defaults(handler=run_prune)
    p.epilog = (
        "SRC may also be a .pt2 program or an edgerep bundle holding one (edgerep fold's "
        "model.pt2). Every result is timed on --backend (onnxruntime, openvino, executorch); "
        "one measured slower than the unpruned model is refused (exit 6). Exit code 7: the "
        "target (with --sweep: any target) was missed; the bundle of the closest model "
        "(every bundle) is still written."
    )


def _add_finetune_sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--finetune",
        metavar="FILE.py:FN",
        help="optional: fn(model, data) -> model, run after pruning and recovery (data: the "
        "calibration inputs, the unpruned model as teacher; see edgerep.prune._finetune); "
        "needs --calib (top-1 before/after is measured on its evaluation part)",
    )
    p.add_argument(
        "--finetune-data",
        metavar="DATA",
        help="what --finetune trains on (.npz x[, y], image folder or file.py:fn; one-input "
        "models); default: the calibration inputs without labels",
    )
    p.add_argument(
        "--sweep",
        metavar="R,R,...",
        help="one pruned bundle per ratio of the target's kind (e.g. 0.3,0.5,0.7), plus the "
        "unpruned one, benchmarked together: OUT/bench/bench.{json,md,html} with the "
        "accuracy-vs-latency Pareto plot",
    )


def add_convert_prune_args(p: argparse.ArgumentParser) -> None:
    """The pruning options of ``edgerep convert`` (stage order merge, fold, prune, quantize)."""
    p.add_argument(
        "--prune",
        metavar="TARGET",
        help="prune after folding: latency=R, macs=R, params=R (fraction that remains) or "
        "widths=GROUP:W,...; see `edgerep prune`",
    )
    p.add_argument(
        "--prune-backend",
        metavar="NAME",
        help="where a latency target is measured: onnxruntime (default when --to has onnx) "
        "or openvino (default for an openvino-only --to)",
    )
    p.add_argument(
        "--prune-importance",
        metavar="I",
        help="l2 (default), l1, taylor or reconstruction (both need --calib), bn; see "
        "`edgerep prune`",
    )
    p.add_argument(
        "--prune-method",
        metavar="M,M",
        help="channels (default), depth (needs --calib), rank; comma-separated; see `edgerep prune`",
    )
    p.add_argument("--prune-depth-blocks", type=int, metavar="N", help="see --depth-blocks")
    p.add_argument("--prune-depth-error", type=float, metavar="E", help="see --depth-error")
    p.add_argument("--prune-rank-error", type=float, metavar="E", help="see --rank-error")
    p.add_argument("--prune-recovery", metavar="R", help="ls (default with --calib), mean, none")
    p.add_argument(
        "--prune-keep", action="append", default=[], metavar="NAME", help="never pruned (repeat)"
    )
    p.add_argument(
        "--prune-latency-input",
        action="append",
        default=[],
        metavar="SPEC",
        help="input shape latency is measured at (default: --input), e.g. x:1x3x224x224",
    )
    p.add_argument("--prune-cache-dir", metavar="DIR", help="latency table cache")
    _add_finetune_sweep_args(p)


#: convert's pruning options besides --prune (and --prune-method), which need pruning on
_PRUNE_ONLY = ("finetune", "finetune_data", "sweep")

#: the options that only one method reads (prune's dests; convert's add ``prune_``)
_METHOD_ONLY = {
    "channels": ("importance", "min_ratio", "recovery"),
    "depth": ("depth_blocks", "depth_error"),
    "rank": ("rank_error",),
}

#: prune's options that `--plan` (a replay of the saved decisions) never reads
_SEARCH_ONLY = (
    "target",
    "method",
    "depth_blocks",
    "depth_error",
    "rank_error",
    "backend",
    "importance",
    "recovery",
    "keep",
    "latency_input",
    "threads",
    "min_ratio",
    "cache_dir",
    "seconds",
    "repeats",
    "finetune",
    "finetune_data",
    "sweep",
)


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _given(args: argparse.Namespace, dests: Any) -> list[str]:
    """The flags among `dests` that were given (argparse defaults are None or [])."""
    return [_flag(d) for d in dests if getattr(args, d, None) not in (None, [])]


def _methods(method: str | None) -> tuple[str, ...] | None:
    """The parsed method list (None when unreadable: the options check reports it)."""
    from edgerep.errors import ConfigError
    from edgerep.prune._engine import parse_methods

    try:
        return tuple(parse_methods(method or "channels"))
    except ConfigError:
        return None


def _method_problems(
    args: argparse.Namespace, prefix: str, method: str | None
) -> tuple[list[str], argparse.Namespace]:
    """Options of a method that the method list does not hold, and `args` without them
    (so that the options check does not also ask for what they would need, e.g. labels
    for ``--importance taylor``)."""
    methods = _methods(method)
    if methods is None:
        return [], args
    problems = []
    ignored: list[str] = []
    option = f"--{prefix.replace('_', '-')}method"
    for name, dests in _METHOD_ONLY.items():
        given = _given(args, [prefix + d for d in dests])
        if given and name not in methods:
            ignored += [prefix + d for d in dests]
            problems.append(
                f"{', '.join(given)} only bound{'s' if len(given) == 1 else ''} {name} pruning, "
                f"which {option} {','.join(methods)} does not run; add {name} to {option} "
                f"(e.g. {option} {','.join(methods)},{name}) or leave "
                f"{'it' if len(given) == 1 else 'them'} out"
            )
    return problems, argparse.Namespace(**{**vars(args), **dict.fromkeys(ignored)})


def _cache_problems(
    args: argparse.Namespace, prefix: str, target: str | None, method: str | None
) -> list[str]:
    """A latency-table cache given where no table is built.

    Tables are built (`edgerep.prune._engine.prune`) for a channel search to a latency
    target and for depth / rank pruning (both choose by per-layer latency); a macs /
    params / widths target counts or sets widths and never reads the cache.
    """
    from edgerep.errors import ConfigError
    from edgerep.prune._config import parse_target

    flag = _flag(prefix + "cache_dir")
    methods = _methods(method)
    if not _given(args, [prefix + "cache_dir"]) or methods is None:
        return []
    if {"depth", "rank"} & set(methods) or "channels" not in methods or not target:
        return []  # tables are built, or the target's absence is reported elsewhere
    try:
        kind = parse_target(target).kind
    except ConfigError:
        return []  # the options check names the bad target
    if kind == "latency":
        return []
    option = "--prune" if prefix else "--target"
    return [
        f"{flag} caches the per-layer latency tables, which only a latency target or depth / "
        f"rank pruning builds; {option} {target} counts {kind} and builds none: leave "
        f"{flag} out"
    ]


def _converts_with_pruning(args: argparse.Namespace) -> bool:
    # --prune TARGET, or a method that needs no target (depth, rank)
    return args.prune is not None or (args.prune_method or "channels") != "channels"


def check_convert_prune(args: argparse.Namespace, formats: list[str]) -> None:
    """Usage errors of the convert pruning options, all at once, before the model loads.

    Raises:
        ConfigError: a pruning option without --prune, a bad target or backend, data
            missing where needed.
    """
    from edgerep.errors import ConfigError

    if not _converts_with_pruning(args):
        dests = [d for d in vars(args) if d.startswith("prune_")] + list(_PRUNE_ONLY)
        given = _given(args, dests)
        if given:
            raise ConfigError(
                f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to pruning, "
                "which this convert does not do; add --prune TARGET (or --prune-method depth / "
                "rank) or leave "
                f"{'it' if len(given) == 1 else 'them'} out"
            )
        return
    problems, checked = _method_problems(args, "prune_", args.prune_method)
    problems += _cache_problems(args, "prune_", args.prune, args.prune_method)
    if args.sweep and args.prune is None:
        problems.append("--sweep gives ratios of --prune's kind; give --prune TARGET too")
    try:
        _options(checked, formats, specs=None, data=None).check(has_data=bool(args.calib))
    except ConfigError as e:
        problems.append(str(e))
    if problems:
        raise ConfigError("; ".join(problems))


def _load_data(args: argparse.Namespace, specs: list[Any]) -> Any:
    if not args.calib:
        return None
    from edgerep.cli import _folder_options
    from edgerep.quantize import load_calibration

    return load_calibration(
        args.calib,
        inputs=[s.to_dict() for s in specs],
        samples=args.calib_samples,
        seed=args.calib_seed,
        x_key=args.x_key,
        y_key=args.y_key,
        **_folder_options(args),
    )


def _options(
    args: argparse.Namespace, formats: list[str], *, specs: list[Any] | None, data: Any
) -> Any:
    """`PruneOptions` from either verb's flags (convert's are ``--prune-*``)."""
    from edgerep.prune._stage import PruneOptions, default_prune_backend

    convert = args.command == "convert"
    get = (lambda k: getattr(args, "prune_" + k)) if convert else (lambda k: getattr(args, k))
    backend = get("backend") if convert else (args.backend or "onnxruntime")
    lat = get("latency_input")
    lat_inputs = None
    if lat and specs is not None:
        from edgerep.cli import _parse_specs
        from edgerep.spec import example_inputs

        lat_inputs = tuple(example_inputs(_parse_specs(lat), seed=args.seed))
    ft_data = None
    if args.finetune_data and specs is not None:
        from edgerep.bench.accuracy import load_dataset
        from edgerep.cli import _folder_options
        from edgerep.errors import ConfigError

        if len(specs) != 1:
            raise ConfigError(
                "--finetune-data is for one-input models; this model takes "
                f"{len(specs)} inputs (leave it out: the fine-tune then gets "
                "the calibration inputs)"
            )
        ft_data = load_dataset(
            args.finetune_data, x_key=args.x_key, y_key=args.y_key, **_folder_options(args)
        )
    # options left out (None) take PruneOptions' defaults
    defaulted = {k: get(k) for k in ("method", "depth_error", "rank_error", "importance")}
    return PruneOptions(
        target=(args.prune if convert else args.target) or "",
        depth_blocks=get("depth_blocks"),
        backend=backend or default_prune_backend(formats),
        recovery=get("recovery"),
        **{k: v for k, v in defaulted.items() if v is not None},
        keep=tuple(get("keep")),
        data=data,
        finetune=args.finetune,
        finetune_data=ft_data,
        threads=1 if convert or args.threads is None else args.threads,
        min_ratio=0.125 if convert or args.min_ratio is None else args.min_ratio,
        cache_dir=get("cache_dir"),
        latency_inputs=lat_inputs,
    )


def convert_prune_options(args: argparse.Namespace, specs: list[Any], formats: list[str]) -> Any:
    """The `PruneOptions` of ``edgerep convert --prune`` (None without --prune)."""
    if not _converts_with_pruning(args):
        return None
    return _options(args, formats, specs=specs, data=_load_data(args, specs))


def _sweep_targets(args: argparse.Namespace, target: str) -> list[str]:
    from edgerep.prune._config import parse_target
    from edgerep.prune._sweep import parse_sweep

    return parse_sweep(args.sweep, parse_target(target).kind)


def _bench_config(args: argparse.Namespace) -> Any:
    from edgerep.bench.latency import LatencyConfig

    overrides = {
        "min_seconds": getattr(args, "seconds", None),
        "repeats": getattr(args, "repeats", None),
    }
    return LatencyConfig(**{k: v for k, v in overrides.items() if v is not None})


def run_convert_sweep(
    args: argparse.Namespace,
    model: Any,
    specs: list[Any],
    description: dict[str, Any],
    formats: list[str],
    exporter_options: dict[str, Any],
    prune: Any,
    quantize: tuple[Any, list[str]] | None,
) -> int:
    """``edgerep convert --prune ... --sweep``: one (quantized, with --quantize) bundle per ratio."""
    import shutil
    from dataclasses import replace

    from edgerep.bundle import private_dir
    from edgerep.cli import _quant_options
    from edgerep.pipeline import convert

    targets = _sweep_targets(args, prune.target)

    def make(out: Path, target: str | None) -> None:
        common = {
            "to": formats,
            "fold": not args.no_fold,
            "rtol": args.rtol,
            "seed": args.seed,
            "source": description,
            "merge": args.merge_options,
            "exporter_options": exporter_options,
            "allow_nonfinite_reference": args.allow_nonfinite_reference,
            "prune": None if target is None else replace(prune, target=target),
        }
        if quantize is None:
            convert(model, specs, out_dir=out, **common)
            return
        from edgerep.quantize import quantize_bundle

        data, backends = quantize
        if "executorch" in backends:
            from edgerep.errors import ConfigError

            raise ConfigError(
                "--sweep with --quantize on executorch is not supported; "
                "pass --backend onnxruntime or openvino"
            )
        scratch = private_dir(out, "float")
        try:
            convert(model, specs, out_dir=scratch / "bundle", **common)
            quantize_bundle(
                scratch / "bundle",
                out,
                data=data,
                backends=backends,
                mode=args.quantize,
                **{**_quant_options(args), "overwrite": False},
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    return _finish_sweep(args, specs, targets, make, prune.data)


def _finish_sweep(
    args: argparse.Namespace, specs: list[Any], targets: list[str], make: Any, data: Any
) -> int:
    import sys

    from edgerep.bench.report import markdown_table, pruning_markdown
    from edgerep.cli import EXIT_OK, EXIT_TARGET_MISSED
    from edgerep.prune._sweep import run_sweep

    out, report = run_sweep(
        args.out,
        targets,
        make,
        data=data,
        input_names=[s.name for s in specs],
        overwrite=args.force,
        latency_config=_bench_config(args),
    )
    if args.json:
        print(json.dumps({"bundle": str(out), "bench": report}, indent=2, default=str))
    else:
        print(markdown_table(report), end="")
        print()
        print(pruning_markdown(report))
        print(f"bundles and bench report: {out} (bench/bench.html)")
    missed = [v for v in report["pruning"]["variants"] if v.get("status") == "missed"]
    if not missed:
        return EXIT_OK
    print(
        f"edgerep: {len(missed)} of {len(targets)} sweep targets missed: "
        + ", ".join(
            f"{v['target']} (reached {v['ratio_in_search']:.3f})"
            if isinstance(v.get("ratio_in_search"), int | float)
            else str(v["target"])
            for v in missed
        )
        + f"; every bundle is written (see each prune_report.json and {out / 'bench'}); "
        f"exit code {EXIT_TARGET_MISSED}",
        file=sys.stderr,
    )
    return EXIT_TARGET_MISSED


def _bundle_source(source: str) -> str:
    """SRC as `edgerep.source.load_model` reads it: an edgerep bundle -> its ``model.pt2``.

    A bundle (a directory with ``manifest.json``) is pruned from the torch program it
    keeps (``edgerep fold``/``merge`` write ``model.pt2``); its manifest is checked first.

    Raises:
        ConfigError: the bundle keeps no torch program (e.g. only ONNX / OpenVINO files).
        VerificationError: the manifest is missing, invalid or its files were changed.
    """
    from edgerep.bundle import MANIFEST_NAME, read_manifest
    from edgerep.errors import ConfigError

    path = Path(source).expanduser()
    if not (path.is_dir() and (path / MANIFEST_NAME).is_file()):
        return source
    manifest = read_manifest(path)
    for artifact in manifest.get("artifacts", []):
        if artifact.get("format") == "pt2" and artifact.get("file"):
            return str(path / artifact["file"])
    formats = sorted({str(a.get("format")) for a in manifest.get("artifacts", [])})
    origin = manifest.get("source", {})
    hint = ""
    if origin.get("kind") == "python-factory" and origin.get("factory"):
        hint = f" (this bundle was made from {origin['path']}:{origin['factory']})"
    raise ConfigError(
        f"bundle {str(path)!r} keeps no torch model to prune (its artifacts: "
        f"{', '.join(formats) or 'none'}); give a bundle written by `edgerep fold` or "
        f"`edgerep merge` (model.pt2), the .pt2 itself, or the model's source{hint}"
    )


def run_prune(args: argparse.Namespace) -> int:
    from edgerep.cli import _formats_and_options, _load
    from edgerep.errors import ConfigError
    from edgerep.pipeline import convert

    args.source = _bundle_source(args.source)
    problems: list[str] = []
    checked = args
    if args.plan is not None:
        search = _given(args, _SEARCH_ONLY)
        if search:
            problems.append(
                "--plan re-applies the saved channel, depth and rank decisions and reads none "
                f"of {', '.join(search)} (they set up a new search); leave "
                f"{'it' if len(search) == 1 else 'them'} out or drop --plan"
            )
    else:
        methods = _methods(args.method) or ()
        if not args.target and "channels" in methods:
            problems.append("give --target (e.g. latency=0.5) or --plan prune_plan.json")
        if args.sweep and not args.target:
            problems.append("--sweep gives ratios of --target's kind; give --target too")
        timing = _given(args, ["seconds", "repeats"])
        if timing and not args.sweep:
            problems.append(
                f"{', '.join(timing)} time{'s' if len(timing) == 1 else ''} the bundles of "
                "--sweep (the latency search has its own timing); give --sweep R,R,... or "
                f"leave {'it' if len(timing) == 1 else 'them'} out"
            )
        method_problems, checked = _method_problems(args, "", args.method)
        problems += method_problems
        problems += _cache_problems(args, "", args.target, args.method)
    args.option = getattr(args, "option", [])
    formats, options = _formats_and_options(args)
    if args.plan is None:
        try:
            _options(checked, formats, specs=None, data=None).check(has_data=bool(args.calib))
        except ConfigError as e:
            problems.append(str(e))
        if args.sweep and args.target:
            try:
                _sweep_targets(args, args.target)
            except ConfigError as e:
                problems.append(str(e))
    if problems:
        raise ConfigError("; ".join(problems))
    model, specs, description = _load(args)
    if args.plan:
        return _reapply(args, model, specs, description, formats, options)
    data = _load_data(args, specs)
    prune = _options(args, formats, specs=specs, data=data)
    if args.sweep:
        from dataclasses import replace

        def make(out: Path, target: str | None) -> None:
            convert(
                model,
                specs,
                to=formats,
                out_dir=out,
                fold=not args.no_fold,
                seed=args.seed,
                source=description,
                exporter_options=options,
                prune=None if target is None else replace(prune, target=target),
            )

        return _finish_sweep(args, specs, _sweep_targets(args, args.target), make, data)
    _, result = convert(
        model,
        specs,
        to=formats,
        out_dir=args.out,
        overwrite=args.force,
        fold=not args.no_fold,
        seed=args.seed,
        source=description,
        exporter_options=options,
        prune=prune,
    )
    assert result.prune is not None
    report_dict = result.prune.to_dict()
    if args.json:
        print(json.dumps({"prune": report_dict, "bundle": str(result.bundle)}, indent=2))
    else:
        print(result.prune.to_text())
        print()
        print("formats:")
        print(result.status_table())
        print()
        print(f"bundle: {result.bundle}")
    return exit_code(result.prune)


def exit_code(stage: Any) -> int:
    """``EXIT_TARGET_MISSED`` (7) when pruning missed its target, else ``EXIT_OK``.

    The bundle is written either way (the user may still want the closest model); a
    script sees the miss in the exit code and the numbers on stderr.
    """
    import sys

    from edgerep.cli import EXIT_OK, EXIT_TARGET_MISSED

    report = getattr(stage, "report", None)
    if report is None or report.status != "missed":
        return EXIT_OK
    measured = "measured" if report.target.startswith("latency") else "reached"
    print(
        f"edgerep: pruning target {report.target} missed: {measured} ratio "
        f"{report.achieved:.3f}, asked {report.asked}; the bundle is written (see its "
        f"prune_report.json); exit code {EXIT_TARGET_MISSED}",
        file=sys.stderr,
    )
    return EXIT_TARGET_MISSED


def _reapply(
    args: argparse.Namespace,
    model: Any,
    specs: list[Any],
    description: dict[str, Any],
    formats: list[str],
    options: dict[str, Any],
) -> int:
    """``--plan``: the saved plan applied to the (folded) model, exported and verified."""

    from edgerep.cli import EXIT_OK
    from edgerep.pipeline import convert
    from edgerep.prune import PrunePlan, apply_plan, save_pruned
    from edgerep.prune._stage import _batched
    from edgerep.spec import example_inputs

    inputs = example_inputs(specs, seed=args.seed)
    if not args.no_fold:
        from edgerep.fold import fold

        model, _ = fold(model, inputs)
    data = _load_data(args, specs)
    calib = _batched(data, [s.name for s in specs])[0] if data is not None else None
    plan = PrunePlan.load(args.plan)
    pruned = apply_plan(model, inputs, plan, calib=calib)
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
    report = {"plan": str(Path(args.plan).resolve()), "reapplied": True}
    (out / "prune_report.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps({"prune": report, "bundle": str(out)}, indent=2))
    else:
        print(
            f"re-applied {args.plan} ({len(plan.kept)} groups, {len(plan.depth)} blocks, "
            f"{len(plan.ranks)} factorized layers)"
        )
        print()
        print("formats:")
        print(result.status_table())
        print()
        print(f"bundle: {out}")
    return EXIT_OK
