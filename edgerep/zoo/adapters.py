"""Custom (non-PEFT) adapter modules, written from their papers' equations.

Every adapter wraps one frozen plain layer, held as ``self.base`` (its only child
module), and keeps its own parameters as plain `nn.Parameter` attributes; its
``forward(x)`` computes the adapted layer's output from the paper's equations.
No adapter has merge code: `edgerep.merge` reads the plain layer each one equals
off its eval-mode function and proves the result with the verifier.

Notation in the docstrings: the base layer computes ``y = W₀ x + b₀``; for a
conv ``W₀`` has shape ``(out, in/groups, *kernel)`` and the product is the
convolution with the base's stride, padding, dilation and groups; for an
Embedding ``W₀`` is the ``(num, dim)`` table and ``W₀ x`` is the row lookup.
``s`` is a scalar scale, ``⊙`` the elementwise product, ``⊗`` the Kronecker
product, and "the delta is applied with the base's op" means
``y = base(x) + op(x, ΔW)`` with ``op`` the base's own functional (`F.linear`,
its convolution, `F.embedding`) and no bias.

The paper initializations make most deltas zero (LoRA's ``B = 0``); tests call
`edgerep.zoo.randomize_` first so that a wrong merge cannot look exact.

Two adapters here are *not* affine in their input and must not merge:
`BottleneckAdapter` (Houlsby / AdaptFormer) and `RoutedLowRankAdapter`
(input-dependent routing between two low-rank deltas); `edgerep.merge` keeps
them and says why.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from edgerep.errors import ConfigError
from edgerep.zoo._registry import lookup, registrar

__all__ = [
    "ADAPTERS",
    "BottleneckAdapter",
    "ETHERAdapter",
    "ETHERPlusAdapter",
    "FLoRAAdapter",
    "FedParaAdapter",
    "GLoRAAdapter",
    "HydraAdapter",
    "PHMAdapter",
    "PiSSAAdapter",
    "RoSAAdapter",
    "RoutedLowRankAdapter",
    "SORSAAdapter",
    "SSFAdapter",
    "get_adapter",
    "register_adapter",
]

# ------------------------------------------------------------------ registry

ADAPTERS: dict[str, type[nn.Module]] = {}
"""Every registered zoo adapter, by short name (e.g. ``"hydra"``)."""

register_adapter = registrar(ADAPTERS, "adapter")
get_adapter = lookup(ADAPTERS, "adapter")


# ------------------------------------------------------------- base layers

_Run = Callable[[nn.Module, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class _Layer:
    """What the adapters need to know about one plain base layer type.

    Attributes:
        spatial: spatial dims of its inputs and outputs (0: features last).
        run: ``run(base, x, weight, bias)``, the base's op with another weight.
    """

    spatial: int
    run: _Run


def _run_linear(
    base: nn.Module, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None
) -> torch.Tensor:
    return F.linear(x, w, b)


def _run_conv(
    base: nn.Module, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None
) -> torch.Tensor:
    # the base's own padding mode, stride, dilation and groups
    return cast(nn.Conv2d, base)._conv_forward(x, w, b)


def _run_embedding(
    base: nn.Module, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None
) -> torch.Tensor:
    out = F.embedding(x, w, cast(nn.Embedding, base).padding_idx)
    return out if b is None else out + b


_LAYERS: dict[type[nn.Module], _Layer] = {
    nn.Linear: _Layer(0, _run_linear),
    nn.Conv1d: _Layer(1, _run_conv),
    nn.Conv2d: _Layer(2, _run_conv),
    nn.Embedding: _Layer(0, _run_embedding),
}


def _resolve(base: nn.Module, supported: tuple[type[nn.Module], ...], adapter: str) -> _Layer:
    """The `_Layer` of `base`, or a ConfigError naming what `adapter` supports."""
    kind = next((t for t in type(base).__mro__ if t in supported), None)
    if kind is None:
        names = ", ".join(t.__name__ for t in supported)
        raise ConfigError(
            f"{adapter} wraps a plain {names} layer; got {type(base).__name__}. "
            f"Wrap one of those layer types instead."
        )
    if isinstance(base, nn.Embedding) and base.max_norm is not None:
        raise ConfigError(
            f"{adapter} cannot wrap an Embedding with max_norm={base.max_norm}: its lookup "
            f"renormalizes rows in place; use max_norm=None"
        )
    return _LAYERS[kind]


def _weight(base: nn.Module) -> torch.Tensor:
    return cast(torch.Tensor, base.weight)


def _bias(base: nn.Module) -> torch.Tensor | None:
    b = getattr(base, "bias", None)
    return b if isinstance(b, torch.Tensor) else None


class _Adapter(nn.Module):
    """Plumbing shared by the adapters: the frozen base layer and its kind.

    Args:
        base: the plain layer to adapt; it becomes ``self.base`` and is frozen.
        supported: the base layer types the adapter accepts.
    """

    base: nn.Module

    def __init__(self, base: nn.Module, supported: tuple[type[nn.Module], ...]) -> None:
        super().__init__()
        self._layer = _resolve(base, supported, type(self).__name__)
        base.requires_grad_(False)
        self.base = base

    def _run(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The base's op on `x` with another weight and bias."""
        return self._layer.run(self.base, x, weight, bias)


def _param(base: nn.Module, *shape: int) -> nn.Parameter:
    """A zero parameter with the base weight's dtype and device."""
    w = _weight(base)
    return nn.Parameter(torch.zeros(shape, dtype=w.dtype, device=w.device))


def _kaiming_(p: nn.Parameter) -> nn.Parameter:
    # nn.Linear's own init: U(±1/sqrt(fan_in)) for the trailing dims
    nn.init.kaiming_uniform_(p, a=math.sqrt(5))
    return p


def _normal_(p: nn.Parameter, mean: float, std: float) -> nn.Parameter:
    nn.init.normal_(p, mean, std)
    return p


def _channels(v: torch.Tensor, layer: _Layer) -> torch.Tensor:
    """View a per-channel vector so it broadcasts over the layer's inputs or outputs."""
    return v.view(-1, *([1] * layer.spatial)) if layer.spatial else v


def _mix(h: torch.Tensor, m: torch.Tensor, b: torch.Tensor | None, layer: _Layer) -> torch.Tensor:
    """``m h + b`` over the channel dim (last for Linear/Embedding, 1 for a conv)."""
    if not layer.spatial:
        return F.linear(h, m, b)
    return F.linear(h.movedim(1, -1), m, b).movedim(-1, 1)


def _check_positive(value: int, what: str) -> None:
    if value < 1:
        raise ConfigError(f"{what} must be >= 1; got {value}")


def _check_choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{what} must be one of {allowed}; got {value!r}")


def _check_groups(base: nn.Module, adapter: str) -> None:
    groups = getattr(base, "groups", 1)
    if groups != 1:
        raise ConfigError(
            f"{adapter} needs a conv base with groups=1 (its low-rank branch is a dense "
            f"conv); got groups={groups}"
        )


# -------------------------------------------------------------------- Hydra


@register_adapter("hydra")
class HydraAdapter(_Adapter):
    """Hydra: a parallel and a sequential low-rank branch (Kim et al., 2023).

    ``y = h + s·(B_p A_p x + c_p) + s·(B_s A_s h + c_s)`` with ``h = W₀ x + b₀`` the
    base output: the parallel branch is LoRA on the input, the sequential one a
    low-rank map of the base output. One layer with
    ``W' = W₀ + s·B_p A_p + s·B_s A_s W₀`` and ``b' = b₀ + s·(c_p + B_s A_s b₀ + c_s)``.
    On a conv, ``A_p`` is a conv with the base's kernel and geometry and
    ``B_p``, ``A_s``, ``B_s`` are 1x1 convs.

    Args:
        base: the frozen Linear or Conv2d (groups=1) layer.
        rank: rank of each branch.
        scale: the scale ``s``.
        bias: give each branch's up-projection a bias (``c_p``, ``c_s``).
    """

    def __init__(
        self, base: nn.Module, *, rank: int = 4, scale: float = 1.0, bias: bool = True
    ) -> None:
        super().__init__(base, (nn.Linear, nn.Conv2d))
        _check_positive(rank, "HydraAdapter rank")
        _check_groups(base, "HydraAdapter")
        self.scale = scale
        w = _weight(base)
        out = w.shape[0]
        # LoRA's init: down-projections uniform, up-projections zero
        self.par_down = _param(base, rank, *w.shape[1:])
        self.par_up = _param(base, out, rank)
        self.seq_down = _param(base, rank, out)
        self.seq_up = _param(base, out, rank)
        _kaiming_(self.par_down)
        _kaiming_(self.seq_down)
        self.par_bias = _param(base, out) if bias else None
        self.seq_bias = _param(base, out) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self._layer
        h = self.base(x)
        par = _mix(self._run(x, self.par_down), self.par_up, self.par_bias, layer)
        seq = _mix(_mix(h, self.seq_down, None, layer), self.seq_up, self.seq_bias, layer)
        return h + self.scale * (par + seq)


# -------------------------------------------------------------------- GLoRA

_GLORA_AB = ("lora", "vector", "constant", "none")
_GLORA_C = ("lora", "vector", "none")
_GLORA_DE = ("vector", "constant", "none")


@register_adapter("glora")
class GLoRAAdapter(_Adapter):
    """GLoRA, generalized LoRA (Chavan et al., 2023), one fixed path of its search space.

    ``y = (W₀ + W₀ ⊙ A + B) x + b₀ + b₀ ⊙ D + E + W₀ C``: one Linear with
    ``W' = W₀ + W₀ ⊙ A + B`` and ``b' = b₀ + b₀ ⊙ D + E + W₀ C``.

    Forms of the support tensors (as in the paper):

    - ``A``, ``B`` (out x in): ``"lora"`` ``X_l X_r`` of rank `rank`, ``"vector"``
      one value per output row, ``"constant"`` one scalar, or ``"none"``;
    - ``C`` (in x 1): ``"lora"`` ``C_l C_r`` (in x rank times rank x 1),
      ``"vector"`` or ``"none"``;
    - ``D``, ``E`` (out): ``"vector"``, ``"constant"`` or ``"none"``.

    The paper's init (zero ``X_l``, vectors and constants) starts at the base layer.

    Args:
        base: the frozen Linear layer.
        rank: rank of the ``"lora"`` forms.
        a: form of ``A``. b: form of ``B``. c: form of ``C``.
        d: form of ``D``. e: form of ``E``.
    """

    def __init__(
        self,
        base: nn.Module,
        *,
        rank: int = 4,
        a: str = "lora",
        b: str = "lora",
        c: str = "lora",
        d: str = "vector",
        e: str = "vector",
    ) -> None:
        super().__init__(base, (nn.Linear,))
        _check_positive(rank, "GLoRAAdapter rank")
        for value, allowed, what in (
            (a, _GLORA_AB, "a"),
            (b, _GLORA_AB, "b"),
            (c, _GLORA_C, "c"),
            (d, _GLORA_DE, "d"),
            (e, _GLORA_DE, "e"),
        ):
            _check_choice(value, allowed, f"GLoRAAdapter {what}")
        self.forms = {"a": a, "b": b, "c": c, "d": d, "e": e}
        out, inp = _weight(base).shape
        # (rows, cols) of each support tensor; D and E are columns
        shapes = {"a": (out, inp), "b": (out, inp), "c": (inp, 1), "d": (out, 1), "e": (out, 1)}
        for name, form in self.forms.items():
            rows, cols = shapes[name]
            if form == "lora":
                self.register_parameter(f"{name}_left", _param(base, rows, rank))
                self.register_parameter(f"{name}_right", _kaiming_(_param(base, rank, cols)))
            elif form == "vector":
                self.register_parameter(f"{name}_vector", _param(base, rows))
            elif form == "constant":
                self.register_parameter(f"{name}_scalar", _param(base))

    def _support(self, name: str) -> torch.Tensor | None:
        """The support tensor `name` in a shape that broadcasts against its target."""
        form = self.forms[name]
        if form == "lora":
            return getattr(self, f"{name}_left") @ getattr(self, f"{name}_right")
        if form == "vector":
            v = getattr(self, f"{name}_vector")
            return v[:, None] if name in ("a", "b", "c") else v
        if form == "constant":
            return getattr(self, f"{name}_scalar")
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w0, b0 = _weight(self.base), _bias(self.base)
        a, b, c, d, e = (self._support(n) for n in "abcde")
        delta_w = torch.zeros_like(w0)
        if a is not None:
            delta_w = delta_w + w0 * a
        if b is not None:
            delta_w = delta_w + b
        terms: list[torch.Tensor] = []
        if d is not None and b0 is not None:
            terms.append(b0 * d)
        if e is not None:
            terms.append(e.expand(w0.shape[0]))
        if c is not None:
            terms.append((w0 @ c).squeeze(-1))
        delta_b = torch.stack(terms).sum(0) if terms else None
        return self.base(x) + F.linear(x, delta_w, delta_b)


# -------------------------------------------------------------------- ETHER


def _unit_rows(u: torch.Tensor) -> torch.Tensor:
    return u / u.norm(dim=-1, keepdim=True)


def _block_apply(blocks: torch.Tensor, weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Multiply `weight` along `dim` by the block-diagonal matrix of `blocks`.

    ``dim=0`` gives ``H W`` (output side); ``dim=1`` gives ``W H`` (input side,
    on a conv the same ``H`` at every kernel tap).
    """
    nb, bs, _ = blocks.shape
    w = weight.movedim(dim, 0)
    rest = w.shape[1:]
    w = w.reshape(nb, bs, -1)
    # W H along dim 1 is (Hᵀ Wᵀ)ᵀ: the transposed blocks act on the moved dim
    h = blocks if dim == 0 else blocks.transpose(1, 2)
    return (h @ w).reshape(nb * bs, *rest).movedim(0, dim)


def _reflection_vectors(base: nn.Module, n: int, num_blocks: int, what: str) -> nn.Parameter:
    if num_blocks < 1 or n % num_blocks:
        raise ConfigError(
            f"{what} needs num_blocks >= 1 dividing the transformed dim {n}; got {num_blocks}"
        )
    return _kaiming_(_param(base, num_blocks, n // num_blocks))


_ETHER_SIDES = ("input", "output")
_SIDE_DIM = {"output": 0, "input": 1}


@register_adapter("ether")
class ETHERAdapter(_Adapter):
    """ETHER: block-diagonal hyperplane reflections of the weight (Bini et al., 2024).

    ``H = diag(H_1, ..., H_n)`` with ``H_i = I - 2 û_i û_iᵀ`` (``û_i = u_i / |u_i|``);
    ``side="input"`` gives ``W' = W₀ H`` (the paper's default), ``side="output"``
    ``W' = H W₀``; the bias is unchanged. On a conv the input-side ``H`` acts on
    the ``in/groups`` channels at every kernel tap.

    Args:
        base: the frozen Linear or Conv2d layer.
        num_blocks: diagonal blocks ``n``; must divide the transformed dim.
        side: ``"input"`` or ``"output"``.
    """

    def __init__(self, base: nn.Module, *, num_blocks: int = 1, side: str = "input") -> None:
        super().__init__(base, (nn.Linear, nn.Conv2d))
        _check_choice(side, _ETHER_SIDES, "ETHERAdapter side")
        self.dim = _SIDE_DIM[side]
        n = _weight(base).shape[self.dim]
        self.u = _reflection_vectors(base, n, num_blocks, "ETHERAdapter")

    def reflection(self) -> torch.Tensor:
        """The blocks ``H_i = I - 2 û_i û_iᵀ``, shape ``(n, size, size)``."""
        u = _unit_rows(self.u)
        eye = torch.eye(u.shape[1], dtype=u.dtype, device=u.device)
        return eye - 2 * u[:, :, None] * u[:, None, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = _block_apply(self.reflection(), _weight(self.base), self.dim)
        return self._run(x, weight, _bias(self.base))


@register_adapter("ether_plus")
class ETHERPlusAdapter(_Adapter):
    """ETHER+: relaxed reflections on both sides of the weight (Bini et al., 2024).

    ``H⁺ = diag(H⁺_1, ..., H⁺_n)`` with ``H⁺_i = I - û_i û_iᵀ + v̂_i v̂_iᵀ``;
    ``W' = H⁺_out W₀ H⁺_in`` (``two_sided=False``: ``W' = W₀ H⁺_in``); the bias is
    unchanged. The paper's init ``v = -u`` makes every ``H⁺_i = I``.

    Args:
        base: the frozen Linear or Conv2d layer.
        num_blocks: diagonal blocks per side; must divide both transformed dims.
        two_sided: also transform the output side.
    """

    def __init__(self, base: nn.Module, *, num_blocks: int = 1, two_sided: bool = True) -> None:
        super().__init__(base, (nn.Linear, nn.Conv2d))
        self.two_sided = two_sided
        w = _weight(base)
        self.u_in = _reflection_vectors(base, w.shape[1], num_blocks, "ETHERPlusAdapter")
        self.v_in = nn.Parameter(-self.u_in.detach().clone())
        self.u_out: nn.Parameter | None = None
        self.v_out: nn.Parameter | None = None
        if two_sided:
            self.u_out = _reflection_vectors(base, w.shape[0], num_blocks, "ETHERPlusAdapter")
            self.v_out = nn.Parameter(-self.u_out.detach().clone())

    @staticmethod
    def _blocks(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        u, v = _unit_rows(u), _unit_rows(v)
        eye = torch.eye(u.shape[1], dtype=u.dtype, device=u.device)
        return eye - u[:, :, None] * u[:, None, :] + v[:, :, None] * v[:, None, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = _block_apply(self._blocks(self.u_in, self.v_in), _weight(self.base), 1)
        if self.u_out is not None and self.v_out is not None:
            weight = _block_apply(self._blocks(self.u_out, self.v_out), weight, 0)
        return self._run(x, weight, _bias(self.base))


# -------------------------------------------------------------------- FLoRA


@register_adapter("flora")
class FLoRAAdapter(_Adapter):
    """FLoRA: a Tucker-decomposed delta with a low-rank core space (Si et al., 2024).

    ``ΔW = s · G x_1 U₁ x_2 U₂ ··· x_N U_N`` (``x_k``: the mode-k product) over
    every mode of the base weight: ``U₁ G U₂ᵀ`` for a Linear or Embedding, and for a
    conv kernel
    ``ΔW[o,i,h,w] = s Σ G[a,b,c,d] U₁[o,a] U₂[i,b] U₃[h,c] U₄[w,d]``, which keeps the
    kernel's spatial structure instead of flattening it. Applied with the base's op.
    Factors start uniform and the core at zero, so ``ΔW = 0`` at init.

    Args:
        base: the frozen Linear, Conv2d or Embedding layer.
        rank: core size per mode: one int (clipped to each mode's size) or one per mode.
        scale: the scale ``s``.
    """

    def __init__(
        self, base: nn.Module, *, rank: int | Sequence[int] = 4, scale: float = 1.0
    ) -> None:
        super().__init__(base, (nn.Linear, nn.Conv2d, nn.Embedding))
        self.scale = scale
        shape = tuple(_weight(base).shape)
        ranks = [min(rank, n) for n in shape] if isinstance(rank, int) else list(rank)
        if len(ranks) != len(shape) or any(r < 1 for r in ranks):
            raise ConfigError(
                f"FLoRAAdapter rank must be an int >= 1 or {len(shape)} ints >= 1 (one per "
                f"mode of the weight {list(shape)}); got {rank!r}"
            )
        self.core = _param(base, *ranks)
        self.num_modes = len(shape)
        for k, (n, r) in enumerate(zip(shape, ranks)):
            self.register_parameter(f"factor_{k}", _kaiming_(_param(base, n, r)))

    def delta(self) -> torch.Tensor:
        """``ΔW``, with the base weight's shape."""
        d = self.core
        for k in range(self.num_modes):
            factor = getattr(self, f"factor_{k}")
            d = torch.tensordot(factor, d, dims=([1], [k])).movedim(0, k)
        return self.scale * d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self._run(x, self.delta())


# --------------------------------------------------------------------- RoSA


@register_adapter("rosa")
class RoSAAdapter(_Adapter):
    """RoSA: a low-rank plus a sparse delta (Nikdan et al., 2024).

    ``ΔW = s · L R + S`` with ``L R`` of rank `rank` over the weight viewed as
    ``(shape[0], rest)`` and ``S`` nonzero only on a fixed index mask; applied with
    the base's op. RoSA picks the mask from accumulated gradients; without them
    the default mask is the `density` fraction of entries of largest ``|W₀|``
    (deterministic), or pass your own. ``L`` and the sparse values start at zero.

    Args:
        base: the frozen Linear, Conv2d or Embedding layer.
        rank: rank of the low-rank part.
        density: fraction of weight entries in the sparse part, when `mask` is None.
        scale: the scale ``s`` of the low-rank part.
        mask: a bool tensor of the weight's shape marking the sparse entries.
    """

    def __init__(
        self,
        base: nn.Module,
        *,
        rank: int = 4,
        density: float = 0.05,
        scale: float = 1.0,
        mask: torch.Tensor | None = None,
    ) -> None:
        super().__init__(base, (nn.Linear, nn.Conv2d, nn.Embedding))
        _check_positive(rank, "RoSAAdapter rank")
        w = _weight(base)
        if mask is None:
            if not 0 < density <= 1:
                raise ConfigError(f"RoSAAdapter density must be in (0, 1]; got {density}")
            k = max(1, round(density * w.numel()))
            index = w.detach().abs().flatten().topk(k).indices.sort().values
        else:
            if mask.shape != w.shape or mask.dtype != torch.bool:
                raise ConfigError(
                    f"RoSAAdapter mask must be a bool tensor of the weight's shape "
                    f"{list(w.shape)}; got {mask.dtype} {list(mask.shape)}"
                )
            index = mask.flatten().nonzero().squeeze(1).to(w.device)
            if not index.numel():
                raise ConfigError("RoSAAdapter mask selects no entry; mark at least one")
        self.scale = scale
        self.register_buffer("sparse_index", index)
        self.sparse_values = _param(base, index.numel())
        self.lora_left = _param(base, w.shape[0], rank)
        self.lora_right = _kaiming_(_param(base, rank, w[0].numel()))

    def delta(self) -> torch.Tensor:
        """``ΔW``, with the base weight's shape."""
        w = _weight(self.base)
        low_rank = (self.lora_left @ self.lora_right).view(w.shape)
        index = cast(torch.Tensor, self.sparse_index)
        sparse = self.sparse_values.new_zeros(w.numel()).index_add(0, index, self.sparse_values)
        return self.scale * low_rank + sparse.view(w.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self._run(x, self.delta())


# ------------------------------------------------------------ PiSSA / SORSA


def _split_svd(base: nn.Module, rank: int, adapter: str) -> tuple[torch.Tensor, ...]:
    """Top-`rank` SVD factors of the base weight; the base keeps the residual.

    Returns ``(U_r, S_r, Vh_r)`` in float64. The base weight becomes
    ``W_res = W₀ - U_r diag(S_r) Vh_r``, computed in float64 and cast once.
    """
    w = _weight(base)
    if not 1 <= rank <= min(w.shape):
        raise ConfigError(f"{adapter} rank must be in [1, {min(w.shape)}]; got {rank}")
    w64 = w.detach().to(torch.float64)
    u, s, vh = torch.linalg.svd(w64, full_matrices=False)
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    with torch.no_grad():
        w.copy_((w64 - (u * s) @ vh).to(w.dtype))
    return u, s, vh


@register_adapter("pissa")
class PiSSAAdapter(_Adapter):
    """PiSSA: principal singular values and vectors adaptation (Meng et al., 2024).

    With ``W₀ = U S Vᵀ``, the adapter trains ``A = U_r S_r^½`` (out x r) and
    ``B = S_r^½ V_rᵀ`` (r x in) and freezes the residual ``W_res = W₀ - A B``:
    ``y = W_res x + A B x + b₀``, one Linear with ``W' = W_res + A B``. At init
    ``W' = W₀`` (up to rounding in the base dtype).

    The adapter owns `base`: its weight is overwritten with ``W_res``.

    Args:
        base: the frozen Linear layer.
        rank: the number ``r`` of principal components to train.
    """

    def __init__(self, base: nn.Module, *, rank: int = 4) -> None:
        super().__init__(base, (nn.Linear,))
        u, s, vh = _split_svd(base, rank, "PiSSAAdapter")
        w = _weight(base)
        root = s.sqrt()
        self.lora_up = nn.Parameter((u * root).to(w.dtype))
        self.lora_down = nn.Parameter((root[:, None] * vh).to(w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_down), self.lora_up)


@register_adapter("sorsa")
class SORSAAdapter(_Adapter):
    """SORSA: singular values and orthonormal-regularized singular vectors (Cao, 2024).

    With ``W₀ = U S Vᵀ``, the adapter trains ``U_p`` (out x r), ``S_p`` (r) and
    ``V_pᵀ`` (r x in) from the top-``r`` SVD and freezes the residual
    ``W_res = W₀ - U_p diag(S_p) V_pᵀ``: ``y = W_res x + U_p diag(S_p) V_pᵀ x + b₀``,
    one Linear with ``W' = W_res + U_p diag(S_p) V_pᵀ``. Training adds
    `orthonormal_penalty` to the loss; it does not enter the forward.

    The adapter owns `base`: its weight is overwritten with ``W_res``.

    Args:
        base: the frozen Linear layer.
        rank: the number ``r`` of principal components to train.
    """

    def __init__(self, base: nn.Module, *, rank: int = 4) -> None:
        super().__init__(base, (nn.Linear,))
        u, s, vh = _split_svd(base, rank, "SORSAAdapter")
        dtype = _weight(base).dtype
        self.u = nn.Parameter(u.to(dtype))
        self.singular_values = nn.Parameter(s.to(dtype))
        self.vh = nn.Parameter(vh.to(dtype))

    def orthonormal_penalty(self) -> torch.Tensor:
        """The regularizer ``|U_pᵀ U_p - I|_F + |V_pᵀ V_p - I|_F``."""
        eye = torch.eye(self.u.shape[1], dtype=self.u.dtype, device=self.u.device)
        return torch.linalg.norm(self.u.T @ self.u - eye) + torch.linalg.norm(
            self.vh @ self.vh.T - eye
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.vh) * self.singular_values, self.u)


# ---------------------------------------------------------------------- SSF

_SSF_POSITIONS = ("after", "before")


@register_adapter("ssf")
class SSFAdapter(_Adapter):
    """SSF: scale and shift features before or after a layer (Lian et al., 2022).

    ``position="after"``: ``y = gamma ⊙ (W₀ x + b₀) + beta`` per output channel,
    one layer with ``W' = diag(gamma) W₀`` and ``b' = gamma ⊙ b₀ + beta`` (an
    Embedding: each row ``gamma ⊙ W₀[i] + beta``). ``position="before"``:
    ``y = W₀ (gamma ⊙ x + beta) + b₀`` per input channel, one layer with
    ``W' = W₀ diag(gamma)`` and ``b' = b₀ + W₀ beta``. A zero-padded conv does not
    shift its padded border, so "before" a conv with padding is affine but not one
    conv (a merge keeps it). SSF's init: ``gamma ~ N(1, 0.02²)``, ``beta ~ N(0, 0.02²)``.

    Args:
        base: the frozen Linear, Conv1d, Conv2d or Embedding ("after" only) layer.
        position: ``"after"`` or ``"before"``.
    """

    def __init__(self, base: nn.Module, *, position: str = "after") -> None:
        super().__init__(base, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding))
        _check_choice(position, _SSF_POSITIONS, "SSFAdapter position")
        if position == "before" and isinstance(base, nn.Embedding):
            raise ConfigError(
                "SSFAdapter cannot scale an Embedding's integer input; use position='after'"
            )
        self.position = position
        w = _weight(base)
        if isinstance(base, nn.Embedding):
            n = w.shape[1]
        elif position == "after":
            n = w.shape[0]
        else:
            n = w.shape[1] * getattr(base, "groups", 1)
        self.gamma = _normal_(_param(base, n), 1.0, 0.02)
        self.beta = _normal_(_param(base, n), 0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma, beta = _channels(self.gamma, self._layer), _channels(self.beta, self._layer)
        if self.position == "before":
            return self.base(x * gamma + beta)
        return self.base(x) * gamma + beta


# ---------------------------------------------------------- FedPara / LoHa

_FEDPARA_FORMS = ("matrix", "tucker")


@register_adapter("fedpara")
class FedParaAdapter(_Adapter):
    """FedPara / LoHa: a Hadamard product of two low-rank products (Hyeon-Woo et al., 2022).

    ``form="matrix"``: ``ΔW = s · (X₁ Y₁ᵀ) ⊙ (X₂ Y₂ᵀ)`` over the weight viewed as
    ``(shape[0], rest)``; rank up to ``r²`` from ``2 r (m + n)`` parameters.
    ``form="tucker"`` (conv only, FedPara's Proposition 2):
    ``ΔW = s · (T₁ x_1 X₁ x_2 Y₁) ⊙ (T₂ x_1 X₂ x_2 Y₂)`` (``x_k``: the mode-k
    product) with kernel-sized cores ``T_i`` of shape ``(r, r, kh, kw)``, ``X_i``
    (out x r) and ``Y_i`` (in/groups x r).
    Applied with the base's op; ``X₂`` starts at zero so ``ΔW = 0`` at init.

    Args:
        base: the frozen Linear, Conv2d or Embedding layer.
        rank: the inner rank ``r``.
        scale: the scale ``s``.
        form: ``"matrix"`` or ``"tucker"``; default ``"tucker"`` for a conv, else
            ``"matrix"``.
    """

    def __init__(
        self, base: nn.Module, *, rank: int = 4, scale: float = 1.0, form: str | None = None
    ) -> None:
        super().__init__(base, (nn.Linear, nn.Conv2d, nn.Embedding))
        _check_positive(rank, "FedParaAdapter rank")
        is_conv = self._layer.spatial > 0
        form = form or ("tucker" if is_conv else "matrix")
        _check_choice(form, _FEDPARA_FORMS, "FedParaAdapter form")
        if form == "tucker" and not is_conv:
            raise ConfigError(
                f"FedParaAdapter form='tucker' needs a conv base; got "
                f"{type(base).__name__}; use form='matrix'"
            )
        self.scale = scale
        self.form = form
        w = _weight(base)
        rows, cols = w.shape[0], w.shape[1] if form == "tucker" else w[0].numel()
        self.x1 = _normal_(_param(base, rows, rank), 0.0, 0.1)
        self.y1 = _normal_(_param(base, cols, rank), 0.0, 0.1)
        self.x2 = _param(base, rows, rank)
        self.y2 = _normal_(_param(base, cols, rank), 0.0, 0.1)
        self.t1: nn.Parameter | None = None
        self.t2: nn.Parameter | None = None
        if form == "tucker":
            self.t1 = _kaiming_(_param(base, rank, rank, *w.shape[2:]))
            self.t2 = _kaiming_(_param(base, rank, rank, *w.shape[2:]))

    def delta(self) -> torch.Tensor:
        """``ΔW``, with the base weight's shape."""
        shape = _weight(self.base).shape
        if self.form == "tucker":
            h1 = torch.einsum("ab...,oa,ib->oi...", self.t1, self.x1, self.y1)
            h2 = torch.einsum("ab...,oa,ib->oi...", self.t2, self.x2, self.y2)
        else:
            h1 = (self.x1 @ self.y1.T).view(shape)
            h2 = (self.x2 @ self.y2.T).view(shape)
        return self.scale * h1 * h2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self._run(x, self.delta())


# ------------------------------------------------------- Compacter / PHM


@register_adapter("phm")
class PHMAdapter(_Adapter):
    """PHM / Compacter: a delta that is a sum of Kronecker products.

    ``ΔW = s · Σ_{i=1..n} A_i ⊗ B_i`` (Zhang et al., 2021; Mahabadi et al., 2021)
    with "rule" matrices ``A_i`` (n x n) and ``B_i`` (out/n x in/n), so
    ``ΔW[a p + j, b q + k] = s Σ_i A_i[a, b] B_i[j, k]``. Compacter's low-rank
    option: ``B_i = L_i R_i`` of rank `rank`. On a conv each ``B_i`` carries the
    kernel, ``(out/n, in/(groups n), kh, kw)``, and ``A_i`` mixes channel blocks.
    Applied with the base's op; ``B_i`` (or ``R_i``) starts at zero.

    Args:
        base: the frozen Linear or Conv2d layer.
        n: the PHM dimension; must divide the weight's first two dims.
        rank: rank of each ``B_i``; None keeps the ``B_i`` dense.
        scale: the scale ``s``.
    """

    def __init__(
        self, base: nn.Module, *, n: int = 2, rank: int | None = None, scale: float = 1.0
    ) -> None:
        super().__init__(base, (nn.Linear, nn.Conv2d))
        w = _weight(base)
        if n < 1 or w.shape[0] % n or w.shape[1] % n:
            raise ConfigError(
                f"PHMAdapter n must be >= 1 and divide the weight dims "
                f"{list(w.shape[:2])}; got n={n}"
            )
        if rank is not None:
            _check_positive(rank, "PHMAdapter rank")
        self.scale = scale
        self.n = n
        p, q, kernel = w.shape[0] // n, w.shape[1] // n, tuple(w.shape[2:])
        self.block_shape = (p, q, *kernel)
        self.rule = _normal_(_param(base, n, n, n), 0.0, 1.0 / n)
        self.b: nn.Parameter | None = None
        self.b_left: nn.Parameter | None = None
        self.b_right: nn.Parameter | None = None
        if rank is None:
            self.b = _param(base, n, *self.block_shape)
        else:
            self.b_left = _kaiming_(_param(base, n, p, rank))
            self.b_right = _param(base, n, rank, q * math.prod(kernel))

    def blocks(self) -> torch.Tensor:
        """The ``B_i``, shape ``(n, out/n, in/n, *kernel)``."""
        if self.b_left is not None and self.b_right is not None:
            return (self.b_left @ self.b_right).view(self.n, *self.block_shape)
        return cast(torch.Tensor, self.b)

    def delta(self) -> torch.Tensor:
        """``ΔW``, with the base weight's shape."""
        d = torch.einsum("iab,ijk...->ajbk...", self.rule, self.blocks())
        return self.scale * d.reshape(_weight(self.base).shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self._run(x, self.delta())


# ------------------------------------------------------ not affine: kept

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "relu": F.relu,
}
_PLACEMENTS = ("sequential", "parallel")


@register_adapter("bottleneck")
class BottleneckAdapter(_Adapter):
    """A nonlinear bottleneck adapter (Houlsby et al., 2019; AdaptFormer, Chen et al., 2022).

    ``f(z) = U act(D z + d) + u``; ``placement="sequential"`` (Houlsby):
    ``y = h + s·f(h)`` on the base output ``h = W₀ x + b₀``; ``"parallel"``
    (AdaptFormer): ``y = h + s·f(x)``. With ``act`` nonlinear and ``U ≠ 0`` this is
    not affine in ``x`` and equals no plain layer: a merge must keep it.
    ``U`` starts at zero (AdaptFormer's init).

    Args:
        base: the frozen Linear layer.
        bottleneck: width of the bottleneck.
        scale: the scale ``s``.
        placement: ``"sequential"`` or ``"parallel"``.
        activation: ``"gelu"`` or ``"relu"``.
    """

    def __init__(
        self,
        base: nn.Module,
        *,
        bottleneck: int = 8,
        scale: float = 1.0,
        placement: str = "sequential",
        activation: str = "gelu",
    ) -> None:
        super().__init__(base, (nn.Linear,))
        _check_positive(bottleneck, "BottleneckAdapter bottleneck")
        _check_choice(placement, _PLACEMENTS, "BottleneckAdapter placement")
        _check_choice(activation, tuple(_ACTIVATIONS), "BottleneckAdapter activation")
        self.scale = scale
        self.placement = placement
        self.activation = activation
        out, inp = _weight(base).shape
        width = out if placement == "sequential" else inp
        self.down = _kaiming_(_param(base, bottleneck, width))
        self.down_bias = _param(base, bottleneck)
        self.up = _param(base, out, bottleneck)
        self.up_bias = _param(base, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        z = h if self.placement == "sequential" else x
        act = _ACTIVATIONS[self.activation]
        return h + self.scale * F.linear(
            act(F.linear(z, self.down, self.down_bias)), self.up, self.up_bias
        )


@register_adapter("routed_lowrank")
class RoutedLowRankAdapter(_Adapter):
    """Input-dependent routing between low-rank deltas (mixture-of-LoRA style).

    ``g(x) = softmax(G x + g₀)`` over `num_experts` experts and
    ``y = W₀ x + b₀ + s Σ_e g_e(x) B_e A_e x``: the gate depends on the input, so
    the layer is not affine in ``x`` (unless every ``B_e A_e`` is equal) and a
    merge must keep it. ``B_e`` start at zero.

    Args:
        base: the frozen Linear layer.
        rank: rank of each expert's delta.
        num_experts: number of low-rank experts.
        scale: the scale ``s``.
    """

    def __init__(
        self, base: nn.Module, *, rank: int = 4, num_experts: int = 2, scale: float = 1.0
    ) -> None:
        super().__init__(base, (nn.Linear,))
        _check_positive(rank, "RoutedLowRankAdapter rank")
        _check_positive(num_experts, "RoutedLowRankAdapter num_experts")
        self.scale = scale
        out, inp = _weight(base).shape
        self.router = _kaiming_(_param(base, num_experts, inp))
        self.router_bias = _param(base, num_experts)
        self.lora_down = _kaiming_(_param(base, num_experts, rank, inp))
        self.lora_up = _param(base, num_experts, out, rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.linear(x, self.router, self.router_bias).softmax(dim=-1)
        low = torch.einsum("...i,eri->...er", x, self.lora_down)
        deltas = torch.einsum("...er,eor->...eo", low, self.lora_up)
        return self.base(x) + self.scale * (gate.unsqueeze(-1) * deltas).sum(-2)
