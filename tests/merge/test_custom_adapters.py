"""Every zoo adapter merges through `edgerep.merge`'s generic path, exactly.

Each case wraps a plain base layer in a zoo adapter (`edgerep.zoo.ADAPTERS`),
randomizes every parameter (paper inits make most deltas zero, and a zero delta
makes any merge look exact), merges in float64 and checks on fresh inputs
(Linear: (N, L, F) tokens; conv: two spatial sizes of different parity;
Embedding: random indices) that the merged model equals the unmerged one to 1e-9
relative and that the adapter became a plain layer of the base's type, shape,
geometry and dtype. Independent closed-form checks (the papers' formulas, written
here and only here) pin the merged weights of Hydra, GLoRA, FedPara/LoHa and PHM.
The nonlinear and input-routed adapters, and SSF before a zero-padded conv (affine
but not one conv), must be kept, listed in the report with the reason.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

from edgerep.errors import ConfigError
from edgerep.merge import merge
from edgerep.zoo import ADAPTERS, get_adapter, randomize_
from edgerep.zoo.adapters import register_adapter

RTOL_FLOAT64 = 1e-9
RTOL_FLOAT32 = 1e-5
# the adapter must move the base output by at least this much (relative), so that
# a merge that dropped the adapter fails
MIN_EFFECT = 1e-2
NOT_AFFINE = "not affine"

BASES: dict[str, Callable[[], nn.Module]] = {
    "linear": lambda: nn.Linear(8, 6),
    "linear_nobias": lambda: nn.Linear(8, 6, bias=False),
    "conv": lambda: nn.Conv2d(4, 6, 3, padding=1),
    "conv_s2g2": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=False),
    "conv_p0": lambda: nn.Conv2d(4, 6, 3, padding=0),
    "conv1d": lambda: nn.Conv1d(4, 6, 3, padding=1, dilation=2),
    "embedding": lambda: nn.Embedding(20, 6),
}


def _inputs(base: nn.Module, dtype: torch.dtype, *, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if isinstance(base, nn.Embedding):
        n = base.num_embeddings
        return [torch.randint(0, n, shape, generator=gen) for shape in ((2, 7), (3, 5))]
    if isinstance(base, nn.Linear):
        shapes: tuple[tuple[int, ...], ...] = ((2, 5, 8), (3, 4, 8))
    elif isinstance(base, nn.Conv1d):
        shapes = ((2, 4, 11), (1, 4, 14))
    else:
        shapes = ((2, 4, 9, 9), (1, 4, 10, 8))
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]


@dataclass(frozen=True)
class Case:
    """One adapter on one base layer.

    Attributes:
        adapter: the registry name in `ADAPTERS`.
        base: a key of `BASES`.
        kwargs: keyword options of the adapter.
    """

    adapter: str
    base: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        opts = "-".join(f"{k}={v}" for k, v in self.kwargs.items())
        return "-".join(p for p in (self.adapter, self.base, opts) if p)

    def build(self, dtype: torch.dtype = torch.float64, *, seed: int = 0) -> Any:
        """The adapter (randomized, eval mode) as the only layer, ``adapted``, of a Sequential."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            adapter = get_adapter(self.adapter)(BASES[self.base]().to(dtype), **self.kwargs)
        randomize_(adapter, seed=seed)
        return nn.Sequential(OrderedDict(adapted=adapter.to(dtype))).eval()


MERGE_CASES = [
    Case("hydra", "linear"),
    Case("hydra", "linear_nobias", {"bias": False}),
    Case("hydra", "conv"),
    Case("glora", "linear"),
    Case("glora", "linear", {"a": "vector", "b": "constant", "c": "vector", "d": "constant"}),
    Case("glora", "linear_nobias", {"b": "vector", "e": "constant"}),
    Case("ether", "linear", {"num_blocks": 2}),
    Case("ether", "conv", {"num_blocks": 3, "side": "output"}),
    Case("ether", "conv_s2g2"),
    Case("ether_plus", "linear", {"num_blocks": 2}),
    Case("ether_plus", "linear", {"two_sided": False}),
    Case("ether_plus", "conv", {"num_blocks": 2}),
    Case("flora", "linear"),
    Case("flora", "conv", {"rank": 2}),
    Case("flora", "conv_s2g2"),
    Case("flora", "embedding"),
    Case("rosa", "linear"),
    Case("rosa", "conv", {"density": 0.1}),
    Case("rosa", "embedding", {"rank": 2}),
    Case("pissa", "linear"),
    Case("pissa", "linear_nobias", {"rank": 2}),
    Case("sorsa", "linear"),
    Case("ssf", "linear"),
    Case("ssf", "linear_nobias", {"position": "before"}),
    Case("ssf", "conv"),
    Case("ssf", "conv_p0", {"position": "before"}),
    Case("ssf", "conv1d"),
    Case("ssf", "embedding"),
    Case("fedpara", "linear"),
    Case("fedpara", "conv"),
    Case("fedpara", "conv_s2g2", {"form": "matrix"}),
    Case("fedpara", "embedding"),
    Case("phm", "linear"),
    Case("phm", "linear", {"rank": 2}),
    Case("phm", "conv"),
    Case("phm", "conv_s2g2", {"rank": 2}),
]

# (case, text the kept entry's reason must contain)
KEPT_CASES = [
    (Case("bottleneck", "linear"), NOT_AFFINE),
    (Case("bottleneck", "linear", {"placement": "parallel", "activation": "relu"}), NOT_AFFINE),
    (Case("routed_lowrank", "linear"), NOT_AFFINE),
    # affine, but the shift does not reach the zero-padded border: no single conv
    (Case("ssf", "conv", {"position": "before"}), "verifier"),
]


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def _assert_plain_like(layer: Any, base: Any) -> None:
    assert type(layer) is type(base), f"{type(layer).__name__} is not a plain {type(base)}"
    assert layer.weight.shape == base.weight.shape
    assert layer.weight.dtype == base.weight.dtype
    for attr in ("stride", "padding", "dilation", "groups"):
        assert getattr(layer, attr, None) == getattr(base, attr, None), attr


@pytest.mark.parametrize("case", MERGE_CASES, ids=lambda c: c.id)
def test_merges_to_the_plain_layer(case: Case) -> None:
    model = case.build()
    adapter = model.adapted
    xs = _inputs(adapter.base, torch.float64, seed=1)
    with torch.no_grad():
        refs = [model(x) for x in xs]
        moved = max(_rel(adapter.base(x), r) for x, r in zip(xs, refs))
    assert moved > MIN_EFFECT, "the adapter barely changes the base output: the test is weak"

    merged, report = merge(model, rtol=1e-9)

    _assert_plain_like(merged.adapted, adapter.base)
    assert [m.path for m in report.merged] == ["adapted"]
    assert not [k for k in report.kept if k.path == "adapted"]
    assert report.max_error <= RTOL_FLOAT64
    with torch.no_grad():
        for x, ref in zip(xs, refs):
            assert _rel(merged(x), ref) <= RTOL_FLOAT64
            # the input model is untouched
            assert model.adapted is adapter
            assert torch.equal(model(x), ref)


# ----------------------------------------------- closed forms (tests only)


def _hydra(a: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    # W' = W0 + s Bp Ap + s Bs As W0,  b' = b0 + s (cp + Bs As b0 + cs)
    w0, b0, s = a.base.weight, a.base.bias, a.scale
    seq = a.seq_up @ a.seq_down
    if w0.dim() == 2:
        par = a.par_up @ a.par_down
    else:
        par = torch.einsum("or,rikl->oikl", a.par_up, a.par_down)
    w = w0 + s * par + s * torch.einsum("op,p...->o...", seq, w0)
    if b0 is None and a.par_bias is None:
        return w, None
    b = torch.zeros_like(w0[:, 0].flatten()) if b0 is None else b0
    b = b + s * (seq @ b)
    if a.par_bias is not None:
        b = b + s * (a.par_bias + a.seq_bias)
    return w, b


def _glora_support(a: Any, name: str) -> torch.Tensor | None:
    form = a.forms[name]
    if form == "lora":
        return getattr(a, f"{name}_left") @ getattr(a, f"{name}_right")
    if form == "vector":
        v = getattr(a, f"{name}_vector")
        return v.unsqueeze(1) if name in "abc" else v
    if form == "constant":
        return getattr(a, f"{name}_scalar")
    return None


def _glora(a: Any) -> tuple[torch.Tensor, torch.Tensor]:
    w0 = a.base.weight
    b0 = a.base.bias if a.base.bias is not None else torch.zeros_like(w0[:, 0])
    A, B, C, D, E = (_glora_support(a, n) for n in "abcde")
    zero = torch.zeros((), dtype=w0.dtype)
    A, B, D, E = (zero if t is None else t for t in (A, B, D, E))
    wc = torch.zeros_like(b0) if C is None else (w0 @ C).squeeze(1)
    return w0 + w0 * A + B, b0 + b0 * D + E + wc


def _mode_product(t: torch.Tensor, m: torch.Tensor, mode: int) -> torch.Tensor:
    # (T x_mode M)[..., i, ...] = sum_j M[i, j] T[..., j, ...], via unfolding
    moved = t.movedim(mode, 0)
    out = m @ moved.reshape(moved.shape[0], -1)
    return out.reshape(m.shape[0], *moved.shape[1:]).movedim(0, mode)


def _fedpara(a: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    w0 = a.base.weight
    if a.form == "tucker":
        h1 = _mode_product(_mode_product(a.t1, a.x1, 0), a.y1, 1)
        h2 = _mode_product(_mode_product(a.t2, a.x2, 0), a.y2, 1)
    else:
        h1 = (a.x1 @ a.y1.T).reshape(w0.shape)
        h2 = (a.x2 @ a.y2.T).reshape(w0.shape)
    return w0 + a.scale * h1 * h2, getattr(a.base, "bias", None)


def _phm(a: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    w0 = a.base.weight
    if a.b is not None:
        blocks = a.b
    else:
        blocks = (a.b_left @ a.b_right).reshape(a.n, *a.block_shape)
    pad = (1,) * (w0.dim() - 2)
    delta = sum(torch.kron(r.reshape(*r.shape, *pad), b) for r, b in zip(a.rule, blocks))
    return w0 + a.scale * delta, a.base.bias


CLOSED_FORMS: dict[str, Callable[[Any], tuple[torch.Tensor, torch.Tensor | None]]] = {
    "hydra": _hydra,
    "glora": _glora,
    "fedpara": _fedpara,
    "phm": _phm,
}


@pytest.mark.parametrize(
    "case", [c for c in MERGE_CASES if c.adapter in CLOSED_FORMS], ids=lambda c: c.id
)
def test_merged_weight_matches_the_papers_formula(case: Case) -> None:
    model = case.build()
    with torch.no_grad():
        weight, bias = CLOSED_FORMS[case.adapter](model.adapted)
    merged, _ = merge(model, rtol=1e-9)
    layer = merged.adapted
    assert _rel(layer.weight, weight) <= RTOL_FLOAT64
    merged_bias = getattr(layer, "bias", None)
    if bias is None:
        assert merged_bias is None or merged_bias.abs().max() == 0
    else:
        assert merged_bias is not None
        assert _rel(merged_bias, bias) <= RTOL_FLOAT64


# --------------------------------------------------------- kept, visibly


@pytest.mark.parametrize(("case", "reason"), KEPT_CASES, ids=[c.id for c, _ in KEPT_CASES])
def test_unmergeable_adapters_are_kept_with_the_reason(case: Case, reason: str) -> None:
    model = case.build()
    xs = _inputs(model.adapted.base, torch.float64, seed=1)
    with torch.no_grad():
        refs = [model(x) for x in xs]

    merged, report = merge(model, rtol=1e-9)

    kept = [k for k in report.kept if k.path == "adapted"]
    assert len(kept) == 1, report.to_text()
    assert reason in kept[0].reason, kept[0].reason
    assert not [m for m in report.merged if m.path == "adapted"]
    assert "adapted" in report.to_text()
    assert type(merged.adapted) is type(model.adapted)
    with torch.no_grad():
        for x, ref in zip(xs, refs):
            assert torch.equal(merged(x), ref)


# ------------------------------------------------------------- float32


@pytest.mark.parametrize(
    "case",
    [Case("hydra", "linear"), Case("fedpara", "conv"), Case("flora", "embedding")],
    ids=lambda c: c.id,
)
def test_float32_merge(case: Case) -> None:
    model = case.build(torch.float32)
    xs = _inputs(model.adapted.base, torch.float32, seed=2)
    merged, report = merge(model, rtol=1e-9)
    assert [m.path for m in report.merged] == ["adapted"]
    _assert_plain_like(merged.adapted, model.adapted.base)
    assert merged.adapted.weight.dtype == torch.float32
    with torch.no_grad():
        for x in xs:
            assert _rel(merged(x), model(x)) <= RTOL_FLOAT32


# ------------------------------------------------------ registry, options


def test_every_registered_adapter_has_a_case() -> None:
    covered = {c.adapter for c in MERGE_CASES} | {c.adapter for c, _ in KEPT_CASES}
    assert covered == set(ADAPTERS), f"adapters without a test case: {set(ADAPTERS) - covered}"


def test_registry_refuses_duplicates_and_suggests_names() -> None:
    with pytest.raises(ConfigError, match="already registered"):
        register_adapter("hydra")(nn.Identity)
    with pytest.raises(KeyError, match="did you mean 'hydra'"):
        get_adapter("hydro")


@pytest.mark.parametrize(
    ("name", "base", "kwargs", "match"),
    [
        ("hydra", "embedding", {}, "Linear, Conv2d"),
        ("hydra", "conv_s2g2", {}, "groups=1"),
        ("ssf", "embedding", {"position": "before"}, "position='after'"),
        ("ether", "linear", {"num_blocks": 3}, "num_blocks"),
        ("phm", "linear", {"n": 4}, "divide"),
        ("fedpara", "linear", {"form": "tucker"}, "conv base"),
        ("glora", "linear", {"a": "lowrank"}, "GLoRAAdapter a"),
        ("pissa", "linear", {"rank": 7}, r"\[1, 6\]"),
    ],
)
def test_bad_options_raise_config_error(
    name: str, base: str, kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        get_adapter(name)(BASES[base](), **kwargs)


def test_pissa_and_sorsa_start_at_the_base_layer() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 8, dtype=torch.float64)
    for name in ("pissa", "sorsa"):
        base = nn.Linear(8, 6).double()
        w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
        adapter: Any = get_adapter(name)(base, rank=3)
        assert _rel(base.weight, w0) > MIN_EFFECT, "the base must hold the residual"
        with torch.no_grad():
            assert _rel(adapter(x), x @ w0.T + b0) <= 1e-12
        if name == "sorsa":
            assert adapter.orthonormal_penalty().item() < 1e-12
