"""Low-rank factorization of Linear and 1x1 Conv2d layers by truncated SVD.

A layer ``y = W x + b`` (``W``: cout x cin) becomes two layers, ``x -> A x`` (cin ->
r, no bias) then ``-> B (A x) + b`` (r -> cout), with ``W ≈ B A`` the rank-``r``
truncated SVD computed in float64 (``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_rᵀ``);
a 1x1 conv keeps its stride on the first factor. At full rank the product is ``W``
to rounding.

Rank choice per layer:

- **error** of rank ``r``: ``||X (W - W_r)ᵀ|| / ||X Wᵀ + b||`` on the layer's input
  activations ``X`` when calibration data is given (computed from ``XᵀX``), else the
  weight error ``||W - W_r|| / ||W||``;
- **latency**: the two factor layers and the unfactored layer each timed alone on
  the backend (the per-layer tables of `edgerep.prune._latency`, same cache);
  ranks with as many MACs as the layer are not timed;
- the rank kept is the fastest one whose error is within ``max_error``, and only
  when it is measured faster than the unfactored layer; otherwise the layer stays,
  with the reason in the report.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from edgerep.errors import ConfigError
from edgerep.prune._calib import batches
from edgerep.prune._latency import LayerShape, candidate_widths, layer_shapes

__all__ = ["RankResult", "factorizable", "factorize", "lowrank", "svd_factors"]


@dataclass(frozen=True)
class RankResult:
    """What low-rank factorization decided for one layer.

    Attributes:
        layer: the layer's qualified name.
        cin / cout: its input / output channels.
        rank: the rank kept (None when the layer stays whole).
        rel_error: the error of that rank (see the module doc), or of the best rank
            tried when none is kept.
        ms_before / ms_after: measured latency of the layer and of its two factors.
        reason: why the layer stays whole, or "".
    """

    layer: str
    cin: int
    cout: int
    rank: int | None
    rel_error: float | None
    ms_before: float | None
    ms_after: float | None
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def factorizable(module: nn.Module) -> bool:
    """A Linear, or a Conv2d with a 1x1 kernel, no padding and groups=1."""
    if isinstance(module, nn.Linear):
        return True
    return (
        isinstance(module, nn.Conv2d)
        and tuple(module.kernel_size) == (1, 1)
        and module.groups == 1
        and module.padding in ((0, 0), "valid")
    )


def _matrix(module: Any) -> torch.Tensor:
    return module.weight.detach().double().reshape(module.weight.shape[0], -1)


def svd_factors(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B (cout, r), A (r, cin)) with ``B @ A`` the rank-`rank` truncated SVD of `w`, in float64."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def factorize(module: Any, rank: int) -> nn.Sequential:
    """The two-layer replacement of `module` at `rank` (same dtype)."""
    if not factorizable(module):
        raise ConfigError(f"cannot factorize {type(module).__name__}: only Linear and 1x1 Conv2d")
    w = _matrix(module)
    cout, cin = w.shape
    if not 1 <= rank <= min(cin, cout):
        raise ConfigError(f"rank {rank} is outside [1, {min(cin, cout)}] for a {cin}->{cout} layer")
    b_f, a_f = svd_factors(w, rank)
    dtype = module.weight.dtype
    first: nn.Linear | nn.Conv2d
    second: nn.Linear | nn.Conv2d
    has_bias = module.bias is not None
    if isinstance(module, nn.Linear):
        first = nn.Linear(cin, rank, bias=False, dtype=dtype)
        second = nn.Linear(rank, cout, bias=has_bias, dtype=dtype)
    else:
        first = nn.Conv2d(cin, rank, 1, stride=module.stride, bias=False, dtype=dtype)
        second = nn.Conv2d(rank, cout, 1, bias=has_bias, dtype=dtype)
    with torch.no_grad():
        first.weight.copy_(a_f.reshape(first.weight.shape))
        second.weight.copy_(b_f.reshape(second.weight.shape))
        if module.bias is not None:
            assert second.bias is not None
            second.bias.copy_(module.bias.detach())
    return nn.Sequential(first, second)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def apply_ranks(model: nn.Module, ranks: Mapping[str, int]) -> nn.Module:
    """A copy of `model` with each named layer factorized at its rank (deterministic SVD).

    Raises:
        ConfigError: a layer the model does not have or cannot factorize.
    """
    out = copy.deepcopy(model)
    modules = dict(out.named_modules())
    for name, r in ranks.items():
        m = modules.get(name)
        if m is None or not factorizable(m):
            raise ConfigError(
                f"the plan factorizes {name!r}, which this model does not have as a Linear or "
                "1x1 Conv2d; apply the plan to the model it was made from"
            )
        _replace(out, name, factorize(m, int(r)))
    return out


def _factor_shapes(s: LayerShape, rank: int) -> list[LayerShape]:
    first = LayerShape(
        s.kind, s.in_shape, s.cin, rank, s.kernel, s.stride, s.padding, s.dilation, bias=False
    )
    if s.kind == "Linear":
        second_in = s.in_shape
    else:
        second_in = (
            s.in_shape[0],
            *((d - 1) // st + 1 for d, st in zip(s.in_shape[1:], s.stride)),
        )
    second = LayerShape(
        s.kind,
        second_in,
        rank,
        s.cout,
        s.kernel,
        (1,) * len(s.stride),
        s.padding,
        s.dilation,
        bias=s.bias,
    )
    return [first, second]


def _grams(
    model: nn.Module, names: Iterable[str], calib: Sequence[torch.Tensor]
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """layer -> (XᵀX, column sums of X, rows) of its input on `calib`, in float64.

    Summed over calibration batches (`edgerep.prune._calib.batches`).
    """
    work = copy.deepcopy(model).double().eval()
    modules = dict(work.named_modules())
    out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}

    def hook_for(name: str) -> Callable[..., None]:
        def hook(m: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            rows = (
                x.reshape(-1, x.shape[-1])
                if isinstance(m, nn.Linear)
                else x.transpose(0, 1).reshape(x.shape[1], -1).T
            )
            g, s, n = out.get(name, (0.0, 0.0, 0.0))  # type: ignore[arg-type]
            out[name] = (g + rows.T @ rows, s + rows.sum(0), n + rows.shape[0])

        return hook

    hooks = [modules[n].register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        with torch.no_grad():
            for batch in batches(calib):
                work(*batch)
    finally:
        for h in hooks:
            h.remove()
    return out


def _rank_errors(
    w: torch.Tensor,
    bias: torch.Tensor | None,
    gram: tuple[torch.Tensor, torch.Tensor, float] | None,
    ranks: Sequence[int],
) -> list[float]:
    """Relative error of each truncated rank: on activations with `gram`, else on weights."""
    u, sv, vh = torch.linalg.svd(w, full_matrices=False)
    if gram is None:
        total = float((sv**2).sum())
        return [float((sv[r:] ** 2).sum() / max(total, 1e-300)) ** 0.5 for r in ranks]
    g, colsum, n = gram
    b = bias if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    # ||X Wᵀ + 1 bᵀ||² = tr(W G Wᵀ) + 2 bᵀ W colsum + n ||b||²
    ref2 = float(torch.trace(w @ g @ w.T) + 2 * b @ (w @ colsum) + n * b @ b)
    out = []
    for r in ranks:
        d = w - (u[:, :r] * sv[:r]) @ vh[:r]
        out.append(float(torch.trace(d @ g @ d.T).clamp_min(0) / max(ref2, 1e-300)) ** 0.5)
    return out


def lowrank(
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    calib: Sequence[torch.Tensor] | None,
    cost: Callable[[Sequence[LayerShape]], list[float]],
    *,
    max_error: float = 0.05,
    keep: Iterable[str] = (),
    latency_inputs: Sequence[torch.Tensor] | None = None,
) -> tuple[nn.Module, dict[str, int], list[RankResult]]:
    """Factorize every Linear / 1x1 conv where a rank within `max_error` is measured faster.

    Args:
        model: the model; not modified.
        inputs: example inputs.
        calib: calibration inputs (activation-weighted error), or None (weight error).
        cost: layer shapes -> measured latency each.
        max_error: the largest relative error of a kept rank (see the module doc).
        keep: layer names (or prefixes) never factorized.
        latency_inputs: the inputs latency is counted at (default `inputs`).

    Returns:
        ``(model, {layer: rank kept}, one row per candidate layer)``.
    """
    if not 0 < max_error < 1:
        raise ConfigError(f"rank max_error must be in (0, 1); got {max_error}")
    keep = tuple(keep)
    shapes = layer_shapes(model, latency_inputs if latency_inputs is not None else inputs)
    modules = dict(model.named_modules())
    names = [
        n
        for n, s in shapes.items()
        if factorizable(modules[n]) and not any(n == k or n.startswith(k + ".") for k in keep)
    ]
    grams = _grams(model, names, calib) if calib is not None and names else {}
    ranks: dict[str, int] = {}
    rows: list[RankResult] = []
    for name in names:
        m: Any = modules[name]
        s = shapes[name]
        w = _matrix(m)
        cout, cin = w.shape
        full = min(cin, cout)
        cand = [r for r in candidate_widths(full) if r < full and r * (cin + cout) < cin * cout]
        if not cand:
            rows.append(
                RankResult(name, cin, cout, None, None, None, None, "no rank with fewer MACs")
            )
            continue
        bias = m.bias.detach().double() if m.bias is not None else None
        ok = [(r, e) for r, e in zip(cand, _rank_errors(w, bias, grams.get(name), cand))]
        within = [(r, e) for r, e in ok if e <= max_error]
        if not within:
            best_r, best_e = max(ok)
            rows.append(
                RankResult(
                    name,
                    cin,
                    cout,
                    None,
                    best_e,
                    None,
                    None,
                    f"no rank with fewer MACs is within max_error={max_error} "
                    f"(rank {best_r}: {best_e:.4f})",
                )
            )
            continue
        flat = [s] + [f for r, _ in within for f in _factor_shapes(s, r)]
        ms = cost(flat)
        before = ms[0]
        after = {r: ms[1 + 2 * i] + ms[2 + 2 * i] for i, (r, _) in enumerate(within)}
        r_best = min(after, key=lambda r: (after[r], r))
        e_best = dict(within)[r_best]
        if after[r_best] >= before:
            rows.append(
                RankResult(
                    name,
                    cin,
                    cout,
                    None,
                    e_best,
                    before,
                    after[r_best],
                    f"factorized at rank {r_best} measured {after[r_best]:.4g} ms >= "
                    f"{before:.4g} ms unfactored; kept whole",
                )
            )
            continue
        ranks[name] = r_best
        rows.append(RankResult(name, cin, cout, r_best, e_best, before, after[r_best]))
    return apply_ranks(model, ranks), ranks, rows
