"""`merge`: every adapter-wrapped layer whose effect is affine becomes one plain layer.

Algebra: at inference an adapter-wrapped layer computes ``f(x)``, a function of its
one input. When ``f`` is affine (checked: ``f(x+y) - f(x) - f(y) + f(0) = 0``) it
*is* a plain layer with the base layer's geometry, and that layer is read off ``f``
in float64 by the fold engine's probe (`edgerep.fold.probe`): ``b = f(0)``,
``W = (f(I) - b)ᵀ`` for a Linear, the impulse response for a conv, ``f(i)`` for
row ``i`` of an embedding table. It is kept only if `edgerep.fold.verify` finds it
equal to ``f`` within ``rtol`` on random inputs, then cast once to the base dtype.
No adapter type has a formula here: LoRA, DoRA, IA3, OFT, a paper's custom module
all go through the same path.

Finding the wrappers (`_find`): a PEFT tuner layer (its base layer from
``get_base_layer()``); else a module with a child named ``base_layer`` or ``base``
that is a plain layer, or with exactly one plain-layer child and parameters of its
own (of a registered plain type exactly, so attention's out_proj does not count),
holding state besides the base layer; else a subclass of a plain layer with
parameters besides ``weight`` and ``bias`` (loralib style), which is its own base.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from edgerep.errors import ConfigError, did_you_mean
from edgerep.fold import probe, verify
from edgerep.fold._engine import PLAIN_LAYERS
from edgerep.fold.report import KeptRegion
from edgerep.merge import _combine, _peft
from edgerep.merge._layers import LayerKind, count_params, describe, is_exact, kind_for
from edgerep.merge.report import MergedLayer, MergeReport

logger = logging.getLogger(__name__)

__all__ = ["merge"]

Fn = Callable[[torch.Tensor], torch.Tensor]
_F64 = torch.float64
_BASE_NAMES = ("base_layer", "base")
_STANDARD = frozenset({"weight", "bias"})


@dataclass
class _Wrapper:
    """An adapter-wrapped layer found in the model."""

    path: str
    module: nn.Module
    role: str  # 'adapter', 'modules_to_save', 'kept'
    base_path: str = ""  # path of the base layer inside the wrapper ('' : the wrapper itself)
    kind: LayerKind | None = None
    peft: bool = False
    reason: str = ""


@dataclass
class _Plan:
    """Which adapters each layer applies."""

    mode: str  # 'active', 'adapter', 'combine'
    weights: dict[str, float] = field(default_factory=dict)
    method: str = ""
    density: float | None = None
    keep_zeros: bool = False
    rtol: float = verify.DEFAULT_RTOL
    generator: torch.Generator | None = None
    zeroed: int = 0
    zeroed_layers: int = 0


def merge(
    model: nn.Module,
    *,
    adapter: str | None = None,
    combine: Mapping[str, float] | None = None,
    method: str = "linear",
    density: float | None = None,
    seed: int = 0,
    keep_zeros: bool = False,
    rtol: float = verify.DEFAULT_RTOL,
    require_adapter: bool = False,
) -> tuple[nn.Module, MergeReport]:
    """Merge every adapter whose eval-mode effect is affine into a plain layer.

    Each adapter-wrapped layer becomes a plain ``nn.Linear``, ``nn.Conv1d/2d/3d``
    or ``nn.Embedding`` (or transformers' ``Conv1D``) with the base layer's shape,
    configuration and dtype, read off the wrapper's function in float64 and
    verified. PEFT wrappers are removed: a `PeftModel` gives back the model it
    wraps. What cannot merge (prompt or prefix tuning, nonlinear adapters,
    unsupported base layers) stays as it is and is listed in the report with the
    reason.

    Args:
        model: the model (a `PeftModel`, a model holding PEFT tuner layers or any
            other adapter modules); never mutated.
        adapter: merge only this PEFT adapter (the others are switched off).
        combine: merge a combination of PEFT adapters, adapter name -> weight; each
            adapter's delta ``W_i - W0`` is read off the layer with only that adapter
            on, then combined per tensor with `method` (see `edgerep.merge._combine`).
        method: 'linear', 'task_arithmetic', 'ties', 'dare_linear' or 'dare_ties'.
        density: the fraction kept by TIES (by magnitude) and DARE (at random).
        seed: seed of DARE's random masks (same seed, same model).
        keep_zeros: keep the exact zeros of the base weights (a pruned or sparse
            base stays sparse); the merged layer then differs from the adapter's
            function at those entries, by design.
        rtol: relative tolerance of the float64 verifier.
        require_adapter: refuse a model with no adapter at all (instead of returning
            it as it is with a note), for callers whose only job is to merge.

    Returns:
        (plain eval-mode model, report).

    Raises:
        ConfigError: bad arguments, an unknown adapter name or method, or adapters
            that PEFT already merged into the base weights when `adapter` or
            `combine` asks to separate them; no adapter at all with `require_adapter`.
    """
    start = time.perf_counter()
    plan = _make_plan(model, adapter, combine, method, density, seed, keep_zeros, rtol)
    report = MergeReport(
        mode=plan.mode,
        method=plan.method,
        weights=dict(plan.weights),
        density=plan.density,
        seed=seed,
        params_before=count_params(model),
    )
    work = copy.deepcopy(model)
    if model.training:
        report.notes.append(
            "the model was in train mode: merged its eval-mode function (dropout off)"
        )
    root, kept, notes = _peft.unwrap(work)
    report.kept += kept
    report.notes += notes
    if kept:  # a prompt-learning model: nothing to merge
        work.eval()
        report.params_after = count_params(work)
        report.seconds = time.perf_counter() - start
        return work, report

    available = _peft.available_adapters(root)
    _check_names(plan, available, root)
    wrappers = _find(root)
    found = len(wrappers)
    if not found and require_adapter:
        raise ConfigError(
            f"no adapter found in the model ({type(model).__name__}): no PEFT tuner layer or "
            "adapter-wrapped Linear/Conv/Embedding, so there is nothing to merge; attach "
            "adapters (CLI: --adapter PATH, a PEFT adapter directory or a .safetensors LoRA "
            "file), or fold/convert a model without adapters with `edgerep fold`/`convert`"
        )
    while wrappers:  # drop each wrapper once replaced, so its base layer can be freed
        root = _process(root, wrappers.pop(0), plan, report)
    _note_dropped(plan, available, _peft.active_adapters(model), report)
    if plan.keep_zeros:
        report.notes.append(
            f"keep_zeros: {plan.zeroed:,} weight entries at the base's exact zeros were set to "
            f"zero in {plan.zeroed_layers} layer(s); there the merged model deliberately differs "
            "from the adapter's function"
        )
    if not found:
        report.notes.append("no adapter-wrapped layer was found: the model is returned as is")
    root.eval()
    report.params_after = count_params(root)
    report.seconds = time.perf_counter() - start
    return root, report


# --- arguments ----------------------------------------------------------------------------


def _make_plan(
    model: object,
    adapter: str | None,
    combine: Mapping[str, float] | None,
    method: str,
    density: float | None,
    seed: int,
    keep_zeros: bool,
    rtol: float,
) -> _Plan:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"merge() needs a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(rtol, int | float) or not rtol > 0:
        raise ConfigError(f"rtol must be a positive number, got {rtol!r}")
    if not isinstance(seed, int):
        raise ConfigError(f"seed must be an int, got {seed!r}")
    if adapter is not None and combine is not None:
        raise ConfigError("give either adapter= (one adapter) or combine= (several), not both")
    if method not in _combine.METHODS:
        _combine.check_method(method, density)  # raises, with a did-you-mean
    if combine is None and (method != "linear" or density is not None):
        raise ConfigError(
            f"method={method!r} and density={density!r} apply only to combine=...; pass "
            "combine={'name': weight, ...} to combine adapters"
        )
    if adapter is not None:
        if not isinstance(adapter, str) or not adapter:
            raise ConfigError(f"adapter must be an adapter name, got {adapter!r}")
        return _Plan("adapter", {adapter: 1.0}, keep_zeros=keep_zeros, rtol=float(rtol))
    if combine is None:
        return _Plan("active", keep_zeros=keep_zeros, rtol=float(rtol))
    if not isinstance(combine, Mapping) or not combine:
        raise ConfigError(
            f"combine must map adapter names to weights, e.g. {{'a': 0.7, 'b': 0.3}}, got {combine!r}"
        )
    weights: dict[str, float] = {}
    for name, w in combine.items():
        if not isinstance(name, str) or isinstance(w, bool) or not isinstance(w, int | float):
            raise ConfigError(f"combine entry {name!r}: {w!r} is not a name and a number")
        if not math.isfinite(w):
            raise ConfigError(f"combine weight of {name!r} is {w!r}; weights must be finite")
        weights[name] = float(w)
    _combine.check_method(method, density)
    return _Plan(
        "combine",
        weights,
        method=method,
        density=density,
        keep_zeros=keep_zeros,
        rtol=float(rtol),
        generator=torch.Generator().manual_seed(seed),
    )


def _check_names(plan: _Plan, available: list[str], root: nn.Module) -> None:
    if plan.mode == "active":
        return
    names = set(available) | _saved_names(root)
    if not names:
        raise ConfigError(
            f"{'adapter' if plan.mode == 'adapter' else 'combine'}= names PEFT adapters, but the "
            "model holds none; merge it without naming adapters"
        )
    unknown = [n for n in plan.weights if n not in names]
    if unknown:
        hint = did_you_mean(unknown[0], names)
        raise ConfigError(
            f"adapter(s) {', '.join(repr(n) for n in unknown)} not in the model;{hint} "
            f"its adapters: {', '.join(sorted(names))}"
        )
    merged = _peft.merged_adapters(root)
    if merged:
        raise ConfigError(
            f"adapter(s) {', '.join(repr(n) for n in merged)} are already merged into the base "
            "weights (PEFT merge_adapter()), so single adapters cannot be separated from the "
            "base; call unmerge_adapter() first, or merge without adapter=/combine="
        )


def _saved_names(root: nn.Module) -> set[str]:
    names: set[str] = set()
    for m in root.modules():
        if _peft.is_modules_to_save(m):
            names.update(m.modules_to_save.keys())  # type: ignore[union-attr,operator]
    return names


def _note_dropped(
    plan: _Plan, available: list[str], active: list[str], report: MergeReport
) -> None:
    used = list(plan.weights) if plan.mode != "active" else active
    dropped = [n for n in available if n not in used]
    if dropped:
        report.notes.append(
            f"adapter(s) {', '.join(repr(n) for n in dropped)} held by the model but not "
            f"{'active' if plan.mode == 'active' else 'selected'} are not in the merged model"
        )


# --- finding the wrappers -----------------------------------------------------------------


def _find(root: nn.Module) -> list[_Wrapper]:
    """Adapter-wrapped layers, outermost first (a found wrapper's inside is not searched)."""
    found: list[_Wrapper] = []
    covered: list[str] = []
    for name, module in root.named_modules():
        if any(c == "" or name.startswith(c + ".") for c in covered):
            continue
        w = _classify(name, module)
        if w is not None:
            found.append(w)
            covered.append(name)
    return found


def _classify(name: str, module: nn.Module) -> _Wrapper | None:
    if _peft.is_modules_to_save(module):
        return _Wrapper(name, module, "modules_to_save", peft=True)
    if _peft.is_other_aux_wrapper(module):
        return _Wrapper(
            name,
            module,
            "kept",
            peft=True,
            reason=f"PEFT {type(module).__name__} is not an adapter-wrapped layer edgerep merges",
        )
    if _peft.is_tuner_layer(module):
        base = _peft.base_layer(module)
        base_path = next(n for n, m in module.named_modules() if m is base)
        kind = kind_for(base)
        if kind is None:
            return _Wrapper(
                name,
                module,
                "kept",
                peft=True,
                reason=f"{_peft.type_name(module)}: its base layer {type(base).__name__} is not a "
                "Linear, Conv1d/2d/3d or Embedding",
            )
        return _Wrapper(name, module, "adapter", base_path, kind, peft=True)
    kind = kind_for(module)
    if kind is not None:  # a plain layer, or a subclass carrying adapter parameters
        if is_exact(module):
            return None
        extra = [n for n, _ in module.named_parameters() if n not in _STANDARD]
        return _Wrapper(name, module, "adapter", "", kind) if extra else None
    if type(module) in PLAIN_LAYERS:  # attention, norms: plain layers of their own
        return None
    children = dict(module.named_children())
    base_path = next(
        (n for n in _BASE_NAMES if n in children and kind_for(children[n]) is not None), None
    )
    if base_path is None:
        plain = [n for n, c in children.items() if is_exact(c)]
        own = any(True for _ in module.parameters(recurse=False)) or any(
            True for _ in module.buffers(recurse=False)
        )
        if len(plain) != 1 or not own:
            return None
        base_path = plain[0]
    base = children[base_path]
    inside = {id(t) for t in (*base.parameters(), *base.buffers())}
    if all(id(t) in inside for t in (*module.parameters(), *module.buffers())):
        return None  # nothing besides the base layer: not an adapter
    return _Wrapper(name, module, "adapter", base_path, kind_for(base))


# --- merging one wrapper ------------------------------------------------------------------


def _set(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    if path == "":
        return new
    parent, _, attr = path.rpartition(".")
    setattr(root.get_submodule(parent), attr, new)
    return root


def _process(root: nn.Module, w: _Wrapper, plan: _Plan, report: MergeReport) -> nn.Module:
    if w.role == "kept":
        report.kept.append(KeptRegion(w.path, (w.path,), w.reason))
        return root
    if w.role == "modules_to_save":
        return _swap_saved(root, w, plan, report)
    assert w.kind is not None
    f64 = copy.deepcopy(w.module).to(_F64).eval()
    base64 = f64.get_submodule(w.base_path)
    names: list[str] = []
    if w.peft:
        have = set(_peft.available_adapters(f64))
        if plan.mode == "active":
            names = _peft.active_adapters(f64)
        else:
            names = [n for n in plan.weights if n in have]
    if w.peft and plan.mode == "combine":
        result = _read_combination(w.kind, f64, base64, names, plan)
    else:
        if w.peft and plan.mode == "adapter":
            _peft.select(f64, names)
        result = _read(w.kind, f64, base64, plan.rtol)
    if isinstance(result, str):
        report.kept.append(KeptRegion(w.path, (w.path,), f"{_peft.type_name(w.module)}: {result}"))
        return root
    weight, bias, checks = result
    if plan.keep_zeros:
        weight, bias = _keep_zeros(w, f64, base64, weight, bias, plan)
    base: Any = w.module.get_submodule(w.base_path)
    dtype = base.weight.dtype
    final = w.kind.build(base, weight, bias, dtype).train(False)
    report.merged.append(
        MergedLayer(
            path=w.path,
            adapter=_peft.type_name(w.module),
            adapters=tuple(names),
            base=describe(base),
            became=describe(final),
            params_before=count_params(w.module),
            params_after=count_params(final),
            max_abs_error=max(c.max_abs_error for c in checks),
            max_rel_error=max(c.max_rel_error for c in checks),
            sizes_checked=checks[0].shapes,
        )
    )
    return _set(root, w.path, final)


_Read = tuple[torch.Tensor, torch.Tensor, list[verify.VerifyResult]]


def _read(kind: LayerKind, f: nn.Module, base: nn.Module, rtol: float) -> _Read | str:
    """The verified plain layer of `f` (dense weight, bias, checks), or why there is none."""
    shape = kind.affine_shape(base)
    if shape is not None:
        try:
            err = verify.affinity_error(f, shape)
        except Exception as e:
            return (
                f"its forward fails on one {list(shape)} tensor ({type(e).__name__}: {e}); an "
                "adapter-wrapped layer must take one tensor"
            )
        if not err <= rtol:
            return (
                f"not affine in its input (f(x+y)-f(x)-f(y)+f(0) is {err:.1e} relative): a "
                "nonlinear or input-dependent adapter cannot become one plain layer"
            )
    try:
        weight, bias = kind.read(f, base)
        candidate = kind.build(base, weight, bias, _F64).eval()
    except probe.ProbeFailure as e:
        return f"not a plain {kind.name}: {e}"
    except Exception as e:  # the function itself refused a probe input
        return f"not a plain {kind.name}: fails on a probe input ({type(e).__name__}: {e})"
    check = kind.verify(f, candidate, base, rtol)
    if not check.ok:
        return f"the plain {kind.name} read off it was rejected by the verifier: {check.reason}"
    return weight, bias, [check]


def _read_combination(
    kind: LayerKind, f: nn.Module, base: nn.Module, names: Sequence[str], plan: _Plan
) -> _Read | str:
    """``W0 + combine(W_i - W0)``, each ``W_i`` read off with only adapter ``i`` on."""
    _peft.select(f, [])
    r0 = _read(kind, f, base, plan.rtol)
    if isinstance(r0, str):
        return f"its base layer: {r0}"
    w0, b0, checks = r0
    dws, dbs = [], []
    for name in plan.weights:
        if name not in names:  # this layer does not hold the adapter: no delta
            dws.append(torch.zeros_like(w0))
            dbs.append(torch.zeros_like(b0))
            continue
        _peft.select(f, [name])
        r = _read(kind, f, base, plan.rtol)
        if isinstance(r, str):
            return f"with only adapter {name!r} on: {r}"
        dws.append(r[0] - w0)
        dbs.append(r[1] - b0)
        checks += r[2]
    weights = list(plan.weights.values())
    assert plan.generator is not None
    dw = _combine.combine(plan.method, dws, weights, density=plan.density, generator=plan.generator)
    has_bias = getattr(base, "bias", None) is not None or any(bool(d.any()) for d in dbs)
    db = (
        _combine.combine(plan.method, dbs, weights, density=plan.density, generator=plan.generator)
        if has_bias
        else torch.zeros_like(b0)
    )
    weight, bias = w0 + dw, b0 + db
    if _combine.is_linear(plan.method):
        # the result must equal f0 + Σ w_i (f_i - f0): verify the combined layer against it
        candidate = kind.build(base, weight, bias, _F64).eval()
        check = kind.verify(_weighted_function(f, plan.weights, names), candidate, base, plan.rtol)
        if not check.ok:
            return f"the combined {kind.name} was rejected by the verifier: {check.reason}"
        checks.append(check)
    return weight, bias, checks


def _weighted_function(f: nn.Module, weights: Mapping[str, float], names: Sequence[str]) -> Fn:
    def combined(x: torch.Tensor) -> torch.Tensor:
        _peft.select(f, [])
        y0 = f(x)
        y = y0.clone()
        for name, w in weights.items():
            if name in names:
                _peft.select(f, [name])
                y = y + w * (f(x) - y0)
        return y

    return combined


def _keep_zeros(
    w: _Wrapper,
    f64: nn.Module,
    base64: nn.Module,
    weight: torch.Tensor,
    bias: torch.Tensor,
    plan: _Plan,
) -> tuple[torch.Tensor, torch.Tensor]:
    assert w.kind is not None
    w0, b0 = w.kind.params(base64)
    mask_w = w0 == 0
    changed = int((mask_w & (weight != 0)).sum())
    weight = torch.where(mask_w, torch.zeros_like(weight), weight)
    if getattr(base64, "bias", None) is not None:
        mask_b = b0 == 0
        changed += int((mask_b & (bias != 0)).sum())
        bias = torch.where(mask_b, torch.zeros_like(bias), bias)
    plan.zeroed += changed
    plan.zeroed_layers += 1 if changed else 0
    return weight, bias


def _swap_saved(root: nn.Module, w: _Wrapper, plan: _Plan, report: MergeReport) -> nn.Module:
    """A ``modules_to_save`` wrapper becomes the copy its forward calls (no arithmetic)."""
    saved: Any = w.module.modules_to_save
    if plan.mode == "combine":
        have = [n for n in plan.weights if n in saved]
        if have:
            report.kept.append(
                KeptRegion(
                    w.path,
                    (w.path,),
                    f"ModulesToSaveWrapper: fully trained copies of adapter(s) {have} cannot be "
                    "combined by weight (they are whole modules, not deltas of one layer)",
                )
            )
            return root
        chosen, name = _peft.modules_to_save_choice(w.module, [])
    elif plan.mode == "adapter":
        chosen, name = _peft.modules_to_save_choice(w.module, list(plan.weights))
    else:
        chosen, name = _peft.modules_to_save_choice(w.module, None)
    what = "the original module" if name is None else f"the trained copy of adapter {name!r}"
    report.merged.append(
        MergedLayer(
            path=w.path,
            adapter="ModulesToSaveWrapper",
            adapters=() if name is None else (name,),
            base=describe(w.module.original_module),  # type: ignore[arg-type]
            became=f"{what}: {describe(chosen)}",
            params_before=count_params(w.module),
            params_after=count_params(chosen),
            max_abs_error=0.0,
            max_rel_error=0.0,
            sizes_checked=(),
        )
    )
    return _set(root, w.path, chosen)
