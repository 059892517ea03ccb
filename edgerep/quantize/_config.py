"""Reading quantization configs back from JSON: one check for every config type."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import fields
from typing import Any

from edgerep.errors import ConfigError, did_you_mean

__all__ = ["config_values"]


def config_values(
    cls: type,
    data: Mapping[str, Any],
    what: str,
    *,
    versions: Collection[int | None] = (None, 1),
    known: Collection[str] | None = None,
) -> dict[str, Any]:
    """`data` as keyword arguments of `cls`, after checking its keys and version.

    Args:
        cls: the config dataclass.
        data: a dictionary written by the config's ``to_dict`` (or by hand).
        what: how the message names the config, e.g. ``"OpenVINO quantization"``.
        versions: the ``version`` values this edgerep reads (None: absent).
        known: the keys allowed (default: the dataclass fields).

    Raises:
        ConfigError: unknown keys (with "did you mean" hints) or an unreadable version.
    """
    names = set(known) if known is not None else {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    version = data.get("version")
    if unknown or version not in versions:
        readable = sorted(v for v in versions if v is not None)
        hints = "".join(did_you_mean(k, names) for k in unknown)
        raise ConfigError(
            f"cannot read {what} config {dict(data)!r}: unknown keys {unknown} or version "
            f"{version!r} (this edgerep reads version{'s' if len(readable) > 1 else ''} "
            f"{' and '.join(map(str, readable))}).{hints}"
        )
    return dict(data)
