"""JSON helpers shared by the manifest, the pipeline's reports and the bench reports."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["finite", "schema_problems"]


def finite(value: Any) -> Any:
    """`value` with NaN and infinities replaced by None, recursively (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def schema_problems(
    instance: Any, schema: Mapping[str, Any], by_hand: Callable[[Any], list[str]]
) -> list[str]:
    """Problems with `instance` against a JSON schema (empty when valid).

    Uses jsonschema when it is installed (it is optional), else `by_hand`, which
    checks at least the required keys.
    """
    try:
        import jsonschema
    except ImportError:
        return by_hand(instance)
    validator = jsonschema.Draft202012Validator(schema)
    return [
        f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    ]
