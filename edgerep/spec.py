"""Input specifications: names, shapes with symbolic dims, dtypes, and example tensors.

The text form, as the CLI takes it with ``--input``::

    NAME:SHAPE[:DTYPE]

    x:1x3x224x224              a fixed shape, float32
    x:Nx3x224x224              N is symbolic (dynamic); its example value is 1
    x:N[1..64]x3x224x224       N ranges over 1..64; example value 1 (the min)
    x:N[1..8..64]x3xHxW        N: min 1, opt 8, max 64; H and W symbolic
    ids:1x16:int64             an integer input

A symbol's example value is its ``opt`` (1 when no range is given). The same
symbol in several inputs names the same dimension.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgerep.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    import torch

__all__ = [
    "DTYPES",
    "SPEC_VERSION",
    "DimRange",
    "InputSpec",
    "ShapeProfile",
    "bounded_max",
    "example_inputs",
    "parse_input_spec",
    "resolve_dims",
    "shape_profiles",
    "symbol_ranges",
    "torch_dynamic_shapes",
    "validate_specs",
    "with_bounded_ranges",
]

SPEC_VERSION = 1

#: dtype name -> (torch attribute, is integer-like)
DTYPES: dict[str, tuple[str, bool]] = {
    "float32": ("float32", False),
    "float16": ("float16", False),
    "bfloat16": ("bfloat16", False),
    "float64": ("float64", False),
    "int64": ("int64", True),
    "int32": ("int32", True),
    "int16": ("int16", True),
    "int8": ("int8", True),
    "uint8": ("uint8", True),
    "bool": ("bool", True),
}

#: the most elements an example input may have (runtimes index with 32-bit integers)
MAX_EXAMPLE_ELEMENTS = 2**31 - 1

_FORM = "NAME:SHAPE[:DTYPE], e.g. x:1x3x224x224, x:Nx3x224x224, x:N[1..8..64]x3x224x224 or ids:1x16:int64"
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
# 'x' separates dims, so symbols cannot contain it (upper-case 'X' is fine)
_SYMBOL_RE = re.compile(r"^[A-Za-wyz_][A-Za-wyz0-9_]*$")
_DIM_RE = re.compile(r"^(?P<sym>[A-Za-wyz_][A-Za-wyz0-9_]*)\[(?P<range>[^\]]*)\]$")


@dataclass(frozen=True)
class DimRange:
    """The range of one symbolic dimension.

    Attributes:
        name: the symbol, e.g. ``"N"``.
        min: smallest value the exported graph must accept.
        opt: the value used for example inputs (and optimization profiles).
        max: largest value, or None for unbounded.
    """

    name: str
    min: int = 1
    opt: int = 1
    max: int | None = None

    def __post_init__(self) -> None:
        if not _SYMBOL_RE.match(self.name):
            raise ConfigError(
                f"symbolic dimension name {self.name!r} is not valid; use letters, digits "
                "and '_' but no lower-case 'x' (it separates dims), e.g. N or batch"
            )
        hi = self.max if self.max is not None else self.opt
        if not (1 <= self.min <= self.opt <= hi):
            raise ConfigError(
                f"range of {self.name!r} must satisfy 1 <= min <= opt <= max, got "
                f"min={self.min}, opt={self.opt}, max={self.max} (a dim of 0 makes empty "
                "inputs, on which parity compares nothing)"
            )

    @property
    def is_default(self) -> bool:
        """True when the range is the implicit one of a bare symbol."""
        return (self.min, self.opt, self.max) == (1, 1, None)

    def to_text(self) -> str:
        """The ``N[min..opt..max]`` form (just ``N`` for the default range)."""
        if self.is_default:
            return self.name
        hi = "" if self.max is None else str(self.max)
        return f"{self.name}[{self.min}..{self.opt}..{hi}]"


@dataclass(frozen=True)
class InputSpec:
    """One model input.

    Attributes:
        name: input name; becomes the input name of exported graphs.
        shape: one entry per dim, an int or a symbol name for a dynamic dim.
        dtype: one of `DTYPES`.
        ranges: ranges of the symbolic dims that are not the default (min 1, opt 1,
            unbounded); a symbol without an entry has the default range.
    """

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"
    ranges: tuple[DimRange, ...] = field(default=())

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ConfigError(
                f"input name {self.name!r} is not valid; use letters, digits, '_' and '.', "
                f"starting with a letter or '_' ({_FORM})"
            )
        object.__setattr__(self, "shape", tuple(self.shape))
        object.__setattr__(self, "ranges", tuple(self.ranges))
        for d in self.shape:
            if isinstance(d, bool) or not isinstance(d, int | str):
                raise ConfigError(f"input {self.name!r}: dim {d!r} must be an int or a symbol")
            if isinstance(d, int) and d < 1:
                raise ConfigError(
                    f"input {self.name!r}: dim {d} in shape {'x'.join(map(str, self.shape))} "
                    "must be >= 1; an empty input makes every parity check compare 0 elements "
                    "and prove nothing (for a dynamic dim write a symbol, e.g. N[1..8])"
                )
            if isinstance(d, str) and not _SYMBOL_RE.match(d):
                raise ConfigError(
                    f"input {self.name!r}: symbol {d!r} is not valid; use letters, digits and "
                    "'_' but no lower-case 'x' (it separates dims), e.g. N or batch"
                )
        if self.dtype not in DTYPES:
            raise ConfigError(
                f"input {self.name!r}: unknown dtype {self.dtype!r};"
                f"{did_you_mean(self.dtype, DTYPES)} allowed: {', '.join(DTYPES)}"
            )
        symbols = self.symbols
        for r in self.ranges:
            if r.name not in symbols:
                raise ConfigError(
                    f"input {self.name!r}: range given for {r.name!r}, which is not a dim of "
                    f"shape {'x'.join(map(str, self.shape))}"
                )
        if len({r.name for r in self.ranges}) != len(self.ranges):
            raise ConfigError(f"input {self.name!r}: a symbol has more than one range")
        # canonical order (order of appearance) so that equal specs compare equal
        ranges = sorted(self.ranges, key=lambda r: symbols.index(r.name))
        object.__setattr__(self, "ranges", tuple(ranges))
        self._check_size()

    def _check_size(self) -> None:
        """Refuse shapes whose example tensor cannot be allocated or indexed."""
        elements = math.prod(self.example_shape())
        if elements > MAX_EXAMPLE_ELEMENTS:
            raise ConfigError(
                f"input {self.name!r}: shape {self.shape_text()} has {elements:,} elements at its "
                f"example size, above the {MAX_EXAMPLE_ELEMENTS:,} edgerep accepts (2**31 - 1: "
                "runtimes index tensors with 32-bit integers, and edgerep runs the model on "
                "several such inputs); check the dims for a typo"
            )
        bounded = [
            d if isinstance(d, int) else (self.range_of(d).max or self.range_of(d).opt)
            for d in self.shape
        ]
        if math.prod(bounded) > MAX_EXAMPLE_ELEMENTS * 1024:
            raise ConfigError(
                f"input {self.name!r}: the largest shape the ranges of {self.shape_text()} allow "
                f"has {math.prod(bounded):,} elements; no runtime can hold it: lower the maxima"
            )

    @property
    def symbols(self) -> tuple[str, ...]:
        """The symbolic dims, in order of first appearance."""
        return tuple(dict.fromkeys(d for d in self.shape if isinstance(d, str)))

    @property
    def is_integer(self) -> bool:
        """True for integer and bool dtypes."""
        return DTYPES[self.dtype][1]

    def range_of(self, symbol: str) -> DimRange:
        """The range of `symbol` (the default range if none was given)."""
        for r in self.ranges:
            if r.name == symbol:
                return r
        if symbol not in self.symbols:
            raise ConfigError(f"input {self.name!r} has no symbolic dim {symbol!r}")
        return DimRange(symbol)

    def example_shape(self, dims: Mapping[str, int] | None = None) -> tuple[int, ...]:
        """The concrete shape: symbols take `dims[symbol]`, else their opt value."""
        dims = dims or {}
        return tuple(
            d if isinstance(d, int) else int(dims.get(d, self.range_of(d).opt)) for d in self.shape
        )

    def shape_text(self) -> str:
        """The shape in the CLI form, ranges included."""
        out = []
        for d in self.shape:
            out.append(self.range_of(d).to_text() if isinstance(d, str) else str(d))
        return "x".join(out)

    def to_text(self) -> str:
        """The CLI form; `parse_input_spec(spec.to_text()) == spec`."""
        suffix = "" if self.dtype == "float32" else f":{self.dtype}"
        return f"{self.name}:{self.shape_text()}{suffix}"

    def __str__(self) -> str:
        return self.to_text()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dictionary with a ``version`` field."""
        d: dict[str, Any] = {
            "version": SPEC_VERSION,
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
        }
        if self.ranges:
            d["ranges"] = {r.name: {"min": r.min, "opt": r.opt, "max": r.max} for r in self.ranges}
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputSpec:
        """Inverse of `to_dict`.

        Raises:
            ConfigError: if the version is unknown or a field is malformed.
        """
        version = data.get("version")
        if version != SPEC_VERSION:
            raise ConfigError(
                f"input spec version {version!r} is not supported (this edgerep reads "
                f"version {SPEC_VERSION}); re-create the spec with this version"
            )
        try:
            ranges = tuple(
                DimRange(
                    k, int(v["min"]), int(v["opt"]), None if v["max"] is None else int(v["max"])
                )
                for k, v in dict(data.get("ranges") or {}).items()
            )
            return cls(
                name=str(data["name"]),
                shape=tuple(d if isinstance(d, str) else int(d) for d in data["shape"]),
                dtype=str(data.get("dtype", "float32")),
                ranges=ranges,
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(
                f"malformed input spec {dict(data)!r}: {e}; expected keys version, name, "
                "shape, dtype and optionally ranges"
            ) from e

    def to_json(self) -> str:
        """`to_dict` as a JSON string."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> InputSpec:
        """Inverse of `to_json`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"input spec is not valid JSON: {e}: {text[:200]!r}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"input spec JSON must be an object, got {type(data).__name__}")
        return cls.from_dict(data)


def _parse_range(sym: str, body: str, text: str) -> DimRange:
    parts = body.split("..")
    if (
        len(parts) in (2, 3)
        and all(re.fullmatch(r"\d+", p) for p in parts[:-1])
        and (parts[-1] == "" or re.fullmatch(r"\d+", parts[-1]))
    ):
        hi = int(parts[-1]) if parts[-1] else None
        lo = int(parts[0])
        opt = int(parts[1]) if len(parts) == 3 else max(lo, 1)
        try:
            return DimRange(sym, lo, opt, hi)
        except ConfigError as e:
            raise ConfigError(f"bad input spec {text!r}: {e}") from e
    raise ConfigError(
        f"bad range {sym}[{body}] in input spec {text!r}; write {sym}[MIN..MAX] or "
        f"{sym}[MIN..OPT..MAX], e.g. {sym}[1..8..64]"
    )


def parse_input_spec(text: str) -> InputSpec:
    """Parse the CLI form ``NAME:SHAPE[:DTYPE]`` (see the module docstring).

    Raises:
        ConfigError: naming the bad text and showing the accepted form.
    """
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"empty input spec {text!r}; the accepted form is {_FORM}")
    parts = text.strip().split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise ConfigError(f"bad input spec {text!r}; the accepted form is {_FORM}")
    name, shape_text = parts[0], parts[1]
    dtype = parts[2] if len(parts) == 3 else "float32"
    if not _NAME_RE.match(name):
        raise ConfigError(
            f"bad input name {name!r} in input spec {text!r}; the accepted form is {_FORM}"
        )
    shape: list[int | str] = []
    ranges: dict[str, DimRange] = {}
    for token in _split_dims(shape_text):
        token = token.strip()
        if re.fullmatch(r"\d+", token):
            shape.append(int(token))
            continue
        m = _DIM_RE.match(token)
        if m:
            sym = m.group("sym")
            r = _parse_range(sym, m.group("range"), text)
            if sym in ranges and ranges[sym] != r:
                raise ConfigError(f"symbol {sym!r} has two different ranges in input spec {text!r}")
            ranges[sym] = r
            shape.append(sym)
            continue
        if _SYMBOL_RE.match(token):
            shape.append(token)
            continue
        raise ConfigError(
            f"bad dim {token!r} in input spec {text!r}; a dim is an integer, a symbol such as N, "
            f"or a symbol with a range such as N[1..64]; the accepted form is {_FORM}"
        )
    try:
        return InputSpec(
            name=name,
            shape=tuple(shape),
            dtype=dtype,
            ranges=tuple(r for r in ranges.values() if not r.is_default),
        )
    except ConfigError as e:
        raise ConfigError(f"bad input spec {text!r}: {e}") from e


def _split_dims(shape_text: str) -> list[str]:
    """Split on 'x' outside the brackets of ranges."""
    out, cur, depth = [], "", 0
    for ch in shape_text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "x" and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return out


def symbol_ranges(specs: Sequence[InputSpec]) -> dict[str, DimRange]:
    """The range of every symbol across `specs`.

    A symbol may carry its range in one input and appear bare in others; two
    different explicit ranges for one symbol are an error.

    Raises:
        ConfigError: naming the symbol and both inputs.
    """
    found: dict[str, tuple[DimRange, str]] = {}
    for s in specs:
        for sym in s.symbols:
            r = s.range_of(sym)
            if sym not in found or (found[sym][0].is_default and not r.is_default):
                found[sym] = (r, s.name)
            elif not r.is_default and found[sym][0] != r:
                raise ConfigError(
                    f"symbol {sym!r} has range {r.to_text()} in input {s.name!r} but "
                    f"{found[sym][0].to_text()} in input {found[sym][1]!r}; give it one range"
                )
    return {sym: r for sym, (r, _) in found.items()}


def validate_specs(specs: Sequence[InputSpec]) -> None:
    """Check a list of specs: at least one, unique names, one range per symbol.

    Raises:
        ConfigError: naming the offending inputs.
    """
    if not specs:
        raise ConfigError(f"no inputs given; pass at least one --input {_FORM}")
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise ConfigError(f"input name {s.name!r} is given twice; input names must be unique")
        seen.add(s.name)
    symbol_ranges(specs)


def resolve_dims(
    specs: Sequence[InputSpec], dims: Mapping[str, int] | None = None
) -> dict[str, int]:
    """The value of every symbol: `dims` where given, else its opt value."""
    return {sym: int((dims or {}).get(sym, r.opt)) for sym, r in symbol_ranges(specs).items()}


def example_inputs(
    specs: Sequence[InputSpec],
    *,
    seed: int = 0,
    dims: Mapping[str, int] | None = None,
    int_high: int = 10,
) -> tuple[torch.Tensor, ...]:
    """Random tensors matching `specs`, reproducible from `seed`.

    Floats are standard normal; integer dtypes are uniform in ``[0, int_high)`` (small,
    so that they are valid indices for any embedding); bool is uniform.

    Args:
        specs: one spec per model input, in forward-argument order.
        seed: seed of the generator.
        dims: values for symbolic dims; others take their opt value.
        int_high: exclusive upper bound of integer values.

    Returns:
        One tensor per spec.
    """
    import torch

    validate_specs(specs)
    values = resolve_dims(specs, dims)
    gen = torch.Generator().manual_seed(int(seed))
    out = []
    for s in specs:
        shape = s.example_shape(values)
        dtype = getattr(torch, DTYPES[s.dtype][0])
        if s.dtype == "bool":
            t = torch.randint(0, 2, shape, generator=gen).bool()
        elif s.is_integer:
            t = torch.randint(0, int_high, shape, generator=gen, dtype=torch.int64).to(dtype)
        else:
            t = torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)
        out.append(t)
    return tuple(out)


def torch_dynamic_shapes(specs: Sequence[InputSpec]) -> tuple[dict[int, Any] | None, ...] | None:
    """The ``dynamic_shapes`` argument of ``torch.export.export`` for `specs`.

    One ``torch.export.Dim`` per symbol, shared by every input that uses it, bounded
    by the symbol's range; one ``{axis: Dim}`` per input (None for a static input).

    Returns:
        A tuple with one entry per spec, or None when no dim is symbolic.
    """
    import torch

    validate_specs(specs)
    dims: dict[str, Any] = {}
    for sym, r in symbol_ranges(specs).items():
        if r.max is None:
            dims[sym] = torch.export.Dim(sym, min=r.min)
        else:
            dims[sym] = torch.export.Dim(sym, min=r.min, max=r.max)
    shapes: list[dict[int, Any] | None] = []
    for spec in specs:
        axes = {axis: dims[d] for axis, d in enumerate(spec.shape) if isinstance(d, str)}
        shapes.append(axes or None)
    return tuple(shapes) if dims else None


#: an unbounded symbol gets this upper bound where a format needs one (TensorRT profiles):
#: ``max(UNBOUNDED_MAX_FACTOR * opt, UNBOUNDED_MAX_FLOOR)``
UNBOUNDED_MAX_FACTOR = 2
UNBOUNDED_MAX_FLOOR = 16


@dataclass(frozen=True)
class ShapeProfile:
    """The min/opt/max shapes of one input, for formats with shape profiles (TensorRT).

    Attributes:
        name: the input name.
        min: the shape with every symbol at its min.
        opt: the shape with every symbol at its opt value.
        max: the shape with every symbol at its max (a default bound when unbounded).
        defaulted: symbols without an upper bound that got the default one.
    """

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]
    defaulted: tuple[str, ...] = ()


def bounded_max(r: DimRange) -> int:
    """The upper bound of `r`, or the default one (see `UNBOUNDED_MAX_FACTOR`) when unbounded."""
    if r.max is not None:
        return r.max
    return max(UNBOUNDED_MAX_FACTOR * r.opt, UNBOUNDED_MAX_FLOOR, r.min)


def shape_profiles(specs: Sequence[InputSpec]) -> list[ShapeProfile]:
    """One min/opt/max profile per input, symbols resolved across all inputs.

    A symbol with no upper bound gets `bounded_max`; it is listed in ``defaulted`` so
    that exporters can say so.
    """
    validate_specs(specs)
    ranges = symbol_ranges(specs)
    lo = {s: r.min for s, r in ranges.items()}
    opt = {s: r.opt for s, r in ranges.items()}
    hi = {s: bounded_max(r) for s, r in ranges.items()}
    return [
        ShapeProfile(
            name=s.name,
            min=s.example_shape(lo),
            opt=s.example_shape(opt),
            max=s.example_shape(hi),
            defaulted=tuple(sym for sym in s.symbols if ranges[sym].max is None),
        )
        for s in specs
    ]


def with_bounded_ranges(specs: Sequence[InputSpec]) -> list[InputSpec]:
    """`specs` with every symbol given an explicit range whose max is `bounded_max`.

    For formats that plan memory for the largest shape (ExecuTorch): an unbounded
    symbol would otherwise be planned at its example size.
    """
    ranges = symbol_ranges(specs)
    bounded = {sym: DimRange(sym, r.min, r.opt, bounded_max(r)) for sym, r in ranges.items()}
    return [
        InputSpec(s.name, s.shape, s.dtype, tuple(bounded[sym] for sym in s.symbols)) for s in specs
    ]
