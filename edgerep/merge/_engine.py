"""`merge`: every adapter-wrapped layer whose effect is affine becomes one plain layer.

Algebra: at inference an adapter-wrapped layer computes ``f(x)``, a function of its
one input. When ``f`` is affine (checked: ``f(x+y) - f(x) - f(y) + f(0) = 0``) it
*is* a plain layer with the base layer's geometry, and that layer is read off ``f``
in float64 by the fold engine's probe (`edgerep.fold.probe`): ``b = f(0)``,
``W = (f(I) - b)ᵀ`` for a Linear, the impulse response for a conv, ``f(i)`` for
row ``i`` of an embedding table. It is kept only if `edgerep.fold.verify` finds it
equal to ``f`` within ``rtol`` on random inputs, then cast once to the base dtype.
No adapter type has a formula here: LoRA, DoRA, IA3, OFT, a paper's custom module
all go through the same gate. Where an adapter's algebra is known (`_fast`: PEFT's
own merge run on a float64 copy, SSF, PiSSA, ETHER, ...) the candidate comes from
it instead of the probe (a few weight-sized products instead of ``in_features``
forward rows), is verified the same way, and the probe is the fallback.

Finding the wrappers (`_find`): a PEFT tuner layer (its base layer from
``get_base_layer()``); else a module with a child named ``base_layer`` or ``base``
that is a plain layer, or with exactly one plain-layer child and parameters of its
own (of a registered plain type exactly, so attention's out_proj does not count),
holding state besides the base layer; else a subclass of a plain layer with
parameters besides ``weight`` and ``bias`` (loralib style), which is its own base.
"""

from __future__ import annotations

import collections
import copy
import logging
import math
import time
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from edgerep.errors import ConfigError, did_you_mean
from edgerep.fold import probe, verify
from edgerep.fold._engine import PLAIN_LAYERS
from edgerep.fold.report import KeptRegion
from edgerep.merge import _combine, _fast, _peft
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
    fast: bool = True
    generator: torch.Generator | None = None
    arena: _Arena | None = None
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
    fast: bool = True,
    require_adapter: bool = False,
    share_unchanged: bool = True,
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
        method: 'linear', 'task_arithmetic', 'ties', 'dare_linear', 'dare_ties',
            'breadcrumbs', 'della' or 'della_linear' (`edgerep.merge._combine`).
        density: the fraction kept by TIES and Breadcrumbs (by magnitude), DARE (at
            random) and DELLA (at random, more likely the larger the entry).
        seed: seed of DARE's and DELLA's random masks (same seed, same model).
        keep_zeros: keep the exact zeros of the base weights (a pruned or sparse
            base stays sparse); the merged layer then differs from the adapter's
            function at those entries, by design.
        rtol: relative tolerance of the float64 verifier.
        fast: try the adapter's known algebra first (`edgerep.merge._fast`: PEFT's own
            merge in float64, SSF, PiSSA, ETHER, ...); the candidate is verified like a
            probed one and the probe is the fallback. False: always probe.
        require_adapter: refuse a model with no adapter at all (instead of returning
            it as it is with a note), for callers whose only job is to merge.
        share_unchanged: the returned model holds the tensors merge leaves unchanged
            (embeddings, norms, every layer without an adapter) as new Parameter and
            tensor objects over the *same storage* as the input's, instead of copies:
            merge costs the merged layers only, not a second copy of the whole model.
            Neither model is mutated by merge, and moving or casting one
            (``.to()``, ``.half()``) rebinds its own tensors only; but an in-place
            write to a shared tensor (an optimizer step, ``load_state_dict``,
            ``nn.init``) shows in both. False: a fully independent copy (or
            ``copy.deepcopy`` the result).

    Returns:
        (plain eval-mode model, report).

    Raises:
        ConfigError: bad arguments, an unknown adapter name or method, or adapters
            that PEFT already merged into the base weights when `adapter` or
            `combine` asks to separate them; no adapter at all with `require_adapter`.
    """
    start = time.perf_counter()
    plan = _make_plan(model, adapter, combine, method, density, seed, keep_zeros, rtol)
    plan.fast = bool(fast)
    plan.arena = _Arena()
    report = MergeReport(
        mode=plan.mode,
        method=plan.method,
        weights=dict(plan.weights),
        density=plan.density,
        seed=seed,
        params_before=count_params(model),
    )
    source, kept, notes = _peft.unwrap(model)
    wrappers = [] if kept else _find(source)
    work, copies = _copy_shell(model, wrappers, share=share_unchanged)
    if model.training:
        report.notes.append(
            "the model was in train mode: merged its eval-mode function (dropout off)"
        )
    root, _, _ = _peft.unwrap(work)
    report.kept += kept
    report.notes += notes
    if kept:  # a prompt-learning model: nothing to merge
        work.eval()
        report.params_after = count_params(work)
        report.seconds = time.perf_counter() - start
        return work, report

    available = _peft.available_adapters(source)
    _check_names(plan, available, source)
    found = len(wrappers)
    if not found and require_adapter:
        raise ConfigError(
            f"no adapter found in the model ({type(model).__name__}): no PEFT tuner layer or "
            "adapter-wrapped Linear/Conv/Embedding, so there is nothing to merge; attach "
            "adapters (CLI: --adapter PATH, a PEFT adapter directory or a .safetensors LoRA "
            "file), or fold/convert a model without adapters with `edgerep fold`/`convert`"
        )
    for w in wrappers:
        root = _process(root, w, plan, report, copies)
    plan.arena = None
    root = _tie_repeated(root)
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
    covered: set[str] = set()
    for name, module in root.named_modules():
        if covered and _inside(name, covered):
            continue
        w = _classify(name, module)
        if w is not None:
            found.append(w)
            covered.add(name)
    return found


def _inside(name: str, covered: set[str]) -> bool:
    """Whether `name` is strictly inside a module path in `covered` ('' is the root)."""
    if "" in covered:
        return True
    parts = name.split(".")
    return any(".".join(parts[:i]) in covered for i in range(1, len(parts)))


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


# --- copies ---------------------------------------------------------------------------


class _Pending(nn.Module):
    """Stands in the new model for an adapter wrapper until its plain layer replaces it."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"internal error: adapter wrapper {self.path!r} was never replaced")


class _Copies:
    """The deepcopy memo of the new model, to copy a wrapper that is kept after all."""

    def __init__(self, memo: dict[int, Any]) -> None:
        self.memo = memo

    def restore(self, root: nn.Module, path: str, original: nn.Module) -> nn.Module:
        """Put a copy of `original` (sharing or copying tensors like the rest) at `path`."""
        return _set(root, path, copy.deepcopy(original, self.memo))


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [
        *(t for _, t in module.named_parameters(remove_duplicate=False)),
        *(t for _, t in module.named_buffers(remove_duplicate=False)),
    ]


def _shared(t: torch.Tensor) -> torch.Tensor | None:
    """A new tensor object over `t`'s storage (a new Parameter for a Parameter), or None."""
    if type(t) is nn.Parameter:
        return nn.Parameter(t.detach(), t.requires_grad)
    if type(t) is torch.Tensor:
        return t.detach().requires_grad_(t.requires_grad) if t.is_leaf else None
    return None  # a tensor subclass: deepcopy knows how to copy it


def _tie_repeated(root: nn.Module) -> nn.Module:
    """A wrapper the model holds at several paths was replaced at its first: tie the rest."""
    for name, m in list(root.named_modules(remove_duplicate=False)):
        if isinstance(m, _Pending) and name:
            root = _set(root, name, root.get_submodule(m.path))
    return root


def _copy_shell(
    model: nn.Module, wrappers: Sequence[_Wrapper], *, share: bool
) -> tuple[nn.Module, _Copies]:
    """The new model: `model` copied, with each adapter wrapper left out.

    Every adapter wrapper stands as a `_Pending` placeholder that its merged layer
    replaces (copying it first would cost a copy of most of the model for nothing);
    a wrapper that ends up kept is copied then. With `share`, the tensors merge
    leaves unchanged are not copied: the new model holds new Parameter objects over
    the same storage (`merge`'s docstring says what that means for the caller).
    """
    memo: dict[int, Any] = {}
    if share:
        for t in _tensors(model):
            if id(t) not in memo:
                shared = _shared(t)
                if shared is not None:
                    memo[id(t)] = shared
    placeholders = {id(w.module) for w in wrappers if w.role == "adapter"}
    for w in wrappers:
        if w.role == "adapter":
            memo[id(w.module)] = _Pending(w.path)
    work = copy.deepcopy(model, memo)
    for i in placeholders:
        del memo[i]  # a wrapper restored later is copied, not replaced by its placeholder
    return work, _Copies(memo)


class _Arena:
    """One float64 buffer that each layer's float64 copy is written into, in turn.

    Layers are merged one after the other and each one's float64 copy is dead once
    its plain layer is built, so one buffer the size of the largest wrapper serves
    them all: no fresh pages to fault in per layer, and no freed scratch left as
    holes between the new layers (which glibc would keep resident).
    """

    def __init__(self) -> None:
        self._buffer = torch.empty(0, dtype=_F64)

    def views(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Float64 tensors shaped like `tensors`, in the buffer (earlier views die)."""
        need = sum(t.numel() for t in tensors)
        if need > self._buffer.numel():
            self._buffer = torch.empty(0, dtype=_F64)  # free the old one first
            self._buffer = torch.empty(need, dtype=_F64)
        out, start = [], 0
        for t in tensors:
            out.append(self._buffer[start : start + t.numel()].view(t.shape))
            start += t.numel()
        return out


def _float64_copy(module: nn.Module, arena: _Arena | None = None) -> nn.Module:
    """An eval-mode float64 copy of `module` (each floating tensor converted once).

    With `arena`, the copies are views into its buffer, valid until its next use.
    """
    memo: dict[int, Any] = {}
    floating: list[torch.Tensor] = []
    for t in _tensors(module):
        if t.is_floating_point() and id(t) not in memo:
            memo[id(t)] = None
            floating.append(t)
    on_cpu = all(t.device.type == "cpu" and t.is_contiguous() for t in floating)
    copies = (
        arena.views(floating)
        if arena is not None and on_cpu
        else [torch.empty(t.shape, dtype=_F64, device=t.device) for t in floating]
    )
    with torch.no_grad():
        for t, c in zip(floating, copies):
            c.copy_(t)
            memo[id(t)] = nn.Parameter(c, t.requires_grad) if isinstance(t, nn.Parameter) else c
    clone = _clone_structure(module, memo)  # every floating tensor is in memo: float64
    if clone is None:  # something `_clone_structure` does not copy: deepcopy it all
        clone = copy.deepcopy(module, memo).to(_F64)
    return clone.eval()


_ATOMS = (str, int, float, bool, type(None), torch.dtype, torch.device)


class _NotData(Exception):
    pass


_EXACT_ATOMS = frozenset(_ATOMS)
_EMPTY = frozenset({list, tuple, set, frozenset, dict, collections.OrderedDict})


def _data(v: Any) -> Any:
    """A copy of plain data (numbers, strings, containers of them; functions are shared)."""
    cls = type(v)
    if cls in _EXACT_ATOMS:  # the common cases first: a module's __dict__ is mostly these
        return v
    if cls in _EMPTY and not v:  # and empty hook dicts
        return cls()
    if isinstance(v, _ATOMS):
        return v
    if isinstance(v, (list, tuple, set, frozenset)):
        return type(v)(_data(x) for x in v)
    if isinstance(v, dict):
        return type(v)((k, _data(x)) for k, x in v.items())
    if isinstance(v, (types.FunctionType, types.BuiltinFunctionType, type)):
        return v  # hooks, PEFT's variant classes (not a bound method: it holds its object)
    raise _NotData(type(v).__name__)


def _clone_structure(module: nn.Module, memo: dict[int, Any]) -> nn.Module | None:
    """A copy of `module`'s module tree over the tensors in `memo`, or None.

    What `copy.deepcopy` does for an adapter wrapper, at a fraction of its cost (it
    runs once per layer): new module objects, new parameter/buffer/child/hook
    dicts, and one-level copies of the plain containers PEFT keeps its state in
    (``merged_adapters``, ``scaling``, ...; PEFT's merge appends to them). Returns
    None when a module holds anything else that may be state (a tensor or a module
    outside its registries, a container of those), so the caller deepcopies.
    """
    clones: dict[int, nn.Module] = {}

    def tensor(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        if id(t) not in memo:  # not floating: copied as deepcopy would
            memo[id(t)] = copy.deepcopy(t)
        return memo[id(t)]

    def clone(m: nn.Module) -> nn.Module | None:
        if id(m) in clones:
            return clones[id(m)]
        new = object.__new__(type(m))
        clones[id(m)] = new
        state: dict[str, Any] = {}
        for k, v in m.__dict__.items():
            if k == "_modules":
                children: dict[str, Any] = {}
                for name, child in v.items():
                    children[name] = None if child is None else clone(child)
                    if child is not None and children[name] is None:
                        return None
                state[k] = type(v)(children)
            elif k in ("_parameters", "_buffers"):
                state[k] = type(v)((n, tensor(t)) for n, t in v.items())
            else:
                try:
                    state[k] = _data(v)
                except _NotData as e:
                    logger.debug("deepcopy: %s.%s holds a %s", type(m).__name__, k, e)
                    return None
        new.__dict__.update(state)
        return new

    return clone(module)


# --- merging one wrapper ------------------------------------------------------------------


def _set(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    if path == "":
        return new
    parent, _, attr = path.rpartition(".")
    setattr(root.get_submodule(parent), attr, new)
    return root


def _process(
    root: nn.Module,
    w: _Wrapper,
    plan: _Plan,
    report: MergeReport,
    copies: _Copies,
) -> nn.Module:
    if w.role == "kept":
        report.kept.append(KeptRegion(w.path, (w.path,), w.reason))
        return root
    if w.role == "modules_to_save":
        return _swap_saved(root, w, plan, report)
    assert w.kind is not None
    original = w.module  # the input's wrapper: read, never changed
    names: list[str] = []
    if w.peft:
        if plan.mode == "active":
            names = _peft.active_adapters(original)
        else:
            have = set(_peft.available_adapters(original))
            names = [n for n in plan.weights if n in have]
    if w.peft and plan.mode == "combine":
        result = _read_combination(w.kind, original, w.base_path, names, plan)
    else:
        chosen = names if w.peft and plan.mode == "adapter" else None
        # the arena's views die with this layer: its weights are built into `final` below
        result = _read(w.kind, _Float64(original, chosen, plan.arena), w.base_path, plan)
    if isinstance(result, str):
        report.kept.append(KeptRegion(w.path, (w.path,), f"{_peft.type_name(w.module)}: {result}"))
        return copies.restore(root, w.path, original)
    weight, bias, checks, routes = result
    base: Any = original.get_submodule(w.base_path)
    if plan.keep_zeros:
        weight, bias = _keep_zeros(w.kind, base, weight, bias, plan)
    dtype = base.weight.dtype
    final = w.kind.build(base, weight, bias, dtype).train(False)
    del weight, bias, result  # the float64 scratch goes before the next layer's
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
            route=routes[0].route if len({r.route for r in routes}) == 1 else "mixed",
            fallback="; ".join(r.fallback for r in routes if r.fallback),
        )
    )
    return _set(root, w.path, final)


@dataclass(frozen=True)
class _Route:
    """How one read was made: 'fast:<rule>' or 'probe', and why a fast rule was not used."""

    route: str
    fallback: str = ""


class _Float64:
    """Fresh float64 eval-mode copies of one wrapper, with `select` adapters on (None: as is).

    A fast rule may overwrite the copy it is given (PEFT's merge works in place; the
    LoRA rule adds its product into the base weight), so that one float64 weight is
    held per layer instead of two: the reference outputs are recorded before any
    rule runs, and the probe gets a fresh copy when a rule may have written.
    """

    def __init__(
        self, original: nn.Module, select: Sequence[str] | None, arena: _Arena | None = None
    ) -> None:
        self.original = original
        self.select = None if select is None else list(select)
        self.arena = arena

    def __call__(self) -> nn.Module:
        f = _float64_copy(self.original, self.arena)
        if self.select is not None:
            _peft.select(f, self.select)
        return f


_Read = tuple[torch.Tensor, torch.Tensor, list[verify.VerifyResult], list[_Route]]


def _read(
    kind: LayerKind, fresh: Callable[[], nn.Module], base_path: str, plan: _Plan
) -> _Read | str:
    """The verified plain layer of the wrapper (dense weight, bias, checks, route), or why not.

    `fresh()` gives a new float64 eval-mode copy of the wrapper each time it is called.

    The adapter's known algebra (`edgerep.merge._fast`) is tried first, most specific
    rule first (a rule that declines passes to the next); its candidate is compared
    with the wrapper's own float64 forward on random inputs recorded before the rule
    ran (the same gate as a probed layer), and the probe is the fallback when every
    rule declines or a candidate is rejected.
    """
    f = fresh()
    rules = _fast.rules_for(f) if plan.fast else []
    declined: list[str] = []
    recorded: verify.Recorded | None = None
    for name, fn in rules:
        base = f.get_submodule(base_path)
        if recorded is None:
            recorded = kind.record(f, base, quick=True)
        try:
            weight, bias = fn(f, base_path, kind)
            candidate = kind.function(base, weight, bias)
        except _fast.NoFastPath as e:  # declined before writing anything
            declined.append(f"fast path {name!r} declined: NoFastPath: {e}")
            continue
        except Exception as e:  # a rule that does not cover this module
            declined.append(f"fast path {name!r} declined: {type(e).__name__}: {e}")
            f = fresh()
            continue
        check = kind.compare(recorded, candidate, base, plan.rtol)
        if check.ok:
            return weight, bias, [check], [_Route(f"fast:{name}")]
        declined.append(f"fast path {name!r} rejected by the verifier: {check.reason}")
        break
    fallback = "; ".join(declined)
    if fallback:
        logger.info("%s; probing instead", fallback)
    if rules:
        # the probe verifies against the copy's own forward: it gets a copy no rule has
        # touched (a rule that declined is not trusted to have written nothing)
        f = fresh()
    result = _probe(kind, f, f.get_submodule(base_path), plan.rtol)
    if isinstance(result, str):
        return result
    return (*result, [_Route("probe", fallback)])


def _probe(
    kind: LayerKind, f: Fn | nn.Module, base: nn.Module, rtol: float
) -> tuple[torch.Tensor, torch.Tensor, list[verify.VerifyResult]] | str:
    """The plain layer read off `f` by the probe and verified, or why there is none."""
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
    kind: LayerKind,
    original: nn.Module,
    base_path: str,
    names: Sequence[str],
    plan: _Plan,
) -> _Read | str:
    """``W0 + combine(W_i - W0)``, each ``W_i`` read off with only adapter ``i`` on."""
    r0 = _read(kind, _Float64(original, []), base_path, plan)
    if isinstance(r0, str):
        return f"its base layer: {r0}"
    w0, b0, checks, routes = r0
    dws, dbs = [], []
    for name in plan.weights:
        if name not in names:  # this layer does not hold the adapter: no delta
            dws.append(torch.zeros_like(w0))
            dbs.append(torch.zeros_like(b0))
            continue
        r = _read(kind, _Float64(original, [name]), base_path, plan)
        if isinstance(r, str):
            return f"with only adapter {name!r} on: {r}"
        dws.append(r[0] - w0)
        dbs.append(r[1] - b0)
        checks += r[2]
        routes += r[3]
    weights = list(plan.weights.values())
    assert plan.generator is not None
    base = original.get_submodule(base_path)
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
        f = _Float64(original, None)()
        base64 = f.get_submodule(base_path)
        candidate = kind.build(base64, weight, bias, _F64).eval()
        reference = _weighted_function(f, plan.weights, names)
        check = kind.verify(reference, candidate, base64, plan.rtol)
        if not check.ok:
            return f"the combined {kind.name} was rejected by the verifier: {check.reason}"
        checks.append(check)
    return weight, bias, checks, routes


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
    kind: LayerKind, base: Any, weight: torch.Tensor, bias: torch.Tensor, plan: _Plan
) -> tuple[torch.Tensor, torch.Tensor]:
    w0, b0 = kind.params(base)
    mask_w = w0 == 0
    changed = int((mask_w & (weight != 0)).sum())
    weight = torch.where(mask_w, torch.zeros_like(weight), weight)
    if getattr(base, "bias", None) is not None:
        mask_b = b0 == 0
        changed += int((mask_b & (bias != 0)).sum())
        bias = torch.where(mask_b, torch.zeros_like(bias), bias)
    plan.zeroed += changed
    plan.zeroed_layers += 1 if changed else 0
    return weight, bias


def _swap_saved(root: nn.Module, w: _Wrapper, plan: _Plan, report: MergeReport) -> nn.Module:
    """A ``modules_to_save`` wrapper becomes the copy its forward calls (no arithmetic)."""
    wrapper: Any = root.get_submodule(w.path)  # the new model's copy of the wrapper
    saved: Any = wrapper.modules_to_save
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
        chosen, name = _peft.modules_to_save_choice(wrapper, [])
    elif plan.mode == "adapter":
        chosen, name = _peft.modules_to_save_choice(wrapper, list(plan.weights))
    else:
        chosen, name = _peft.modules_to_save_choice(wrapper, None)
    what = "the original module" if name is None else f"the trained copy of adapter {name!r}"
    report.merged.append(
        MergedLayer(
            path=w.path,
            adapter="ModulesToSaveWrapper",
            adapters=() if name is None else (name,),
            base=describe(wrapper.original_module),
            became=f"{what}: {describe(chosen)}",
            params_before=count_params(w.module),
            params_after=count_params(chosen),
            max_abs_error=0.0,
            max_rel_error=0.0,
            sizes_checked=(),
            route="swap",
        )
    )
    return _set(root, w.path, chosen)
