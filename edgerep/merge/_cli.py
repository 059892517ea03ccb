"""The ``edgerep merge`` arguments and handler for checkpoints on disk (`_checkpoint`).

``edgerep merge HF_DIR --adapter PEFT_DIR -o OUT_DIR`` merges a PEFT adapter into
a Hugging Face safetensors checkpoint shard by shard; ``edgerep merge BASE_DIR
--models A B C --method ties --density 0.5 --weights 0.5,0.3,0.2 --seed 0 -o OUT``
merges full fine-tuned checkpoints. Both write a checkpoint directory (same shards,
index and config), not a ``.pt2`` bundle. `edgerep.cli` keeps the verb; this module
owns what is specific to checkpoints, so the spine stays short.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from edgerep.errors import ConfigError

__all__ = ["add_arguments", "handles", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options only checkpoint merges take (added to the ``merge`` verb)."""
    parser.add_argument(
        "--models",
        nargs="+",
        default=[],
        metavar="DIR",
        help="fine-tuned checkpoint directories to merge into SRC (a checkpoint directory): "
        "model soups, task arithmetic, TIES, DARE with --method/--weights/--density",
    )


def handles(args: argparse.Namespace) -> bool:
    """Whether this ``merge`` call is a checkpoint merge (SRC is a checkpoint directory)."""
    from edgerep.merge._checkpoint import is_checkpoint_dir

    return bool(getattr(args, "models", None)) or is_checkpoint_dir(args.source)


def _weights(text: str | None, n: int) -> list[float] | None:
    if text is None:
        return None
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError as e:
        raise ConfigError(
            f"--weights {text!r}: a checkpoint merge takes one number per model, comma-separated, "
            "e.g. --weights 0.5,0.3,0.2"
        ) from e
    if len(weights) != n:
        raise ConfigError(f"--weights {text!r} gives {len(weights)} weight(s) for {n} model(s)")
    return weights


def _refuse(args: argparse.Namespace) -> None:
    ignored = {
        "--input": bool(args.input),
        "--fold": bool(getattr(args, "fold", False)),
        "--keep-zeros": bool(args.keep_zeros),
        "--lora-alpha": args.lora_alpha is not None,
        "--task": getattr(args, "task", None) is not None,
    }
    given = [k for k, v in ignored.items() if v]
    if given:
        raise ConfigError(
            f"{', '.join(given)} do not apply to a checkpoint merge (SRC {args.source!r} is a "
            "checkpoint directory; the output is a checkpoint directory too); drop them"
        )


def run(args: argparse.Namespace) -> int:
    """Merge checkpoints as `args` says; print the report; return the exit code."""
    from edgerep.merge._checkpoint import (
        is_checkpoint_dir,
        merge_adapter_checkpoint,
        merge_checkpoints,
    )

    _refuse(args)
    if not is_checkpoint_dir(args.source):
        raise ConfigError(
            f"--models merges checkpoint directories, but SRC {args.source!r} is not one "
            "(config.json with model.safetensors or model.safetensors.index.json)"
        )
    report: Any
    if args.models:
        if args.adapter:
            raise ConfigError("give either --adapter or --models, not both")
        seed = args.merge_seed if args.merge_seed else args.seed
        report = merge_checkpoints(
            args.source,
            args.models,
            args.out,
            method=args.combine_method,
            weights=_weights(args.weights, len(args.models)),
            density=args.density,
            seed=seed,
            overwrite=args.force,
        )
    else:
        if len(args.adapter) != 1 or any(c in args.adapter[0] for c in "=") or args.weights:
            raise ConfigError(
                "a checkpoint merge takes exactly one --adapter PEFT_DIR (no NAME=PATH:WEIGHT, "
                "no --weights); to combine adapters, merge them in memory from a model source"
            )
        if args.combine_method != "linear" or args.density is not None:
            raise ConfigError("--method/--density apply to --models merges, not to one adapter")
        report = merge_adapter_checkpoint(
            args.source, Path(args.adapter[0]), args.out, overwrite=args.force
        )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(report.to_text())
        print(f"checkpoint: {report.out}")
    return 0
