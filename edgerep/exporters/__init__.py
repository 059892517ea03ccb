"""Exporters: one module per format behind the `Exporter` protocol, found by name.

Built-in formats are listed in `_BUILTIN` as ``"module:attribute"`` and imported on
first use, so importing this package imports no SDK. Third-party formats call
`register_exporter`.
"""

from __future__ import annotations

import importlib

from edgerep.errors import ConfigError, did_you_mean
from edgerep.exporters._base import (
    Artifact,
    Exporter,
    Problem,
    TensorInfo,
    export_program,
    package_versions,
)
from edgerep.exporters._options import (
    ALL,
    configure_exporter,
    parse_exporter_option,
    resolve_formats,
)

__all__ = [
    "ALL",
    "Artifact",
    "Exporter",
    "Problem",
    "TensorInfo",
    "available_formats",
    "configure_exporter",
    "export_program",
    "get_exporter",
    "package_versions",
    "parse_exporter_option",
    "register_exporter",
    "resolve_formats",
]

# format -> "module:attribute" of a class constructed with no arguments
_BUILTIN: dict[str, str] = {
    "onnx": "edgerep.exporters.onnx:OnnxExporter",
    "openvino": "edgerep.exporters.openvino:OpenVinoExporter",
    "coreml": "edgerep.exporters.coreml:CoreMLExporter",
    "tensorrt": "edgerep.exporters.tensorrt:TensorRTExporter",
    "executorch": "edgerep.exporters.executorch:ExecuTorchExporter",
}

_REGISTRY: dict[str, Exporter] = {}


def register_exporter(exporter: Exporter, *, replace: bool = False) -> None:
    """Register `exporter` under its ``format`` name.

    Args:
        exporter: an object implementing `Exporter`.
        replace: allow replacing an exporter already registered under that name.

    Raises:
        ConfigError: the name is taken (by a registered or built-in exporter) and
            `replace` is False.
    """
    name = exporter.format
    if name == ALL:
        raise ConfigError(f"{ALL!r} stands for every format and cannot name an exporter")
    if not replace and (name in _REGISTRY or name in _BUILTIN):
        raise ConfigError(
            f"an exporter for format {name!r} is already registered; pass replace=True to "
            "replace it, or choose another format name"
        )
    _REGISTRY[name] = exporter


def _load_builtin(name: str) -> Exporter:
    module_name, _, attr = _BUILTIN[name].partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    exporter: Exporter = cls()
    _REGISTRY[name] = exporter
    return exporter


def get_exporter(name: str) -> Exporter:
    """The exporter registered for format `name`.

    Raises:
        ConfigError: no such format (with a did-you-mean and the list of formats).
    """
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _BUILTIN:
        return _load_builtin(name)
    formats = available_formats()
    raise ConfigError(
        f"unknown export format {name!r};{did_you_mean(name, formats)} available: "
        f"{', '.join(formats)}"
    )


def available_formats() -> list[str]:
    """Names of all registered and built-in formats, sorted."""
    return sorted(set(_REGISTRY) | set(_BUILTIN))
