"""Hugging Face model directories as model sources (local files only, never the network).

A directory with ``config.json`` (and safetensors weights) is loaded with the
``transformers`` Auto class of the task, ``local_files_only=True``, in eval mode,
and wrapped so that its forward takes the task's one input tensor and returns one
tensor (``return_dict=False``, first output; no KV cache for causal LMs). Default
input specs come from the config: ``pixel_values:1xCxSxS`` for vision tasks,
``input_ids:1xL[1..16..P]:int64`` for text tasks (``L`` symbolic, ``P`` the
config's maximum positions).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgerep.errors import ConfigError, MissingDependencyError, SourceError, did_you_mean

__all__ = ["TASKS", "is_hf_dir", "load_hf"]


@dataclass(frozen=True)
class _Task:
    auto: str  # transformers Auto class
    inputs: str  # 'text' or 'image'


TASKS: dict[str, _Task] = {
    "feature-extraction": _Task("AutoModel", "text"),
    "text-classification": _Task("AutoModelForSequenceClassification", "text"),
    "token-classification": _Task("AutoModelForTokenClassification", "text"),
    "causal-lm": _Task("AutoModelForCausalLM", "text"),
    "masked-lm": _Task("AutoModelForMaskedLM", "text"),
    "image-classification": _Task("AutoModelForImageClassification", "image"),
    "image-feature-extraction": _Task("AutoModel", "image"),
}


def is_hf_dir(path: str | Path) -> bool:
    """A local directory holding a Hugging Face ``config.json``."""
    p = Path(path).expanduser()
    return p.is_dir() and (p / "config.json").is_file()


def _torch_module() -> Any:
    import torch
    from torch import nn

    class HFModel(nn.Module):
        """A transformers model whose forward takes one tensor and returns one tensor."""

        def __init__(self, model: nn.Module, input_name: str, extra: dict[str, Any]) -> None:
            super().__init__()
            self.model = model
            self.input_name = input_name
            self.extra = extra

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.model(**{self.input_name: x}, return_dict=False, **self.extra)
            return out[0] if isinstance(out, tuple | list) else out

    return HFModel


def load_hf(path: str | Path, *, task: str | None) -> tuple[Any, dict[str, Any]]:
    """Load a local Hugging Face model directory for `task` (default: feature-extraction).

    Raises:
        ConfigError: an unknown task.
        SourceError: transformers cannot load the directory (missing weights, an
            architecture this transformers does not know, ...).
    """
    name = task or "feature-extraction"
    if name not in TASKS:
        raise ConfigError(
            f"unknown --task {name!r};{did_you_mean(name, TASKS)} known: {', '.join(TASKS)}"
        )
    spec = TASKS[name]
    try:
        import transformers
    except ImportError as e:
        raise MissingDependencyError("transformers", "peft", "Hugging Face sources") from e
    root = Path(path).expanduser().resolve()
    try:
        config = transformers.AutoConfig.from_pretrained(str(root), local_files_only=True)
        auto = getattr(transformers, spec.auto)
        model = auto.from_pretrained(str(root), local_files_only=True).eval()
    except (OSError, ValueError, KeyError) as e:
        raise SourceError(
            f"transformers cannot load {str(root)!r} as {spec.auto} (task {name!r}): {e}"
        ) from e
    extra: dict[str, Any] = {"use_cache": False} if name == "causal-lm" else {}
    if spec.inputs == "image":
        channels = int(getattr(config, "num_channels", 3))
        size = getattr(config, "image_size", 224)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        inputs = [f"pixel_values:1x{channels}x{h}x{w}"]
        input_name = "pixel_values"
    else:
        positions = int(getattr(config, "max_position_embeddings", 512) or 512)
        inputs = [f"input_ids:1xL[1..{min(16, positions)}..{positions}]:int64"]
        input_name = "input_ids"
    wrapped = _torch_module()(model, input_name, extra).eval()
    description = {
        "kind": "huggingface-dir",
        "path": str(root),
        "task": name,
        "architecture": type(model).__name__,
        "class": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "inputs": inputs,
    }
    return wrapped, description
