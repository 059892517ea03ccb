"""Choosing formats and setting exporter options by name (what ``--to`` and ``--option`` take).

Exporters are frozen dataclasses whose fields are their options; an option is set
by making a new exporter with `dataclasses.replace`, so registered exporters are
never mutated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from edgerep.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    from edgerep.exporters._base import Exporter

__all__ = ["ALL", "configure_exporter", "parse_exporter_option", "resolve_formats"]

#: the format name that stands for every registered format
ALL = "all"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def resolve_formats(names: Iterable[str]) -> list[str]:
    """Format names with ``"all"`` expanded and duplicates dropped, in order.

    ``"all"`` lists the built-in formats in their registry order (ONNX first: the
    reference graph of the others) and then any registered ones, sorted.

    Raises:
        ConfigError: an unknown format (with a did-you-mean).
    """
    from edgerep.exporters import _BUILTIN, available_formats, get_exporter

    out: list[str] = []
    for name in names:
        if name == ALL:
            out += [*_BUILTIN, *(f for f in available_formats() if f not in _BUILTIN)]
        else:
            get_exporter(name)
            out.append(name)
    return list(dict.fromkeys(out))


def _coerce(value: Any, current: Any, where: str) -> Any:
    if not isinstance(value, str):
        return value
    text = value.strip()
    if isinstance(current, bool):
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError as e:
            raise ConfigError(f"{where} must be an integer, got {value!r}") from e
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError as e:
            raise ConfigError(f"{where} must be a number, got {value!r}") from e
    if current is None:
        if text.lower() == "none":
            return None
        try:
            return int(text)
        except ValueError:
            return text
    return text


def configure_exporter(name: str, options: Mapping[str, Any] | None = None) -> Exporter:
    """The exporter registered for `name`, with `options` (field -> value) applied.

    String values are converted to the type of the option's default (``"true"`` for
    a bool, ``"3"`` for an int), as the CLI passes them.

    Raises:
        ConfigError: an unknown format or option (with a did-you-mean), or a bad value.
    """
    from edgerep.exporters import get_exporter

    exporter = get_exporter(name)
    if not options:
        return exporter
    if not dataclasses.is_dataclass(exporter) or isinstance(exporter, type):
        raise ConfigError(f"the {name!r} exporter takes no options, got {sorted(options)}")
    fields = {f.name: f for f in dataclasses.fields(exporter) if f.init}
    values = {}
    for key, value in options.items():
        if key not in fields:
            allowed = ", ".join(fields) or "(none)"
            raise ConfigError(
                f"unknown option {key!r} for the {name!r} exporter;"
                f"{did_you_mean(key, fields)} allowed: {allowed}"
            )
        values[key] = _coerce(value, getattr(exporter, key), f"option {name}.{key}")
    return dataclasses.replace(exporter, **values)


def parse_exporter_option(text: str) -> tuple[str, str, str]:
    """Split ``FORMAT.KEY=VALUE`` (the CLI's ``--option``).

    Raises:
        ConfigError: the text does not have that form.
    """
    head, sep, value = text.partition("=")
    fmt, dot, key = head.strip().partition(".")
    if not sep or not dot or not fmt or not key:
        raise ConfigError(
            f"bad exporter option {text!r}; write FORMAT.KEY=VALUE, e.g. "
            "openvino.compress_to_fp16=true or coreml.minimum_deployment_target=iOS18"
        )
    return fmt, key.strip(), value
