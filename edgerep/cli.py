"""The ``edgerep`` command: a thin front over `edgerep.pipeline`.

Usage::

    edgerep fold SRC -o OUT [--weights W] [--input SPEC ...] [--force] [--json]
    edgerep convert SRC [--to onnx ...] -o OUT [--weights W] [--input SPEC ...]
                    [--no-fold] [--rtol R] [--force] [--json]
    edgerep list [--json]

``SRC`` is ``path/to/file.py:factory`` or ``model.pt2``; ``SPEC`` is
``NAME:SHAPE[:DTYPE]`` such as ``x:1x3x224x224``, ``x:Nx3x224x224`` or
``ids:1x16:int64`` (see `edgerep.spec`). Without ``--input`` the inputs the
source declares are used (a ``.pt2`` program's own inputs, or ``EDGEREP_INPUTS``
in the factory file); if it declares none, ``--input`` is required.
``--debug`` (on any command) prints full tracebacks.

Exit codes:
    0  success
    1  unexpected internal error: a bug; rerun with --debug and report the traceback
    2  usage or configuration error: bad option or input spec, output exists
       (use --force), model fails on the example inputs, optional package missing
    3  source error: the model file, factory or weights cannot be loaded
    4  verification failure: an artifact does not match the PyTorch reference
    5  export failure
    6  unsupported: a format cannot take the model (every problem is listed)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import traceback
import warnings
from collections.abc import Sequence
from typing import Any

from edgerep.errors import (
    ConfigError,
    EdgerepError,
    ExportError,
    MissingDependencyError,
    SourceError,
    UnsupportedError,
    VerificationError,
)

__all__ = [
    "EXIT_CODES",
    "EXIT_EXPORT",
    "EXIT_INTERNAL",
    "EXIT_OK",
    "EXIT_SOURCE",
    "EXIT_UNSUPPORTED",
    "EXIT_USAGE",
    "EXIT_VERIFICATION",
    "exit_code_for",
    "main",
]

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_SOURCE = 3
EXIT_VERIFICATION = 4
EXIT_EXPORT = 5
EXIT_UNSUPPORTED = 6

#: error class -> exit code; the most derived class in an error's MRO wins
EXIT_CODES: dict[type[BaseException], int] = {
    ConfigError: EXIT_USAGE,
    MissingDependencyError: EXIT_USAGE,
    SourceError: EXIT_SOURCE,
    VerificationError: EXIT_VERIFICATION,
    ExportError: EXIT_EXPORT,
    UnsupportedError: EXIT_UNSUPPORTED,
    EdgerepError: EXIT_INTERNAL,
}

_log = logging.getLogger("edgerep")


def exit_code_for(error: BaseException) -> int:
    """The exit code for `error` (see the module docstring)."""
    for cls in type(error).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return EXIT_INTERNAL


# --- argument parsing ---------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="print full tracebacks on errors")
    common.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)"
    )

    model_args = argparse.ArgumentParser(add_help=False)
    model_args.add_argument("source", metavar="SRC", help="path/to/file.py:factory or model.pt2")
    model_args.add_argument(
        "-o", "--out", required=True, metavar="OUT", help="bundle directory to create"
    )
    model_args.add_argument(
        "--weights", metavar="W", help="state dict for a file.py:factory source"
    )
    model_args.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="SPEC",
        help="input spec NAME:SHAPE[:DTYPE], one per forward argument, e.g. x:Nx3x224x224",
    )
    model_args.add_argument("--force", action="store_true", help="replace OUT if it exists")
    model_args.add_argument("--seed", type=int, default=0, help="seed of the example inputs")
    model_args.add_argument("--json", action="store_true", help="print the result as JSON")

    parser = argparse.ArgumentParser(
        prog="edgerep",
        description="Fold re-parameterized PyTorch models into plain graphs, export and verify them.",
        epilog="Exit codes: 0 ok, 1 internal error, 2 usage/config, 3 source, 4 verification, "
        "5 export, 6 unsupported.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "fold",
        parents=[common, model_args],
        help="fold a model and save it as a verified .pt2 bundle",
        description="Fold every affine structure into plain layers; save model.pt2 and the report.",
    )
    p.set_defaults(handler=_cmd_fold)

    p = sub.add_parser(
        "convert",
        parents=[common, model_args],
        help="fold, export and verify a model",
        description="Fold, export to each format, verify against the original model, write a bundle.",
    )
    p.add_argument(
        "--to",
        action="append",
        default=[],
        metavar="FORMAT",
        help="export format (repeat or comma-separate; default onnx); see `edgerep list`",
    )
    p.add_argument("--no-fold", action="store_true", help="export the model as it is")
    p.add_argument(
        "--rtol", type=float, help="override the parity tolerance (fraction of max |ref|)"
    )
    p.set_defaults(handler=_cmd_convert)

    p = sub.add_parser("list", parents=[common], help="list formats, runtimes and zoo blocks")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(handler=_cmd_list)
    return parser


# --- commands -----------------------------------------------------------------------------


def _parse_specs(texts: Sequence[str]) -> list[Any]:
    from edgerep.spec import parse_input_spec, validate_specs

    specs = [parse_input_spec(t) for t in texts]
    if specs:
        validate_specs(specs)
    return specs


def _load(args: argparse.Namespace) -> tuple[Any, list[Any], dict[str, Any]]:
    """Check the output path, parse the specs, load the model; cheapest checks first."""
    from edgerep.bundle import check_output_dir
    from edgerep.source import INPUTS_ATTRIBUTE, load_model

    check_output_dir(args.out, overwrite=args.force)
    specs = _parse_specs(args.input)
    model, description = load_model(args.source, weights=args.weights)
    if not specs:
        declared = description.get("inputs") or []
        if not declared:
            raise ConfigError(
                f"cannot tell the input shape of {args.source!r}; pass --input NAME:SHAPE for each "
                f"forward argument, e.g. --input x:1x3x224x224 (or define {INPUTS_ATTRIBUTE} = "
                "['x:1x3x224x224'] in the model file)"
            )
        specs = _parse_specs(declared)
        if not args.json:
            print(f"inputs (declared by the source): {', '.join(s.to_text() for s in specs)}")
    return model, specs, description


def _show(result: Any, args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
        return
    if result.fold_report is not None:
        print("fold report:")
        print(result.fold_report.to_text())
    else:
        print("fold: skipped (--no-fold)")
    print()
    print("formats:")
    print(result.status_table())
    print()
    print(f"bundle: {result.bundle}")


def _cmd_fold(args: argparse.Namespace) -> int:
    from edgerep.pipeline import fold_to_dir

    model, specs, description = _load(args)
    _, result = fold_to_dir(
        model, specs, args.out, overwrite=args.force, seed=args.seed, source=description
    )
    _show(result, args)
    return EXIT_OK


def _cmd_convert(args: argparse.Namespace) -> int:
    from edgerep.exporters import get_exporter
    from edgerep.pipeline import convert

    formats = [f.strip() for item in (args.to or ["onnx"]) for f in item.split(",") if f.strip()]
    if not formats:
        raise ConfigError("--to names no format; e.g. --to onnx (see `edgerep list`)")
    for f in formats:
        get_exporter(f)  # unknown names fail before the model is loaded
    model, specs, description = _load(args)
    _, result = convert(
        model,
        specs,
        to=formats,
        out_dir=args.out,
        overwrite=args.force,
        fold=not args.no_fold,
        rtol=args.rtol,
        seed=args.seed,
        source=description,
    )
    _show(result, args)
    return EXIT_OK


def _installed(modules: Sequence[str]) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def _cmd_list(args: argparse.Namespace) -> int:
    from edgerep.exporters import available_formats, get_exporter
    from edgerep.runtimes import available_runtimes, get_runtime

    formats: list[dict[str, Any]] = []
    for name in available_formats():
        e = get_exporter(name)
        formats.append(
            {
                "format": name,
                "installed": _installed(e.requires),
                "extra": e.extra,
                "runtime": e.runtime,
            }
        )
    runtimes: list[dict[str, Any]] = []
    for name in available_runtimes():
        rt = get_runtime(name)
        ok = rt.is_available()
        runtimes.append(
            {
                "runtime": name,
                "installed": ok,
                "devices": rt.devices() if ok else [],
                "formats": list(rt.formats),
            }
        )
    blocks: list[str] = []
    zoo_note = ""
    if importlib.util.find_spec("torch") is None:
        zoo_note = "zoo needs torch"
    else:
        try:
            from edgerep.zoo import BLOCKS

            blocks = sorted(BLOCKS)
        except ImportError as e:
            zoo_note = f"zoo not importable: {e}"
    if args.json:
        print(
            json.dumps({"formats": formats, "runtimes": runtimes, "zoo_blocks": blocks}, indent=2)
        )
        return EXIT_OK
    print("export formats:")
    for f in formats:
        state = "installed" if f["installed"] else f"missing: pip install 'edgerep[{f['extra']}]'"
        print(f"  {f['format']:<12} verified with {f['runtime']:<12} {state}")
    print("runtimes:")
    for r in runtimes:
        state = f"devices: {', '.join(r['devices']) or '-'}" if r["installed"] else "not installed"
        print(f"  {r['runtime']:<12} formats: {', '.join(r['formats']):<10} {state}")
    print("zoo blocks:")
    print(f"  {', '.join(blocks)}" if blocks else f"  ({zoo_note or 'none'})")
    return EXIT_OK


# --- entry point --------------------------------------------------------------------------


def _configure_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    if not _log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("edgerep: %(levelname)s: %(message)s"))
        _log.addHandler(handler)
    _log.setLevel(level)
    if verbose == 0:
        # torch.onnx warns on every export that torchvision's ops are not registered
        logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


def _report_error(error: BaseException, code: int, args: argparse.Namespace) -> None:
    kind = type(error).__name__
    if getattr(args, "json", False):
        print(json.dumps({"error": str(error), "kind": kind, "exit_code": code}, indent=2))
    print(f"edgerep: error ({kind}): {error}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on --help (0) and on usage errors (2)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    _configure_logging(args.verbose)
    try:
        with warnings.catch_warnings():
            # torch's own pytree deprecation, raised from inside torch.export (save/load)
            warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
            return int(args.handler(args))
    except EdgerepError as e:
        code = exit_code_for(e)
        if args.debug:
            traceback.print_exc()
        _report_error(e, code, args)
        return code
    except KeyboardInterrupt:
        print("edgerep: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        _report_error(e, EXIT_INTERNAL, args)
        print(
            "edgerep: this is an internal error (a bug in edgerep, or an error it does not yet "
            "explain); rerun with --debug to see the traceback, and please report it",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
