"""The zoo's registries: short name -> training-time block or adapter class.

Both are plain dicts filled by a class decorator that refuses duplicate names;
lookups of unknown names raise `KeyError` with a "did you mean" suggestion.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

from edgerep.errors import ConfigError, did_you_mean

__all__ = ["BLOCKS", "get_block", "lookup", "register_block", "registrar"]

_M = TypeVar("_M", bound=type[nn.Module])


def registrar(table: dict[str, type[nn.Module]], kind: str) -> Callable[[str], Callable[[_M], _M]]:
    """A ``@register(name)`` class decorator that adds classes to `table`.

    Raises (when applied):
        ConfigError: if the name is already taken.
    """

    def register(name: str) -> Callable[[_M], _M]:
        def decorator(cls: _M) -> _M:
            if name in table:
                raise ConfigError(
                    f"a zoo {kind} named {name!r} is already registered "
                    f"({table[name].__module__}.{table[name].__qualname__}); "
                    f"register {cls.__qualname__} under another name"
                )
            table[name] = cls
            return cls

        return decorator

    return register


def lookup(table: dict[str, type[nn.Module]], kind: str) -> Callable[[str], type[nn.Module]]:
    """A ``get(name)`` for `table` that raises `KeyError` naming close matches."""

    def get(name: str) -> type[nn.Module]:
        try:
            return table[name]
        except KeyError:
            raise KeyError(
                f"unknown zoo {kind} {name!r}.{did_you_mean(name, table)} "
                f"Known {kind}s: {', '.join(sorted(table))}"
            ) from None

    return get


BLOCKS: dict[str, type[nn.Module]] = {}
"""Every registered zoo block, by short name (e.g. ``"repvgg"``)."""

register_block = registrar(BLOCKS, "block")
get_block = lookup(BLOCKS, "block")
