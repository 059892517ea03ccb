"""Base layer kinds: how to probe, verify and rebuild a layer of one base type.

A kind knows its base layer's *geometry* (input size, kernel, stride, padding,
table size), never an adapter: it reads the plain layer off a float64 function
with `edgerep.fold.probe`, checks it with `edgerep.fold.verify`, and builds the
replacement with the base layer's configuration. Registered by the qualified
name of the base layer class, looked up along the class's MRO (so
``transformers``' GPT-2 ``Conv1D`` is known without importing transformers).

Weights are exchanged *dense*: a grouped conv's kernel is expanded to
``(out, in, *kernel)`` so that deltas of differently grouped layers add up; the
replacement is grouped like the base when the dense kernel allows it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.utils import skip_init

from edgerep.fold import probe, verify
from edgerep.fold.probe import round_to

__all__ = ["KINDS", "LayerKind", "kind_for", "register_kind", "round_to"]

Fn = Callable[[torch.Tensor], torch.Tensor]
Wrap = Callable[[Fn], Fn]
_F64 = torch.float64
# Elements of one chunk of embedding rows read at once.
_ROW_CHUNK_ELEMENTS = 1 << 22


class LayerKind:
    """How one base layer type is probed, verified and rebuilt.

    Subclasses implement the hooks; `read` returns a dense float64 weight and a
    float64 bias (zeros when the layer has none).
    """

    name = "layer"

    def unsupported(self, base: Any) -> str | None:
        """Why layers like `base` cannot be merged, or None."""
        return None

    def affine_shape(self, base: Any) -> tuple[int, ...] | None:
        """Input shape of the affinity check, or None when inputs are not real-valued."""
        raise NotImplementedError

    def read(self, f: Fn, base: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense weight and the bias of the plain layer `f` computes (float64)."""
        raise NotImplementedError

    def params(self, base: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The base layer's own dense weight and bias, in float64."""
        raise NotImplementedError

    def build(
        self, base: Any, weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype
    ) -> nn.Module:
        """The plain layer with `base`'s configuration and these values, in `dtype`."""
        raise NotImplementedError

    def function(self, base: Any, weight: torch.Tensor, bias: torch.Tensor) -> Fn:
        """The float64 plain layer with these values, as a function (for the verifier)."""
        return self.build(base, weight, bias, _F64).eval()

    def checks(self, base: Any, *, quick: bool = False) -> tuple[list[tuple[int, ...]], Wrap]:
        """The verifier's input shapes, and how a function sees the random inputs.

        `quick`: the candidate comes from a known algebra, not from reading `f` at
        chosen points, so a few random rows suffice (a Linear: 8 random vectors; a
        conv or an embedding is verified in full, it is cheap).
        """
        raise NotImplementedError

    def record(self, f: Fn, base: Any, *, quick: bool = False) -> verify.Recorded:
        """`f`'s float64 outputs on the verifier's inputs, to compare a candidate with later."""
        shapes, wrap = self.checks(base, quick=quick)
        return verify.record(wrap(f), shapes)

    def compare(
        self, recorded: verify.Recorded, candidate: Fn, base: Any, rtol: float
    ) -> verify.VerifyResult:
        """`candidate` against outputs `record` kept."""
        _, wrap = self.checks(base)
        return recorded.compare(wrap(candidate), rtol=rtol)

    def verify(
        self, f: Fn, candidate: Fn, base: Any, rtol: float, *, quick: bool = False
    ) -> verify.VerifyResult:
        """Compare `f` with `candidate` in float64 (see `checks` for `quick`)."""
        return self.compare(self.record(f, base, quick=quick), candidate, base, rtol)


KINDS: dict[str, LayerKind] = {}


def register_kind(qualname: str, kind: LayerKind) -> None:
    """Register `kind` for the base layer class named `qualname` (module.Class)."""
    if qualname in KINDS:
        raise ValueError(f"a layer kind for {qualname!r} is already registered")
    KINDS[qualname] = kind


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def kind_for(module: nn.Module) -> LayerKind | None:
    """The kind of `module`'s class or of its nearest registered base class."""
    for cls in type(module).__mro__:
        kind = KINDS.get(_qualname(cls))
        if kind is not None:
            return kind
    return None


def is_exact(module: nn.Module) -> bool:
    """Whether `module`'s class itself is registered (a plain layer, not a subclass)."""
    return _qualname(type(module)) in KINDS


def _with_bias(bias: torch.Tensor, base_bias: Any) -> bool:
    return base_bias is not None or bool(bias.any())


def _fill(layer: Any, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """Put the values into `layer`: the one rounding to the layer's dtype happens here."""
    with torch.no_grad():
        _assign(layer.weight, weight)
        if layer.bias is not None:
            _assign(layer.bias, bias)
    return layer


def _assign(param: nn.Parameter, value: torch.Tensor) -> None:
    """``param ← value`` rounded once to its dtype (never an alias of `value`)."""
    if param.dtype in (torch.float32, torch.float64) or value.dtype != _F64:
        param.copy_(value)  # one rounding, into the layer's own buffer
        return
    rounded = round_to(value, param.dtype)  # bf16/fp16: correctly rounded, not via fp32
    if rounded.shape != param.shape or not rounded.is_contiguous():
        param.copy_(rounded)
    else:
        param.data = rounded


def _plain_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` over these tensors, as its ``__init__`` builds it, minus the init.

    ``nn.Linear(...)`` draws a random initialization (``reset_parameters``) that the
    merged values overwrite at once; even on the meta device that costs more per
    layer than a small merge, so the module is assembled here (torch is pinned).
    """
    layer = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(layer)
    layer.in_features = int(weight.shape[1])
    layer.out_features = int(weight.shape[0])
    layer.weight = nn.Parameter(weight)
    if bias is not None:
        layer.bias = nn.Parameter(bias)
    else:
        layer.register_parameter("bias", None)
    return layer


def _same(f: Fn) -> Fn:
    return f


def _device(base: Any) -> torch.device:
    return base.weight.device


class _Linear(LayerKind):
    """``y = x Wᵀ + b`` on the last dimension: `probe.probe_linear`."""

    name = "linear"

    def in_features(self, base: Any) -> int:
        return int(base.in_features)

    def affine_shape(self, base: Any) -> tuple[int, ...]:
        return (2, 3, self.in_features(base))

    def read(self, f: Fn, base: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return probe.probe_linear(f, self.in_features(base), 2)

    def params(self, base: Any) -> tuple[torch.Tensor, torch.Tensor]:
        w = base.weight.detach().to(_F64)
        b = base.bias
        return w, (b.detach().to(_F64) if b is not None else torch.zeros(w.shape[0], dtype=_F64))

    def build(
        self, base: Any, weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype
    ) -> nn.Module:
        out_f, in_f = weight.shape
        device = _device(base)
        w = torch.empty((out_f, in_f), dtype=dtype, device=device)
        b = torch.empty(out_f, dtype=dtype, device=device) if _with_bias(bias, base.bias) else None
        return _fill(_plain_linear(w, b), weight, bias)

    def function(self, base: Any, weight: torch.Tensor, bias: torch.Tensor) -> Fn:
        # no copy of the weight: the verifier only calls it
        b = bias if _with_bias(bias, base.bias) else None

        def linear(x: torch.Tensor) -> torch.Tensor:
            # ``(W xᵀ)ᵀ``: the same products as ``x Wᵀ``; BLAS runs this form ~1.5x faster
            # on the verifier's few rows (a skinny right-hand side)
            rows = x.reshape(-1, x.shape[-1])
            y = torch.mm(weight, rows.T).T
            if b is not None:
                y = y + b
            return y.reshape(*x.shape[:-1], weight.shape[0])

        return linear

    def checks(self, base: Any, *, quick: bool = False) -> tuple[list[tuple[int, ...]], Wrap]:
        if quick:
            return [(2, 4, self.in_features(base))], _same
        return verify.probe_shapes((1, 3, self.in_features(base)), "linear"), _same


class _GPT2Conv1D(_Linear):
    """``transformers``' ``Conv1D``: a Linear that stores its weight as ``(in, out)``."""

    name = "conv1d-linear"

    def in_features(self, base: Any) -> int:
        return int(base.weight.shape[0])

    def params(self, base: Any) -> tuple[torch.Tensor, torch.Tensor]:
        w = base.weight.detach().to(_F64).T
        return w.contiguous(), base.bias.detach().to(_F64)

    def build(
        self, base: Any, weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype
    ) -> nn.Module:
        layer = copy.deepcopy(base).to(dtype)
        with torch.no_grad():
            layer.weight.copy_(round_to(weight.T, dtype))
            layer.bias.copy_(round_to(bias, dtype))
        return layer


def _pads(conv: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    kernel, dilation = conv.kernel_size, conv.dilation
    padding = conv.padding
    if padding == "valid":
        zero = tuple(0 for _ in kernel)
        return zero, zero
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]
        lo = tuple(t // 2 for t in total)
        return lo, tuple(t - lo_ for t, lo_ in zip(total, lo))
    pad = tuple(int(p) for p in padding)
    return pad, pad


def _dense(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Expand a grouped kernel ``(out, in/groups, *k)`` to ``(out, in, *k)``."""
    if groups == 1:
        return weight
    out_c, in_g = weight.shape[:2]
    og = out_c // groups
    dense = torch.zeros((out_c, in_g * groups, *weight.shape[2:]), dtype=weight.dtype)
    for g in range(groups):
        dense[g * og : (g + 1) * og, g * in_g : (g + 1) * in_g] = weight[g * og : (g + 1) * og]
    return dense


def _grouped(dense: torch.Tensor, groups: int) -> torch.Tensor | None:
    """The ``groups``-grouped kernel of `dense`, or None if it has weights across groups."""
    if groups == 1:
        return dense
    out_c, in_c = dense.shape[:2]
    og, ig = out_c // groups, in_c // groups
    blocks, rest = [], dense.clone()
    for g in range(groups):
        blocks.append(dense[g * og : (g + 1) * og, g * ig : (g + 1) * ig])
        rest[g * og : (g + 1) * og, g * ig : (g + 1) * ig] = 0
    if rest.any():
        return None
    return torch.cat(blocks, dim=0)


class _Conv(LayerKind):
    """An N-d convolution: `probe.probe_conv` with the base conv's geometry."""

    name = "conv"

    def unsupported(self, base: Any) -> str | None:
        mode = base.padding_mode
        if mode != "zeros":
            return (
                f"its base conv pads with padding_mode={mode!r}; the impulse probe reads "
                "zero-padded convolutions only"
            )
        return None

    def geometry(self, base: Any) -> probe.ConvGeometry:
        lo, hi = _pads(base)
        return probe.ConvGeometry(
            int(base.in_channels),
            int(base.out_channels),
            tuple(base.kernel_size),
            tuple(base.stride),
            tuple(base.dilation),
            lo,
            hi,
        )

    def _span(self, base: Any) -> tuple[int, ...]:
        return tuple((k - 1) * d + 1 for k, d in zip(base.kernel_size, base.dilation))

    def _example(self, base: Any) -> tuple[int, ...]:
        sizes = [max(8, 2 * s + 2, 2 * st + 2) for s, st in zip(self._span(base), base.stride)]
        return (1, int(base.in_channels), *sizes)

    def affine_shape(self, base: Any) -> tuple[int, ...]:
        shape = self._example(base)
        return (2, shape[1], *(n + 1 for n in shape[2:]))

    def read(self, f: Fn, base: Any) -> tuple[torch.Tensor, torch.Tensor]:
        weight, bias, groups = probe.probe_conv(f, self.geometry(base))
        return _dense(weight, groups), bias

    def params(self, base: Any) -> tuple[torch.Tensor, torch.Tensor]:
        w = _dense(base.weight.detach().to(_F64), int(base.groups))
        b = base.bias
        return w, (b.detach().to(_F64) if b is not None else torch.zeros(w.shape[0], dtype=_F64))

    def build(
        self, base: Any, weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype
    ) -> nn.Module:
        groups = int(base.groups)
        kernel = _grouped(weight, groups)
        if kernel is None:  # the adapter connects channels across the base's groups
            groups, kernel = 1, weight
        conv = skip_init(
            _PLAIN_CONV[len(base.kernel_size)],
            weight.shape[1],
            weight.shape[0],
            tuple(base.kernel_size),
            stride=base.stride,
            padding=base.padding,
            dilation=base.dilation,
            groups=groups,
            bias=_with_bias(bias, base.bias),
            padding_mode=base.padding_mode,
            dtype=dtype,
            device=_device(base),
        )
        return _fill(conv, kernel, bias)

    def checks(self, base: Any, *, quick: bool = False) -> tuple[list[tuple[int, ...]], Wrap]:
        return verify.probe_shapes(self._example(base), "conv", span=self._span(base)), _same


_PLAIN_CONV: dict[int, Any] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class _Embedding(LayerKind):
    """A lookup table: row ``i`` is the function's output at index ``i``.

    Any function that maps each index to a vector on its own is a table; the
    verifier checks that on random index tensors of several shapes.
    """

    name = "embedding"

    def unsupported(self, base: Any) -> str | None:
        if base.max_norm is not None:
            return (
                f"its base embedding has max_norm={base.max_norm}: rows are renormalized at "
                "lookup time, so it is not a fixed table"
            )
        return None

    def affine_shape(self, base: Any) -> None:
        return None

    def read(self, f: Fn, base: Any) -> tuple[torch.Tensor, torch.Tensor]:
        n, dim = int(base.num_embeddings), int(base.embedding_dim)
        chunk = max(1, _ROW_CHUNK_ELEMENTS // max(dim, 1))
        rows = []
        for start in range(0, n, chunk):
            idx = torch.arange(start, min(start + chunk, n), device=_device(base))
            with torch.no_grad():
                y = f(idx)
            if not isinstance(y, torch.Tensor) or tuple(y.shape) != (len(idx), dim):
                shape = list(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise probe.ProbeFailure(
                    f"indices of shape [{len(idx)}] give {shape}, not one row of {dim} per index"
                )
            rows.append(y.to(_F64))
        return torch.cat(rows, dim=0), torch.zeros(dim, dtype=_F64)

    def params(self, base: Any) -> tuple[torch.Tensor, torch.Tensor]:
        w = base.weight.detach().to(_F64)
        return w, torch.zeros(w.shape[1], dtype=_F64)

    def build(
        self, base: Any, weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype
    ) -> nn.Module:
        if bias.any():
            raise probe.ProbeFailure("an embedding table has no bias")
        layer = skip_init(
            nn.Embedding,
            weight.shape[0],
            weight.shape[1],
            padding_idx=base.padding_idx,
            scale_grad_by_freq=bool(base.scale_grad_by_freq),
            sparse=bool(base.sparse),
            dtype=dtype,
            device=_device(base),
        )
        with torch.no_grad():
            layer.weight.copy_(round_to(weight, dtype))
        return layer

    def checks(self, base: Any, *, quick: bool = False) -> tuple[list[tuple[int, ...]], Wrap]:
        n = int(base.num_embeddings)

        def indices(x: torch.Tensor) -> torch.Tensor:
            # the verifier draws normal samples; map them to uniformly spread indices
            return (torch.special.ndtr(x) * n).long().clamp(0, n - 1)

        def wrap(f: Fn) -> Fn:
            return lambda x: f(indices(x))

        return [(2, min(n, 7)), (max(1, min(n, 64)),), (1, 2, 5)], wrap


register_kind("torch.nn.modules.linear.Linear", _Linear())
register_kind("transformers.pytorch_utils.Conv1D", _GPT2Conv1D())
for _cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_kind(_qualname(_cls), _Conv())
register_kind("torch.nn.modules.sparse.Embedding", _Embedding())


def describe(module: nn.Module) -> str:
    """One-line repr."""
    return " ".join(repr(module).split())


def count_params(module: nn.Module) -> int:
    """Parameters of `module` (shared ones once)."""
    return sum(p.numel() for p in module.parameters())
