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
        metavar="CKPT",
        help="fine-tuned checkpoints to merge into SRC, the base (each a safetensors checkpoint "
        "directory, one .safetensors file or a .pt/.pth/.bin state dict): model soups, task "
        "arithmetic, TIES, DARE, DELLA, Breadcrumbs with --method/--weights/--density/--seed; "
        "writes a checkpoint directory",
    )


def handles(args: argparse.Namespace) -> bool:
    """Whether this ``merge`` call is a checkpoint merge (SRC is a checkpoint directory)."""
    from edgerep.merge._checkpoint import is_checkpoint_dir

    return bool(getattr(args, "models", None)) or is_checkpoint_dir(args.source)


def _weights(text: str | None, n: int) -> list[float] | None:
    if text is None:
        return None
    if Path(text).expanduser().is_file():
        raise ConfigError(
            f"--weights {text!r} is a file, but with --models --weights takes one number per "
            "model, comma-separated (e.g. --weights 0.5,0.3,0.2); a state-dict file applies to a "
            "file.py:factory SRC, and a fine-tuned state dict goes in --models"
        )
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
        is_checkpoint,
        is_checkpoint_dir,
        merge_adapter_checkpoint,
        merge_checkpoints,
    )

    _refuse(args)
    if not (is_checkpoint(args.source) if args.models else is_checkpoint_dir(args.source)):
        raise ConfigError(
            f"--models merges checkpoints, but SRC {args.source!r} is not one: give a checkpoint "
            "directory (model.safetensors or model.safetensors.index.json), one .safetensors "
            "file or a .pt/.pth/.bin state dict"
        )
    report: Any
    if args.models:
        if args.adapter:
            raise ConfigError("give either --adapter or --models, not both")
        # --merge-seed (DARE's/DELLA's masks) wins over --seed, even when it is 0
        seed = args.merge_seed if args.merge_seed is not None else args.seed
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
