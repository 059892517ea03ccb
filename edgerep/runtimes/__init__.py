"""Runtimes: one module per inference engine behind the `Runtime` protocol, found by name.

Built-in runtimes are listed in `_BUILTIN` and imported on first use; their engines
(onnxruntime, torch, ...) are imported only when a session is loaded.
"""

from __future__ import annotations

import importlib

from edgerep.errors import ConfigError, did_you_mean
from edgerep.runtimes._base import Runtime, Session, check_feeds

__all__ = [
    "Runtime",
    "Session",
    "available_runtimes",
    "check_feeds",
    "get_runtime",
    "register_runtime",
]

# name -> "module:attribute" of a class constructed with no arguments
_BUILTIN: dict[str, str] = {
    "onnxruntime": "edgerep.runtimes.ort:OrtRuntime",
    "torch": "edgerep.runtimes.torch_eager:TorchEagerRuntime",
    "openvino": "edgerep.runtimes.openvino:OpenVinoRuntime",
    "coreml": "edgerep.runtimes.coreml:CoreMLRuntime",
    "coreml-reference": "edgerep.runtimes.coreml_reference:CoreMLReferenceRuntime",
    "tensorrt": "edgerep.runtimes.tensorrt:TensorRTRuntime",
    "executorch": "edgerep.runtimes.executorch:ExecuTorchRuntime",
}

_REGISTRY: dict[str, Runtime] = {}


def register_runtime(runtime: Runtime, *, replace: bool = False) -> None:
    """Register `runtime` under its ``name``.

    Raises:
        ConfigError: the name is taken and `replace` is False.
    """
    name = runtime.name
    if not replace and (name in _REGISTRY or name in _BUILTIN):
        raise ConfigError(
            f"a runtime named {name!r} is already registered; pass replace=True to replace it, "
            "or choose another name"
        )
    _REGISTRY[name] = runtime


def get_runtime(name: str) -> Runtime:
    """The runtime registered as `name`.

    Raises:
        ConfigError: no such runtime (with a did-you-mean and the list of runtimes).
    """
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _BUILTIN:
        module_name, _, attr = _BUILTIN[name].partition(":")
        runtime: Runtime = getattr(importlib.import_module(module_name), attr)()
        _REGISTRY[name] = runtime
        return runtime
    names = available_runtimes()
    raise ConfigError(
        f"unknown runtime {name!r};{did_you_mean(name, names)} available: {', '.join(names)}"
    )


def available_runtimes() -> list[str]:
    """Names of all registered and built-in runtimes (installed or not), sorted."""
    return sorted(set(_REGISTRY) | set(_BUILTIN))
