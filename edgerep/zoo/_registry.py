"""The zoo's block registry: short name -> training-time block class."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

from edgerep.errors import ConfigError, did_you_mean

__all__ = ["BLOCKS", "get_block", "register_block"]

BLOCKS: dict[str, type[nn.Module]] = {}
"""Every registered zoo block, by short name (e.g. ``"repvgg"``)."""

_M = TypeVar("_M", bound=type[nn.Module])


def register_block(name: str) -> Callable[[_M], _M]:
    """Class decorator that registers a block under `name`.

    Args:
        name: the short name; must not be registered already.

    Returns:
        A decorator that adds the class to `BLOCKS` and returns it unchanged.

    Raises:
        ConfigError: if `name` is already taken (when the decorator is applied).
    """

    def decorator(cls: _M) -> _M:
        if name in BLOCKS:
            raise ConfigError(
                f"a zoo block named {name!r} is already registered "
                f"({BLOCKS[name].__module__}.{BLOCKS[name].__qualname__}); "
                f"register {cls.__qualname__} under another name"
            )
        BLOCKS[name] = cls
        return cls

    return decorator


def get_block(name: str) -> type[nn.Module]:
    """Return the block class registered under `name`.

    Raises:
        KeyError: if no block has that name; the message suggests close names.
    """
    try:
        return BLOCKS[name]
    except KeyError:
        raise KeyError(
            f"unknown zoo block {name!r}.{did_you_mean(name, BLOCKS)} "
            f"Known blocks: {', '.join(sorted(BLOCKS))}"
        ) from None
