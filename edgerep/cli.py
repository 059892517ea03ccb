"""The ``edgerep`` command: a thin front over `edgerep.pipeline`.

Usage::

    edgerep fold SRC -o OUT [--weights W] [--input SPEC ...] [--force] [--json]
    edgerep merge SRC [--adapter ADAPTER ...] -o OUT [--fold] [--weights W] [--input SPEC ...]
                  [--lora-alpha A] [--combine-method M] [--density D] [--merge-seed N]
                  [--keep-zeros] [--force] [--json]
    edgerep merge HF_DIR --adapter PEFT_DIR -o OUT_DIR [--force] [--json]
    edgerep merge BASE_DIR --models DIR ... [--method M] [--weights W1,W2,...] [--density D]
                  [--merge-seed N] -o OUT_DIR [--force] [--json]
    edgerep convert SRC [--to onnx ...] -o OUT [--weights W] [--input SPEC ...]
                    [--adapter ADAPTER ...] [--no-fold] [--rtol R] [--force] [--json]
    edgerep export SRC --to onnx,openvino,coreml,tensorrt,executorch -o OUT [--input SPEC ...]
                   [--option FORMAT.KEY=VALUE ...] [--rtol R] [--force] [--json]
    edgerep bench BUNDLE_OR_SRC ... [--runtime onnxruntime,openvino] [--data DATA]
                  [--compare OTHER_BUNDLE ...] [--out DIR] [--threads N] [--mlperf] [--json]
                  [--device local|all|agent://HOST:PORT|adb:SERIAL|NAME ...] [--token-file F]
    edgerep devices [--device URL ...] [--timeout S] [--json]
    edgerep agent serve --token-file F [--host H] [--port P] [--tls-cert C --tls-key K]
    edgerep prune SRC --target latency=0.5 --calib DATA -o OUT [--backend B] [--plan PLAN]
                  (see `edgerep.prune._cli`)
    edgerep list [--json]

``SRC`` is ``path/to/file.py:factory``, ``model.pt2`` or a local Hugging Face model
directory (``config.json`` + safetensors; ``--task`` picks the Auto class, local
files only); ``SPEC`` is
``NAME:SHAPE[:DTYPE]`` such as ``x:1x3x224x224``, ``x:Nx3x224x224`` or
``ids:1x16:int64`` (see `edgerep.spec`). Without ``--input`` the inputs the
source declares are used (a ``.pt2`` program's own inputs, or ``EDGEREP_INPUTS``
in the factory file); if it declares none, ``--input`` is required.
``--to all`` exports every registered format; ``export`` is ``convert --no-fold``.
``--option FORMAT.KEY=VALUE`` sets an exporter option, e.g.
``openvino.compress_to_fp16=true``, ``coreml.compute_precision=fp16``,
``tensorrt.precision=fp16`` (see `edgerep list` and each exporter's fields).
The status table gives each format one of: verified, exported-not-verified-here
(its runtime cannot run here, e.g. Core ML off macOS), not-built-here (a TensorRT
engine without TensorRT or a GPU: the bundle holds the ``trtexec`` command),
failed (parity), export-failed; only the last two fail the command.
``ADAPTER`` is a PEFT adapter directory or a ``.safetensors`` file of LoRA factors
(see `edgerep.merge._load`), ``NAME=PATH:WEIGHT`` to combine several; the base
model's files are only read.
``HF_DIR``/``BASE_DIR`` is a safetensors checkpoint directory (``config.json`` with
``model.safetensors`` or a sharded index): the merge streams shard by shard and
writes a checkpoint directory with the same shards, index and config
(see `edgerep.merge._checkpoint`).
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
    7  pruning target missed (prune, convert --prune): the bundle is written and its
       prune report gives asked vs measured; ask for less, or accept it knowingly
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
from pathlib import Path
from typing import Any

from edgerep import _interrupt
from edgerep._quiet import quiet_third_party
from edgerep.errors import (
    ConfigError,
    EdgerepError,
    ExportError,
    MissingDependencyError,
    SourceError,
    UnsupportedError,
    VerificationError,
)
from edgerep.merge import _cli as merge_cli
from edgerep.prune import _cli as prune_cli

__all__ = [
    "EXIT_CODES",
    "EXIT_EXPORT",
    "EXIT_INTERNAL",
    "EXIT_OK",
    "EXIT_SOURCE",
    "EXIT_TARGET_MISSED",
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
EXIT_TARGET_MISSED = 7

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
        "--weights",
        metavar="W",
        help="the state-dict file of a file.py:factory SRC; with merge --models: one weight "
        "per model, comma-separated (e.g. 0.5,0.3,0.2; default 1/n each)",
    )
    model_args.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="SPEC",
        help="input spec NAME:SHAPE[:DTYPE], one per forward argument, e.g. x:Nx3x224x224",
    )
    model_args.add_argument(
        "--task",
        metavar="TASK",
        help="for a Hugging Face model directory SRC: feature-extraction (default), "
        "text-classification, token-classification, causal-lm, masked-lm, "
        "image-classification, image-feature-extraction",
    )
    model_args.add_argument("--force", action="store_true", help="replace OUT if it exists")
    model_args.add_argument("--seed", type=int, default=0, help="seed of the example inputs")
    model_args.add_argument("--json", action="store_true", help="print the result as JSON")

    adapter_args = argparse.ArgumentParser(add_help=False)
    adapter_args.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="ADAPTER",
        help="PEFT adapter directory or .safetensors LoRA file to merge; repeat as "
        "NAME=PATH:WEIGHT to combine several",
    )
    adapter_args.add_argument(
        "--lora-alpha", type=float, metavar="A", help="LoRA alpha of .safetensors factor files"
    )
    adapter_args.add_argument(
        "--combine-method",
        "--method",
        dest="combine_method",
        default="linear",
        metavar="M",
        help="how several adapters (or --models checkpoints) combine: linear, task_arithmetic, "
        "ties, dare_linear, dare_ties, breadcrumbs, della, della_linear",
    )
    adapter_args.add_argument(
        "--density",
        type=float,
        metavar="D",
        help="fraction of each delta kept by TIES/DARE/DELLA/Breadcrumbs",
    )
    adapter_args.add_argument(
        "--merge-seed",
        type=int,
        metavar="N",
        help="seed of DARE's and DELLA's random masks (default 0; a --models merge: --seed)",
    )
    adapter_args.add_argument(
        "--keep-zeros", action="store_true", help="keep the exact zeros of the base weights"
    )

    quant_args = argparse.ArgumentParser(add_help=False)
    _add_quant_args(quant_args)

    parser = argparse.ArgumentParser(
        prog="edgerep",
        description="Fold re-parameterized PyTorch models into plain graphs, export and verify them.",
        epilog="Exit codes: 0 ok, 1 internal error, 2 usage/config, 3 source, 4 verification, "
        "5 export, 6 unsupported, 7 pruning target missed (bundle written).",
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
        "merge",
        parents=[common, model_args, adapter_args],
        help="merge adapters into plain layers and save a verified .pt2 bundle",
        description="Merge every affine adapter (LoRA, DoRA, IA3, OFT, ...) into plain layers, "
        "each read off in float64 and verified; save model.pt2 and the merge report.",
    )
    p.add_argument("--fold", action="store_true", help="also fold the merged model")
    merge_cli.add_arguments(p)
    p.set_defaults(handler=_cmd_merge)

    p = sub.add_parser(
        "convert",
        parents=[common, model_args, adapter_args, quant_args],
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
    p.add_argument(
        "--allow-nonfinite-reference",
        action="store_true",
        help="the model's outputs hold NaN/Inf on purpose (e.g. -inf masks): artifacts must "
        "match them place by place (default: any NaN/Inf fails parity)",
    )
    p.add_argument(
        "--quantize",
        metavar="MODE",
        help="then quantize (int8, int8-dynamic, fp16, w8, w4) with --calib DATA; see "
        "`edgerep quantize`",
    )
    _add_option_arg(p)
    prune_cli.add_convert_prune_args(p)
    p.set_defaults(handler=_cmd_convert)

    p = sub.add_parser(
        "quantize",
        parents=[common, quant_args],
        help="quantize a bundle's float artifacts with each backend's engine",
        description="Build each backend's quantized variants, measure latency and accuracy, keep "
        "the fastest one that is at least --min-speedup faster than float and within --max-drop; "
        "write a new bundle (the source bundle is not modified).",
    )
    p.add_argument(
        "bundle",
        metavar="BUNDLE_OR_HF_DIR",
        help="a bundle written by `edgerep convert`, or a Hugging Face model directory "
        "(converted first, with convert's defaults, then quantized)",
    )
    p.add_argument("-o", "--out", required=True, metavar="OUT", help="new bundle directory")
    p.add_argument(
        "--task",
        metavar="TASK",
        help="for a Hugging Face model directory: its task, as for `edgerep convert`",
    )
    p.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="SPEC",
        help="for a Hugging Face model directory: input spec NAME:SHAPE[:DTYPE] (default from "
        "its config)",
    )
    p.add_argument(
        "--to",
        action="append",
        default=[],
        metavar="FORMAT",
        help="for a Hugging Face model directory: the float formats to export and quantize "
        "(default onnx)",
    )
    p.add_argument(
        "--mode",
        default="int8",
        help="int8 (static, calibrated; default), int8-dynamic, fp16, w8 or w4 (weight-only)",
    )
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_trust_arg(p)
    p.set_defaults(handler=_cmd_quantize)

    from edgerep.prune._cli import add_prune_parser

    add_prune_parser(sub, [common, model_args])

    p = sub.add_parser(
        "export",
        parents=[common, model_args],
        help="export and verify a model as it is (no folding)",
        description="Export to each format without folding, verify against the model, write "
        "a bundle.",
    )
    p.add_argument(
        "--to",
        action="append",
        default=[],
        metavar="FORMAT",
        help="export format (repeat or comma-separate; 'all' for every format; default onnx)",
    )
    p.add_argument(
        "--rtol", type=float, help="override the parity tolerance (fraction of max |ref|)"
    )
    p.add_argument(
        "--allow-nonfinite-reference",
        action="store_true",
        help="the model's outputs hold NaN/Inf on purpose (e.g. -inf masks): artifacts must "
        "match them place by place (default: any NaN/Inf fails parity)",
    )
    _add_option_arg(p)
    p.set_defaults(handler=_cmd_export, no_fold=True)

    p = sub.add_parser(
        "bench",
        parents=[common],
        help="measure latency, accuracy and roofline of bundles on every runtime here",
        description="Benchmark each bundle (or model source) on each runtime with one latency "
        "method; write bench.json, bench.md and bench.html to --out.",
    )
    _add_bench_args(p)
    p.set_defaults(handler=_cmd_bench)

    p = sub.add_parser(
        "sign",
        parents=[common],
        help="sign a bundle's manifest with a secret key (HMAC-SHA256)",
        description="Check a bundle (manifest checksum and every file hash), then sign its "
        "manifest with the key in KEY_FILE; edgerep.load(..., key=...) on the device refuses a "
        "bundle whose signature is missing or does not match. The checksum alone proves "
        "integrity; the signature proves the bundle came from a holder of the key.",
    )
    p.add_argument("bundle", metavar="BUNDLE", help="a bundle directory")
    p.add_argument("--key-file", required=True, metavar="KEY_FILE", help="the secret (>= 16 bytes)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=_cmd_sign)

    from edgerep.devices._cli import add_commands as _add_device_commands

    _add_device_commands(sub, common)

    p = sub.add_parser("list", parents=[common], help="list formats, runtimes and zoo blocks")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(handler=_cmd_list)
    return parser


def _add_option_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="FORMAT.KEY=VALUE",
        help="exporter option, e.g. openvino.compress_to_fp16=true or tensorrt.precision=fp16",
    )


def _add_calib_args(p: argparse.ArgumentParser) -> None:
    """--calib DATA and how it is read (shared by quantize, convert and prune)."""
    p.add_argument(
        "--calib",
        metavar="DATA",
        help="calibration/evaluation samples: .npz (x[, y] or one array per input), image "
        "folder, or file.py:fn returning (x, y)",
    )
    p.add_argument(
        "--calib-samples", type=int, default=256, metavar="N", help="calibration samples (256)"
    )
    p.add_argument("--calib-seed", type=int, default=0, metavar="N", help="seed of the split")
    p.add_argument("--x-key", default="x", metavar="K", help="inputs array of an .npz (x)")
    p.add_argument("--y-key", default="y", metavar="K", help="labels array of an .npz (y)")
    p.add_argument("--image-size", type=int, metavar="PX", help="resize folder images to PXxPX")
    p.add_argument("--channels", type=int, default=3, help="folder images: 1 or 3 channels")
    p.add_argument("--mean", type=float, nargs="+", default=[0.0], help="folder images: mean")
    p.add_argument("--std", type=float, nargs="+", default=[1.0], help="folder images: std")


def _folder_options(args: argparse.Namespace) -> dict[str, Any]:
    """The image-folder options of `_add_calib_args` as `load_calibration` keywords."""
    return {
        "image_size": args.image_size,
        "channels": args.channels,
        "mean": args.mean if len(args.mean) > 1 else args.mean[0],
        "std": args.std if len(args.std) > 1 else args.std[0],
    }


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    _add_calib_args(p)
    p.add_argument(
        "--backend",
        action="append",
        default=[],
        metavar="NAME",
        help="quantization backend: onnxruntime, openvino (repeat or comma-separate; default: "
        "every backend offering the mode whose float artifact the bundle holds)",
    )
    p.add_argument(
        "--max-drop",
        type=float,
        default=0.01,
        metavar="F",
        help="largest allowed loss of top-1 (or of agreement with float without labels); "
        "0.01 = one point (default)",
    )
    p.add_argument(
        "--min-speedup",
        type=float,
        default=1.15,
        metavar="X",
        help="keep a variant only if at least this much faster than float (default 1.15)",
    )
    p.add_argument(
        "--min-sqnr",
        type=float,
        metavar="DB",
        help="never choose a variant whose output SQNR against float is below DB",
    )
    p.add_argument(
        "--seconds", type=float, metavar="S", help="timed seconds per latency run (default 1)"
    )
    p.add_argument("--repeats", type=int, metavar="N", help="latency runs per variant (default 3)")
    p.add_argument(
        "--sensitivity",
        action="store_true",
        help="write the per-layer int8 sensitivity report (onnxruntime) into the bundle",
    )
    p.add_argument(
        "--no-mixed-precision",
        action="store_true",
        help="do not keep sensitive layers in float when every fast int8 variant is over budget",
    )


def _quant_setup(
    args: argparse.Namespace,
    inputs: Sequence[dict[str, Any]],
    mode: str,
    formats: Sequence[str],
    *,
    with_model: bool = False,
    classes: int | None = None,
) -> tuple[Any, list[str]]:
    """(calibration data, backends) from the quantize options; fails before any work.

    Without --backend: every backend that offers `mode` and quantizes one of `formats`.
    The data is checked against `inputs` (manifest-style input specs) and, for labels,
    the model's number of `classes` when known.
    """
    from edgerep.quantize import (
        MODES,
        available_backends,
        default_backends,
        load_calibration,
        supported_modes,
    )

    problems = []
    backends = [b for text in args.backend for b in text.split(",") if b]
    if mode not in MODES:
        problems.append(f"unknown quantization mode {mode!r}; allowed: {', '.join(MODES)}")
    elif not backends:
        backends = default_backends(mode, formats, with_model=with_model)
        if not backends:
            problems.append(
                f"no backend quantizes {', '.join(formats)} in mode {mode!r}; backends offering "
                f"it: {', '.join(available_backends(mode)) or 'none'} (export their format)"
            )
    for b in backends:
        if b not in available_backends():
            problems.append(
                f"unknown quantization backend {b!r}; available: {', '.join(available_backends())}"
            )
        elif mode in MODES and mode not in supported_modes(b):
            problems.append(
                f"backend {b!r} does not offer mode {mode!r} (it offers "
                f"{', '.join(supported_modes(b))})"
            )
    if not args.calib:
        problems.append(
            "quantization needs --calib DATA (an .npz, image folder or file.py:fn with a few "
            "hundred representative inputs; labels make the budget a top-1 budget)"
        )
    if not 0 <= args.max_drop <= 1:
        problems.append(f"--max-drop must be in [0, 1] (0.01 is one point), got {args.max_drop}")
    if args.min_speedup < 1:
        problems.append(f"--min-speedup must be >= 1, got {args.min_speedup}")
    if problems:
        raise ConfigError("; ".join(problems))
    data = load_calibration(
        args.calib,
        inputs=inputs,
        classes=classes,
        samples=args.calib_samples,
        seed=args.calib_seed,
        x_key=args.x_key,
        y_key=args.y_key,
        **_folder_options(args),
    )
    return data, backends


def _quant_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword options of `quantize_bundle` that come straight from the flags."""
    from edgerep.bench.latency import LatencyConfig

    overrides = {"min_seconds": args.seconds, "repeats": args.repeats}
    return {
        "max_drop": args.max_drop,
        "min_speedup": args.min_speedup,
        "overwrite": args.force,
        "latency_config": LatencyConfig(**{k: v for k, v in overrides.items() if v is not None}),
        "mixed": not args.no_mixed_precision,
        "sensitivity": args.sensitivity,
        "min_sqnr_db": args.min_sqnr,
        "trust_unsigned": getattr(args, "trust_unsigned", False),
    }


def _quantize_hf_dir(args: argparse.Namespace) -> int:
    """``quantize HF_DIR``: `_cmd_convert` with ``--quantize MODE`` (convert's defaults for
    everything quantize does not set), the quantize options carried over."""
    if args.trust_unsigned:
        raise ConfigError(
            f"--trust-unsigned applies to bundles; {args.bundle!r} is a Hugging Face model "
            "directory (it is converted, then quantized)"
        )
    convert_args = _parser().parse_args(["convert", args.bundle, "-o", args.out])
    for key, value in vars(args).items():
        if key not in ("command", "handler", "bundle", "mode") and hasattr(convert_args, key):
            setattr(convert_args, key, value)
    convert_args.quantize = args.mode
    return _cmd_convert(convert_args)


def _cmd_quantize(args: argparse.Namespace) -> int:
    from edgerep._hf import is_hf_dir
    from edgerep.bench._data import classes_of
    from edgerep.bundle import MANIFEST_NAME, read_manifest
    from edgerep.quantize import quantize_bundle

    if is_hf_dir(args.bundle) and not (Path(args.bundle) / MANIFEST_NAME).is_file():
        return _quantize_hf_dir(args)
    given = [
        f for f, on in (("--task", args.task), ("--input", args.input), ("--to", args.to)) if on
    ]
    if given:
        raise ConfigError(
            f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only when the "
            "source is a Hugging Face model directory "
            f"(config.json and weights); {args.bundle!r} is not one: a bundle keeps its inputs "
            "and formats"
        )
    manifest = read_manifest(args.bundle, trust_unsigned=args.trust_unsigned)
    formats = sorted({a["format"] for a in manifest["artifacts"] if a["precision"] == "fp32"})
    data, backends = _quant_setup(
        args, manifest["inputs"], args.mode, formats, classes=classes_of(manifest["outputs"])
    )
    _, report = quantize_bundle(
        args.bundle,
        args.out,
        data=data,
        backends=backends,
        mode=args.mode,
        **_quant_options(args),
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.to_text())
        print()
        print(f"bundle: {Path(args.out).resolve()}")
    return EXIT_OK


# --- commands -----------------------------------------------------------------------------


def _add_trust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-unsigned",
        action="store_true",
        help="accept a bundle whose manifest has no checksum (written by another tool); "
        "edgerep's own bundles always carry one",
    )


def _add_bench_args(p: argparse.ArgumentParser) -> None:
    _add_trust_arg(p)
    p.add_argument(
        "targets",
        nargs="+",
        metavar="BUNDLE_OR_SRC",
        help="bundle dir or model source, [NAME=]PATH",
    )
    p.add_argument(
        "--task",
        metavar="TASK",
        help="how a Hugging Face model directory among the targets loads (as for convert)",
    )
    p.add_argument("--compare", action="append", default=[], metavar="OTHER", help="more bundles")
    p.add_argument(
        "--runtime", action="append", default=[], metavar="NAME", help="runtimes (comma-separated)"
    )
    p.add_argument(
        "--data",
        metavar="DATA",
        help=".npz (x[, y]), image folder, or file.py:fn; without labels only the agreement "
        "with the reference row is measured",
    )
    p.add_argument("--x-key", metavar="K", help="--data .npz: the inputs array (default x)")
    p.add_argument(
        "--y-key", metavar="K", help="--data .npz: the labels array (default y, if present)"
    )
    p.add_argument(
        "--metric", action="append", default=[], metavar="M", help="top1 (default), top5"
    )
    p.add_argument("--out", "-o", metavar="DIR", help="write bench.json/.md/.html here")
    p.add_argument("--threads", type=int, metavar="N", help="intra-op threads of every runtime")
    p.add_argument(
        "--device",
        action="append",
        default=[],
        help="runtime device (cpu, cuda:0, gpu; default cpu) and/or where to run: local, all, "
        "agent://HOST:PORT, https://HOST:PORT, adb:SERIAL or a devices.toml name (repeatable)",
    )
    from edgerep.devices._cli import add_bench_device_args

    add_bench_device_args(p)
    p.add_argument("--mlperf", action="store_true", help=">= 1024 queries and >= 60 s per run")
    p.add_argument("--min-iters", type=int, metavar="N", help="timed calls per run (default 50)")
    p.add_argument("--seconds", type=float, metavar="S", help="timed seconds per run (default 1)")
    p.add_argument("--warmup", type=int, metavar="N", help="warm-up calls (default 10)")
    p.add_argument("--repeats", type=int, metavar="N", help="runs per row (default 3)")
    p.add_argument("--no-roofline", action="store_true", help="skip the GEMM peak measurement")
    p.add_argument("--no-progress", action="store_true", help="no progress counter on stderr")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--concurrency",
        action="append",
        default=[],
        metavar="N",
        help="also measure throughput with N concurrent calls (repeat or comma-separate)",
    )
    p.add_argument(
        "--precision",
        choices=("default", "f32", "f16", "bf16"),
        help="OpenVINO inference precision hint (default: the device's own, bf16 on AMX CPUs)",
    )
    p.add_argument("--image-size", metavar="H[xW]", help="--data folder: resize images to this")
    p.add_argument("--channels", type=int, choices=(1, 3), help="--data folder: 1 or 3 (default)")
    p.add_argument("--mean", metavar="M[,M,M]", help="--data folder: (v/255 - mean) / std")
    p.add_argument("--std", metavar="S[,S,S]", help="--data folder: (v/255 - mean) / std")


def _cmd_bench(args: argparse.Namespace) -> int:
    from edgerep.bench.latency import LatencyConfig
    from edgerep.bench.report import markdown_table, write_report
    from edgerep.bench.suite import run_bench

    overrides = {
        key: value
        for key, value in (
            ("min_iters", args.min_iters),
            ("min_seconds", args.seconds),
            ("warmup_iters", args.warmup),
            ("repeats", args.repeats),
        )
        if value is not None
    }
    if args.threads is not None and args.threads < 0:
        raise ConfigError(f"--threads must be >= 0; got {args.threads}")
    if args.mlperf:
        if "min_iters" in overrides or "min_seconds" in overrides:
            raise ConfigError(
                "--mlperf sets the iterations and seconds; drop --min-iters/--seconds"
            )
        config = LatencyConfig.mlperf(**overrides)
    else:
        config = LatencyConfig(**overrides)
    runtimes = [r.strip() for item in args.runtime for r in item.split(",") if r.strip()]
    try:
        concurrency = [int(n) for item in args.concurrency for n in item.split(",") if n.strip()]
        data_options: dict[str, object] = {}
        if args.image_size:
            h, _, w = args.image_size.lower().partition("x")
            data_options["image_size"] = (int(h), int(w or h))
        for key in ("mean", "std"):
            if getattr(args, key):
                values = [float(v) for v in getattr(args, key).split(",")]
                data_options[key] = values[0] if len(values) == 1 else values
    except ValueError as e:
        raise ConfigError(
            f"bad number in --concurrency/--image-size/--mean/--std ({e}); e.g. --concurrency 2,4 "
            "--image-size 224 or 224x160 --mean 0.485,0.456,0.406"
        ) from e
    if args.channels is not None:
        data_options["channels"] = args.channels
    for key in ("x_key", "y_key"):
        if getattr(args, key) is not None:
            data_options[key] = getattr(args, key)
    if data_options and not args.data:
        raise ConfigError(
            "--x-key/--y-key/--image-size/--channels/--mean/--std describe --data; give --data"
        )

    def progress(done: int, total: int, label: str) -> None:
        if not args.no_progress:
            print(
                f"\r[{done}/{total}] {label:<60}", end="" if done < total else "\n", file=sys.stderr
            )

    from edgerep.devices._cli import bench_devices, check_device_flags, split_device_args

    runtime_device, device_targets = split_device_args(args.device, args.devices_file)
    if not device_targets:  # device flags with nothing to apply them to are refused, not ignored
        check_device_flags(args, [])
    if device_targets:
        settings = {
            "runtimes": runtimes or None,
            "metrics": args.metric or ["top1"],
            "latency": config.to_dict(),
            "threads": args.threads,
            "device": runtime_device,
            "roofline": not args.no_roofline,
            "concurrency": concurrency,
            "precision": args.precision,
        }
        if args.trust_unsigned:
            raise ConfigError(
                "--trust-unsigned does not go with --device targets: devices accept only bundles "
                "whose manifest carries its checksum (re-create the bundle with edgerep)"
            )
        if data_options:
            raise ConfigError(
                "--image-size/--channels/--mean/--std do not go with --device targets"
            )
        if args.task is not None:
            raise ConfigError(
                "--task does not go with --device targets: devices run bundles; convert the "
                "Hugging Face directory first (edgerep convert DIR --task ...)"
            )
        report = bench_devices(args, device_targets, settings)
    else:
        report = run_bench(
            [*args.targets, *args.compare],
            runtimes=runtimes or None,
            data=args.data,
            metrics=args.metric or ["top1"],
            config=config,
            threads=args.threads,
            device=runtime_device,
            roofline=not args.no_roofline,
            progress=progress,
            concurrency=concurrency,
            precision=args.precision,
            data_options=data_options,
            trust_unsigned=args.trust_unsigned,
            task=args.task,
        )
    paths = write_report(report, args.out) if args.out else {}
    if args.json:
        print(json.dumps({**report, "files": {k: str(v) for k, v in paths.items()}}, indent=2))
    else:
        print(markdown_table(report), end="")
        for kind, path in paths.items():
            print(f"{kind}: {path}")
    if not report["rows"]:
        raise UnsupportedError(
            "nothing could be measured: "
            + "; ".join(f"{e['variant']}/{e['runtime']}: {e['error']}" for e in report["errors"])
        )
    return EXIT_OK


def _parse_specs(texts: Sequence[str]) -> list[Any]:
    from edgerep.spec import parse_input_spec, validate_specs

    specs = [parse_input_spec(t) for t in texts]
    if specs:
        validate_specs(specs)
    return specs


def _merge_options(args: argparse.Namespace) -> tuple[list[Any], dict[str, Any] | None]:
    """The adapter sources and the options of `edgerep.merge` (None: no merge stage)."""
    from edgerep.merge import combine_methods, parse_adapter_spec

    sources = [parse_adapter_spec(t) for t in getattr(args, "adapter", [])]
    method, density = args.combine_method, args.density
    if method not in combine_methods():
        from edgerep.errors import did_you_mean

        raise ConfigError(
            f"unknown --combine-method {method!r};{did_you_mean(method, combine_methods())} "
            f"known: {', '.join(combine_methods())}"
        )
    options: dict[str, Any] = {"keep_zeros": args.keep_zeros}
    if args.command == "merge":  # merging is all `merge` does: a model without adapters is an error
        options["require_adapter"] = True
    if len(sources) > 1 or any(s.weight is not None for s in sources):
        options.update(
            combine={s.name or "default": 1.0 if s.weight is None else s.weight for s in sources},
            method=method,
            density=density,
            seed=0 if args.merge_seed is None else args.merge_seed,
        )
    elif method != "linear" or density is not None:
        raise ConfigError(
            "--combine-method and --density apply when combining adapters: give several "
            "--adapter NAME=PATH:WEIGHT (or one with a weight)"
        )
    wanted = sources or args.command == "merge"
    return sources, options if wanted else None


def _load(args: argparse.Namespace) -> tuple[Any, list[Any], dict[str, Any]]:
    """Check the output path, parse the specs, load the model; cheapest checks first."""
    from edgerep.bundle import check_output_dir
    from edgerep.source import INPUTS_ATTRIBUTE, load_model

    check_output_dir(args.out, overwrite=args.force)
    specs = _parse_specs(args.input)
    sources, args.merge_options = _merge_options(args) if hasattr(args, "adapter") else ([], None)
    model, description = load_model(args.source, weights=args.weights, task=args.task)
    if sources:
        model = _attach_adapters(model, sources, args, description)
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


def _attach_adapters(
    model: Any, sources: list[Any], args: argparse.Namespace, description: dict[str, Any]
) -> Any:
    from pathlib import Path

    from edgerep.bundle import sha256_file
    from edgerep.merge import load_adapters

    model = load_adapters(model, sources, lora_alpha=args.lora_alpha)
    rows = []
    for s in sources:
        path = Path(s.path).expanduser().resolve()
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        rows.append(
            {
                "name": s.name or "default",
                "path": str(path),
                "weight": s.weight,
                "sha256": {p.name: sha256_file(p) for p in files if p.suffix != ".md"},
            }
        )
    description["adapters"] = rows
    return model


def _show(result: Any, args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
        return
    merge_report = getattr(result, "merge_report", None)
    if merge_report is not None:
        print(merge_report.to_text())
        print()
    if result.fold_report is not None:
        print("fold report:")
        print(result.fold_report.to_text())
    else:
        print("fold: skipped (--no-fold)")
    print()
    if getattr(result, "prune", None) is not None:
        print(result.prune.to_text())
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


def _cmd_merge(args: argparse.Namespace) -> int:
    from edgerep.pipeline import merge_to_dir

    if merge_cli.handles(args):  # a checkpoint directory: merged on disk, shard by shard
        return merge_cli.run(args)
    model, specs, description = _load(args)
    _, result = merge_to_dir(
        model,
        specs,
        args.out,
        options=args.merge_options,
        fold=args.fold,
        overwrite=args.force,
        seed=args.seed,
        source=description,
    )
    _show(result, args)
    return EXIT_OK


def _formats_and_options(
    args: argparse.Namespace,
) -> tuple[list[str], dict[str, dict[str, str]]]:
    """``--to`` and ``--option``, checked before the model is loaded."""
    from edgerep.exporters import configure_exporter, parse_exporter_option, resolve_formats

    names = [f.strip() for item in (args.to or ["onnx"]) for f in item.split(",") if f.strip()]
    if not names:
        raise ConfigError("--to names no format; e.g. --to onnx (see `edgerep list`)")
    formats = resolve_formats(names)  # unknown names fail here
    options: dict[str, dict[str, str]] = {}
    for text in getattr(args, "option", []):
        fmt, key, value = parse_exporter_option(text)
        if fmt not in formats:
            raise ConfigError(
                f"--option {text!r} is for format {fmt!r}, which --to does not export "
                f"({', '.join(formats)})"
            )
        options.setdefault(fmt, {})[key] = value
    for fmt, opts in options.items():
        configure_exporter(fmt, opts)  # unknown options and bad values fail here
    return formats, options


def _cmd_export(args: argparse.Namespace) -> int:
    from edgerep.pipeline import convert

    formats, options = _formats_and_options(args)
    model, specs, description = _load(args)
    _, result = convert(
        model,
        specs,
        to=formats,
        out_dir=args.out,
        overwrite=args.force,
        fold=False,
        rtol=args.rtol,
        seed=args.seed,
        source=description,
        exporter_options=options,
        allow_nonfinite_reference=args.allow_nonfinite_reference,
    )
    _show(result, args)
    return EXIT_OK


def _cmd_convert(args: argparse.Namespace) -> int:
    from edgerep.bundle import check_output_dir
    from edgerep.pipeline import convert

    formats, options = _formats_and_options(args)
    prune_cli.check_convert_prune(args, formats)
    if args.quantize is not None:
        check_output_dir(args.out, overwrite=args.force)
    model, specs, description = _load(args)
    prune = prune_cli.convert_prune_options(args, specs, formats)
    if args.sweep:
        quantize = (
            None
            if args.quantize is None
            else _quant_setup(args, [s.to_dict() for s in specs], args.quantize, formats)
        )
        return prune_cli.run_convert_sweep(
            args, model, specs, description, formats, options, prune, quantize
        )
    if args.quantize is None:
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
            merge=args.merge_options,
            exporter_options=options,
            allow_nonfinite_reference=args.allow_nonfinite_reference,
            prune=prune,
        )
        _show(result, args)
        return prune_cli.exit_code(result.prune)
    quantize = _quant_setup(
        args, [s.to_dict() for s in specs], args.quantize, formats, with_model=True
    )
    return _convert_then_quantize(
        args, model, specs, description, formats, options, quantize, prune
    )


def _model_for_quantizers(
    args: argparse.Namespace, model: Any, specs: list[Any]
) -> tuple[Any, Any, list[Any]]:
    """(model, example inputs, specs) as the bundle's artifacts were exported: merged and
    folded like `convert` does, for quantizers that work on the PyTorch model."""
    from edgerep.spec import example_inputs

    example = example_inputs(specs, seed=args.seed)
    if args.merge_options is not None:
        from edgerep.merge import merge

        model, _ = merge(model, **args.merge_options)
    if args.no_fold:
        import copy

        return copy.deepcopy(model).eval(), example, specs
    from edgerep.fold import fold

    folded, _ = fold(model, example)
    return folded, example, specs


def _convert_then_quantize(
    args: argparse.Namespace,
    model: Any,
    specs: list[Any],
    description: dict[str, Any],
    formats: list[str],
    options: dict[str, Any],
    quantize: tuple[Any, list[str]],
    prune: Any = None,
) -> int:
    """Convert into a scratch bundle beside OUT, quantize it into OUT, drop the scratch."""
    import shutil

    from edgerep.bundle import private_dir
    from edgerep.pipeline import convert
    from edgerep.quantize import quantize_bundle

    data, backends = quantize
    torch_model = (
        _model_for_quantizers(args, model, specs)
        if "executorch" in backends and prune is None
        else None
    )
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = private_dir(out, "float")  # named for its owner: a killed run's is cleaned up
    try:
        _, result = convert(
            model,
            specs,
            to=formats,
            out_dir=scratch / "bundle",
            fold=not args.no_fold,
            rtol=args.rtol,
            seed=args.seed,
            source=description,
            merge=args.merge_options,
            exporter_options=options,
            allow_nonfinite_reference=args.allow_nonfinite_reference,
            prune=prune,
        )
        if "executorch" in backends and result.prune is not None:
            from edgerep.spec import example_inputs

            # the pruned model is what the bundle's artifacts were exported from
            torch_model = (result.prune.export_model, example_inputs(specs, seed=args.seed), specs)
        _, report = quantize_bundle(
            scratch / "bundle",
            out,
            data=data,
            backends=backends,
            mode=args.quantize,
            **_quant_options(args),
            model=torch_model,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        print(json.dumps({**result.to_dict(), "bundle": str(out), "quantize": report.to_dict()}))
        return prune_cli.exit_code(result.prune)
    result.bundle = out
    _show(result, args)
    print()
    print(report.to_text())
    return prune_cli.exit_code(result.prune)


def _installed(modules: Sequence[str]) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def _cmd_sign(args: argparse.Namespace) -> int:
    from edgerep.bundle import read_key_file, sign_bundle

    manifest = sign_bundle(args.bundle, read_key_file(args.key_file))
    if args.json:
        print(json.dumps({"bundle": args.bundle, "signature": manifest["signature"]}))
    else:
        print(f"signed {args.bundle} (hmac-sha256)")
    return EXIT_OK


def _cmd_list(args: argparse.Namespace) -> int:
    from edgerep.exporters import available_formats, get_exporter
    from edgerep.parity import REFERENCE_RUNTIMES, verified_by
    from edgerep.runtimes import available_runtimes, get_runtime

    formats: list[dict[str, Any]] = []
    for name in available_formats():
        e = get_exporter(name)
        # "installed" is about the exporter's packages; whether its runtime can verify
        # (or, for TensorRT, build) the artifact here is a separate question
        why = (
            get_runtime(e.runtime).unavailable_reason() if e.runtime in available_runtimes() else ""
        )
        # where the format's own runtime cannot run (Core ML off macOS), the parity check
        # uses its reference runtime (the ML Program evaluator) if that one can
        ref = REFERENCE_RUNTIMES.get(name, "") if why else ""
        if ref and (ref not in available_runtimes() or get_runtime(ref).unavailable_reason()):
            ref = ""
        formats.append(
            {
                "format": name,
                "installed": _installed(e.requires),
                "extra": e.extra,
                "runtime": e.runtime,
                "verified_here": not why or bool(ref),
                "verified_here_by": (ref or e.runtime) if not why or ref else "",
                "not_verified_reason": why,
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
                "unavailable_reason": rt.unavailable_reason(),
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
        if not f["installed"]:
            state = f"cannot export: pip install 'edgerep[{f['extra']}]'"
        elif f["verified_here"] and f["verified_here_by"] != f["runtime"]:
            state = (
                f"exports and verifies here with the {verified_by(f['verified_here_by'])}; "
                f"the {verified_by(f['runtime']) or f['runtime']} verifies where it runs, "
                f"cannot run here: {f['not_verified_reason']}"
            )
        elif f["verified_here"]:
            state = "exports and verifies here"
        else:
            state = f"exports here, cannot verify here: {f['not_verified_reason']}"
        by = f["verified_here_by"] or f["runtime"]
        print(f"  {f['format']:<12} verified with {by:<16} {state}")
    print("runtimes:")
    for r in runtimes:
        why = r["unavailable_reason"]
        state = f"cannot run here: {why}" if why else f"devices: {', '.join(r['devices']) or '-'}"
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
    # the flag lives until the exit code is decided; other libraries' chatter waits for -v
    with _interrupt.handle_signals(), quiet_third_party(args.verbose):
        return _dispatch(args)


def _dispatch(args: argparse.Namespace) -> int:
    """Run the command's handler and map what it raises to an exit code."""
    try:
        with warnings.catch_warnings():
            # torch's own pytree deprecation, raised from inside torch.export (save/load)
            warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
            return int(args.handler(args))
    except (KeyboardInterrupt, _interrupt.Terminated):
        return _interrupted()
    except EdgerepError as e:
        if _interrupt.received() is not None:
            return _interrupted()  # a backend turned the interrupt into its own error
        code = exit_code_for(e)
        if args.debug:
            traceback.print_exc()
        _report_error(e, code, args)
        return code
    except Exception as e:
        if _interrupt.received() is not None:
            return _interrupted()
        if args.debug:
            traceback.print_exc()
        _report_error(e, EXIT_INTERNAL, args)
        print(
            "edgerep: this is an internal error (a bug in edgerep, or an error it does not yet "
            "explain); rerun with --debug to see the traceback, and please report it",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def _interrupted() -> int:
    import signal

    signum = _interrupt.received() or signal.SIGINT
    print(
        f"edgerep: interrupted ({signal.Signals(signum).name}); nothing was written, earlier "
        "output left as it was",
        file=sys.stderr,
    )
    return _interrupt.exit_code(signum)


def _out_paths(argv: Sequence[str]) -> list[str]:
    """The values of ``-o``/``--out`` in `argv` (read without parsing the whole line)."""
    out = []
    for i, a in enumerate(argv):
        if a in ("-o", "--out") and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif a.startswith("--out="):
            out.append(a.split("=", 1)[1])
        elif a.startswith("-o") and len(a) > 2 and not a.startswith("--"):
            out.append(a[2:])
    return out


def run(argv: list[str] | None = None) -> int:
    """The ``edgerep`` command: `main` in a supervised child process.

    A backend that aborts the process on an interrupt (or crashes) takes only the
    child down; this process then removes the child's temporary directories next to
    ``-o OUT`` and restores an output the child was replacing, and exits 130/143
    after SIGINT/SIGTERM (see `edgerep._interrupt`).
    """
    args = list(sys.argv[1:] if argv is None else argv)

    def cleanup() -> None:
        from edgerep.bundle import remove_stale

        for out in _out_paths(args):
            try:
                remove_stale(out)
            except OSError as e:
                print(f"edgerep: could not clean up beside {out!r}: {e}", file=sys.stderr)

    return _interrupt.supervise(lambda: main(args), cleanup)
