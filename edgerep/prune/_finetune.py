"""The optional ``--finetune file.py:fn`` hook: ``fn(model, data) -> model``, after pruning.

edgerep never needs it (recovery is solved without training); users who can train
pass a function that gets the pruned model and a `FinetuneData` (the calibration
inputs and labels, and the unpruned model as a teacher for distillation) and
returns the fine-tuned model. The result must keep the pruned structure (same
state_dict names and shapes, finite values), because the bundle saves it as the
plan plus a plain state_dict.
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgerep.errors import ConfigError, SourceError

__all__ = ["FinetuneData", "FinetuneRecord", "load_finetune", "run_finetune"]

Finetune = Callable[[nn.Module, "FinetuneData"], nn.Module]


@dataclass(frozen=True)
class FinetuneData:
    """What the fine-tune function gets besides the model.

    Attributes:
        inputs: the calibration inputs, batched, one tensor per model input.
        labels: their labels, or None when the data has none.
        teacher: a copy of the unpruned model (eval mode) for distillation.
        names: the model's input names, in order.
    """

    inputs: tuple[torch.Tensor, ...]
    labels: torch.Tensor | None
    teacher: nn.Module
    names: tuple[str, ...] = ()


@dataclass(frozen=True)
class FinetuneRecord:
    """What the fine-tune did: where it came from, how long it ran."""

    function: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"function": self.function, "seconds": self.seconds}


def load_finetune(text: str) -> tuple[Finetune, str]:
    """The function named by ``path/to/file.py:fn``, checked before any work.

    Raises:
        ConfigError: not of the form FILE.py:FN, or the file does not exist.
        SourceError: the file fails to import or has no such callable.
    """
    from edgerep.source import _callables

    path_text, sep, name = str(text).rpartition(":")
    path = Path(path_text).expanduser()
    if not sep or not name or path.suffix != ".py":
        raise ConfigError(
            f"--finetune {text!r} is not FILE.py:FUNCTION; e.g. --finetune train.py:finetune, "
            "where finetune(model, data) returns the fine-tuned model"
        )
    if not path.is_file():
        raise ConfigError(f"--finetune file {str(path)!r} does not exist")
    resolved = path.resolve()
    module = _import_once(str(resolved), resolved.stat().st_mtime_ns)
    fn = vars(module).get(name)
    if not callable(fn):
        raise SourceError(
            f"{str(path)!r} has no function {name!r}; callables in the file: "
            f"{', '.join(_callables(module)) or '(none)'}"
        )
    return fn, f"{path}:{name}"


@functools.lru_cache(maxsize=8)
def _import_once(path: str, mtime_ns: int) -> Any:
    """The file imported once per version: checked early, called later, run once."""
    from edgerep.source import _import_file

    return _import_file(Path(path))


def _signature(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def run_finetune(
    fn: Finetune, label: str, model: nn.Module, data: FinetuneData
) -> tuple[nn.Module, FinetuneRecord]:
    """``fn(copy of model, data)``, checked: an nn.Module with the same structure and finite
    weights, in eval mode.

    Raises:
        SourceError: the function raised, or returned something that cannot replace
            the pruned model (the message says what).
    """
    work = copy.deepcopy(model).train()
    start = time.perf_counter()
    try:
        got = fn(work, data)
    except Exception as e:
        raise SourceError(
            f"the fine-tune function {label} failed: {type(e).__name__}: {e}; fix it (run with "
            "--debug for the traceback) or drop --finetune (pruning needs no fine-tuning)"
        ) from e
    seconds = time.perf_counter() - start
    if not isinstance(got, nn.Module):
        raise SourceError(
            f"the fine-tune function {label} returned a {type(got).__name__}; it must return "
            "the fine-tuned model (a torch.nn.Module)"
        )
    want, have = _signature(model), _signature(got)
    if want != have:
        diff = sorted(set(want) ^ set(have)) or [k for k in want if want[k] != have[k]]
        raise SourceError(
            f"the fine-tune function {label} changed the pruned model's structure "
            f"({', '.join(diff[:5])}{' ...' if len(diff) > 5 else ''}); it may change weights, "
            "not layers, names, shapes or dtypes (the bundle saves the plan plus a state_dict)"
        )
    bad = [
        k
        for k, v in got.state_dict().items()
        if v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]
    if bad:
        raise SourceError(
            f"the fine-tune function {label} returned non-finite weights in {', '.join(bad[:5])}; "
            "lower its learning rate or check its loss"
        )
    return got.eval(), FinetuneRecord(label, seconds)
