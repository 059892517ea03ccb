"""Analytic fast paths: a wrapper's plain layer from its adapter's known algebra.

The probe reads a Linear with ``in_features`` forward rows; a rule here computes
the same dense weight and bias from the adapter's parameters directly, in float64,
at the cost of a few weight-sized products. A rule is a *candidate* only: the
engine (`edgerep.merge._engine`) builds the plain layer from it and keeps it only
if `edgerep.fold.verify` finds it equal to the wrapper's own float64 forward on
random inputs (the same gate as the probe); a rejected candidate falls back to
the probe, and the report says which route each layer took.

A rule gets a float64 copy of the wrapper made for it and may overwrite it (PEFT's
merge works in place; ``lora`` adds its product into the base weight), so that a
layer costs one float64 weight, not two: the engine records the wrapper's outputs
on the verifier's random inputs *before* calling the rule, and gives the probe a
fresh copy. A rule that declines must raise `NoFastPath` before writing anything;
the next rule along the class's MRO is then tried.

Rules (registered by the wrapper class's qualified name, looked up along its MRO):

* ``lora`` for PEFT's LoRA ``Linear`` with plain LoRA adapters (LoRA, rsLoRA,
  PiSSA/OLoRA/LoRA-GA initializations, ``lora_bias``): ``W' = W₀ + Σ s_i B_i A_i``
  as one in-place ``addmm`` per adapter on the float64 base weight, with PEFT's own
  ``scaling``; it declines for LoRA variants (DoRA, ...) and ``fan_in_fan_out``,
  which ``peft-merge`` then takes.
* ``peft-merge`` for every PEFT tuner layer (LoRA, rsLoRA, PiSSA/OLoRA/LoRA-GA
  initializations, DoRA, AdaLoRA, LoHa, LoKr, IA³, OFT, BOFT, VeRA, ...): PEFT's
  own ``merge()`` of the selected adapters, run on the float64 copy of the layer
  (PEFT's per-type formulas, in float64 instead of the model dtype), then the base
  layer's weight and bias are read. PEFT's formulas are not rewritten here.
* ``ssf``: ``W' = diag(gamma) W₀, b' = gamma ⊙ b₀ + beta`` (after) or
  ``W' = W₀ diag(gamma),
  b' = b₀ + W₀ beta`` (before a Linear; a padded conv is rejected by the verifier).
* ``low-rank``: PiSSA ``W' = W_res + A B``, SORSA ``W' = W_res + U diag(S) Vᵀ``.
* ``reflection``: ETHER ``W' = W₀ H`` or ``H W₀``, ETHER+ ``W' = H⁺_out W₀ H⁺_in``.

Any other exception a rule raises is treated like a decline, with its text (and
the next rule gets a fresh copy).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from edgerep.merge._layers import LayerKind, _dense

__all__ = ["FAST_RULES", "NoFastPath", "register_rule", "rules_for"]

_F64 = torch.float64
Rule = Callable[[nn.Module, str, LayerKind], tuple[torch.Tensor, torch.Tensor]]


class NoFastPath(Exception):
    """A rule's algebra does not cover this module; ``str(e)`` says why."""


FAST_RULES: dict[str, tuple[str, Rule]] = {}


def register_rule(qualname: str, name: str) -> Callable[[Rule], Rule]:
    """Register `rule` (named `name` in reports) for the wrapper class `qualname`."""

    def add(rule: Rule) -> Rule:
        if qualname in FAST_RULES:
            raise ValueError(f"a fast-path rule for {qualname!r} is already registered")
        FAST_RULES[qualname] = (name, rule)
        return rule

    return add


def rules_for(module: nn.Module) -> list[tuple[str, Rule]]:
    """The rules of `module`'s class and its registered base classes, nearest first."""
    found = []
    for cls in type(module).__mro__:
        rule = FAST_RULES.get(f"{cls.__module__}.{cls.__qualname__}")
        if rule is not None:
            found.append(rule)
    return found


# --- PEFT: its own merge, in float64 --------------------------------------------------------


def _peft_active(layer: Any) -> list[str]:
    """The adapters a PEFT tuner layer's forward applies."""
    if layer.merged_adapters:
        raise NoFastPath(f"adapters {layer.merged_adapters} are already merged")
    if layer.disable_adapters:
        return []
    have = layer._get_available_adapters()
    return [n for n in layer.active_adapters if n in have]


@register_rule("peft.tuners.tuners_utils.BaseTunerLayer", "peft-merge")
def _peft_merge(module: nn.Module, base_path: str, kind: LayerKind) -> tuple[Any, Any]:
    layer: Any = module  # the engine's float64 copy: PEFT merges into it in place
    names = _peft_active(layer)
    if names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT's notes on merging, not errors
            layer.merge(adapter_names=names)
    return kind.params(layer.get_submodule(base_path))


@register_rule("peft.tuners.lora.layer.Linear", "lora")
def _lora(module: nn.Module, base_path: str, kind: LayerKind) -> tuple[Any, Any]:
    layer: Any = module
    names = _peft_active(layer)
    if kind.name != "linear" or layer.fan_in_fan_out:
        raise NoFastPath("fan_in_fan_out or a base layer other than nn.Linear")
    variants = [n for n in names if n in layer.lora_variant]
    if variants:
        raise NoFastPath(f"adapter(s) {variants} are LoRA variants (DoRA, ...)")
    base = layer.get_submodule(base_path)
    weight, bias = kind.params(base)  # the copy's float64 tensors themselves
    with torch.no_grad():
        for name in names:
            down, up = layer.lora_A[name], layer.lora_B[name]
            scale = float(layer.scaling[name])
            weight.addmm_(up.weight.to(_F64), down.weight.to(_F64), alpha=scale)
            if layer.lora_bias[name]:
                bias = bias + scale * up.bias.to(_F64)
    return weight, bias


# --- zoo adapters ---------------------------------------------------------------------------


def _params(module: nn.Module, base_path: str, kind: LayerKind) -> tuple[Any, Any, Any]:
    base = module.get_submodule(base_path)
    w, b = kind.params(base)
    return base, w, b


def _channels_last(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """View a per-input-channel vector so it scales a dense ``(out, in, *k)`` weight."""
    return v.view(1, -1, *([1] * (w.ndim - 2)))


def _ssf(module: Any, base_path: str, kind: LayerKind) -> tuple[Any, Any]:
    base, w, b = _params(module, base_path, kind)
    gamma, beta = module.gamma.detach().to(_F64), module.beta.detach().to(_F64)
    if kind.name == "embedding":
        if module.position != "after":
            raise NoFastPath("SSF before an embedding")
        return w * gamma + beta, b  # each row gamma * W[i] + beta
    if module.position == "after":
        scale = gamma.view(-1, *([1] * (w.ndim - 1)))
        return w * scale, gamma * b + beta
    if w.ndim > 2 and any(int(p) for p in getattr(base, "padding", (0,))):
        raise NoFastPath("SSF before a padded conv is not one conv")
    shift = (w * _channels_last(beta, w)).sum(dim=tuple(range(1, w.ndim)))
    return w * _channels_last(gamma, w), b + shift


register_rule("edgerep.zoo.adapters.SSFAdapter", "ssf")(_ssf)


@register_rule("edgerep.zoo.blocks.SSFLinear", "ssf")
def _ssf_linear(module: Any, base_path: str, kind: LayerKind) -> tuple[Any, Any]:
    return _ssf(module, base_path, kind)


@register_rule("edgerep.zoo.blocks.SSFConv", "ssf")
def _ssf_conv(module: Any, base_path: str, kind: LayerKind) -> tuple[Any, Any]:
    return _ssf(module, base_path, kind)


@register_rule("edgerep.zoo.adapters.PiSSAAdapter", "low-rank")
def _pissa(module: Any, base_path: str, kind: LayerKind) -> tuple[Any, Any]:
    _, w, b = _params(module, base_path, kind)
    up, down = module.lora_up.detach().to(_F64), module.lora_down.detach().to(_F64)
    return w + up @ down, b


@register_rule("edgerep.zoo.adapters.SORSAAdapter", "low-rank")
def _sorsa(module: Any, base_path: str, kind: LayerKind) -> tuple[Any, Any]:
    _, w, b = _params(module, base_path, kind)
    u, s, vh = (t.detach().to(_F64) for t in (module.u, module.singular_values, module.vh))
    return w + (u * s) @ vh, b


def _block_apply(blocks: torch.Tensor, weight: torch.Tensor, dim: int) -> torch.Tensor:
    from edgerep.zoo.adapters import _block_apply as apply

    return apply(blocks, weight, dim)


def _stored(module: Any, base_path: str) -> tuple[Any, torch.Tensor, int]:
    """The base layer, its weight as stored (grouped for a grouped conv), its groups."""
    base = module.get_submodule(base_path)
    return base, base.weight.detach().to(_F64), int(getattr(base, "groups", 1))


@register_rule("edgerep.zoo.adapters.ETHERAdapter", "reflection")
def _ether(module: Any, base_path: str, kind: LayerKind) -> tuple[Any, Any]:
    base, w, groups = _stored(module, base_path)
    w = _block_apply(module.reflection().detach().to(_F64), w, module.dim)
    return _dense(w, groups), kind.params(base)[1]


@register_rule("edgerep.zoo.adapters.ETHERPlusAdapter", "reflection")
def _ether_plus(module: Any, base_path: str, kind: LayerKind) -> tuple[Any, Any]:
    base, w, groups = _stored(module, base_path)
    blocks = module._blocks
    w = _block_apply(blocks(module.u_in, module.v_in).detach().to(_F64), w, 1)
    if module.u_out is not None and module.v_out is not None:
        w = _block_apply(blocks(module.u_out, module.v_out).detach().to(_F64), w, 0)
    return _dense(w, groups), kind.params(base)[1]
