"""SmoothQuant, Outlier Suppression+ and RepQ-ViT reparameterization: exact in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgerep.errors import ConfigError
from edgerep.quantize import _smooth, reparam_scales, smooth_quant


class _Block(nn.Module):
    """A pre-LN transformer block with a two-layer head (a Linear → Linear pair)."""

    def __init__(self, d: int = 16, heads: int = 2, hidden: int = 24) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d, bias=False), nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.lnf = nn.LayerNorm(d)
        self.pre, self.head = nn.Linear(d, 12), nn.Linear(12, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        h = self.ln1(x)

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.reshape(n, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(n, t, d))
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return self.head(self.pre(self.lnf(x)))


def _block(seed: int) -> _Block:
    """Random weights and LN affines, with a few outlier channels after each LN."""
    gen = torch.Generator().manual_seed(seed)
    model = _Block().double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("ln"):
                sign = torch.where(torch.rand(p.shape, generator=gen) < 0.25, -1.0, 1.0)
                base = 0.5 + torch.rand(p.shape, generator=gen)
                p.copy_(
                    sign * base
                    if name.endswith("weight")
                    else 0.5 * torch.randn(p.shape, generator=gen)
                )
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
        for ln in (model.ln1, model.ln2, model.lnf):
            ln.weight[[1, 7]] *= 30.0  # outliers, as in real transformers
            ln.bias[[3, 7]] += 10.0
    return model


def _data(seed: int, n: int = 8) -> torch.Tensor:
    return torch.randn(n, 6, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def _post(model: nn.Module, path: str, x: torch.Tensor) -> torch.Tensor:
    """The output of submodule `path` on `x`, flattened to (tokens, channels)."""
    seen = []
    handle = model.get_submodule(path).register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0].reshape(-1, seen[0].shape[-1])


EXPECTED_GROUPS = {
    ("ln1", ("q", "k", "v")),
    ("ln2", ("fc1",)),
    ("lnf", ("pre",)),
    ("pre", ("head",)),
}


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_smooth_quant_exact_and_scale_formula(alpha: float) -> None:
    model, calib = _block(0), [_data(1), _data(2)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out, report = smooth_quant(model, calib, alpha=alpha)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # not mutated
    assert {(g.producer, g.consumers) for g in report.groups} == EXPECTED_GROUPS, report
    assert report.refused == "" and report.max_rel_error < 1e-9
    x = _data(3, n=3)
    assert _rel_err(out(x), model(x)) < 1e-9
    # s_j = max|X_j|^alpha / max|W_:j|^(1-alpha), one s shared by q, k and v
    act = torch.cat([_post(model, "ln1", c) for c in calib]).abs().amax(dim=0)
    w = torch.stack([model.get_submodule(n).weight.abs().amax(dim=0) for n in "qkv"]).amax(0)
    s = act**alpha / w ** (1 - alpha)
    for name in "qkv":
        ratio = out.get_submodule(name).weight / model.get_submodule(name).weight
        assert torch.allclose(ratio, s.expand_as(ratio), rtol=1e-10), name
    ln1 = next(g for g in report.groups if g.producer == "ln1")
    assert ln1.act_absmax_after < ln1.act_absmax_before / 3  # the outliers moved into W
    assert ln1.weight_absmax_after > ln1.weight_absmax_before


def test_outlier_suppression_shift_exact_and_centred() -> None:
    model, calib = _block(4), [_data(5)]
    out, report = smooth_quant(model, calib, alpha=0.5, shift=True)
    assert report.shift and all(g.shifted for g in report.groups), report
    x = _data(6, n=2)
    assert _rel_err(out(x), model(x)) < 1e-9
    assert out.get_submodule("k").bias is not None  # a bias was created for W z
    post = _post(out, "ln1", calib[0])
    lo, hi = post.amin(dim=0), post.amax(dim=0)
    assert torch.allclose(lo, -hi, rtol=1e-9, atol=1e-12)  # every channel centred at zero


def test_repq_reparam_makes_one_grid_fit_all_channels() -> None:
    model, calib = _block(7), [_data(8), _data(9)]
    out, report = reparam_scales(model, calib, bits=8)
    assert {g.producer for g in report.groups} == {"ln1", "ln2", "lnf"}, report  # LN only
    assert report.max_rel_error < 1e-9
    x = _data(10, n=2)
    assert _rel_err(out(x), model(x)) < 1e-9
    for g in report.groups:
        assert g.spread_before > 3 and abs(g.spread_after - 1) < 1e-9, g
        pre = torch.cat([_post(model, g.producer, c) for c in calib])
        spans_zero = (pre.amin(dim=0) < 0) & (pre.amax(dim=0) > 0)
        post = torch.cat([_post(out, g.producer, c) for c in calib])
        lo, hi = post.amin(dim=0).clamp_max(0), post.amax(dim=0).clamp_min(0)  # grids hold 0
        width = float((hi - lo)[spans_zero].mean())
        # every channel that spanned zero now spans the same grid; the others fit inside it
        assert torch.allclose((hi - lo)[spans_zero], torch.tensor(width, dtype=lo.dtype), rtol=1e-9)
        assert bool((hi - lo <= width * (1 + 1e-9)).all())
        # one per-tensor grid covers all channels, within one step of zero-point rounding
        assert float(hi.max() - lo.min()) <= width * (1 + 1 / 255 + 1e-9)


def test_float32_model_keeps_dtype() -> None:
    model = _block(11).float()
    x = _data(12).float()
    out, report = smooth_quant(model, [x])
    assert out.get_submodule("q").weight.dtype == torch.float32 and report.max_rel_error < 1e-9
    assert _rel_err(out(x), model(x)) < 1e-4


def test_declines_with_reasons() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.plain = nn.LayerNorm(8, elementwise_affine=False)
            self.a = nn.Linear(8, 8)
            self.ln = nn.LayerNorm(8)
            self.b = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.ln(self.a(self.plain(x)))
            return self.b(h) + h  # the residual reads the LN output too

    model = Odd().double()
    out, report = smooth_quant(model, torch.randn(4, 8, dtype=torch.float64))
    reasons = dict(report.declined)
    assert "without elementwise affine" in reasons["plain -> ['a']"]
    assert "also feeds" in reasons["ln -> ['b']"]
    assert report.groups == [] and report.verified_on == ""
    assert all(torch.equal(a, b) for a, b in zip(out.parameters(), model.parameters(), strict=True))


def test_gate_refuses_a_wrong_migration(monkeypatch: pytest.MonkeyPatch) -> None:
    def forgets_consumers(
        producer: nn.Module, consumers: object, s: torch.Tensor, z: torch.Tensor
    ) -> None:
        with torch.no_grad():
            producer.weight.div_(s.reshape(-1, *(1,) * (producer.weight.dim() - 1)))

    monkeypatch.setattr(_smooth, "_migrate", forgets_consumers)
    model = _block(13)
    out, report = smooth_quant(model, [_data(14)])
    assert "differs" in report.refused and report.groups == []
    x = _data(15, n=2)
    assert torch.equal(out(x), model(x))


def test_bad_options() -> None:
    with pytest.raises(ConfigError, match="alpha"):
        smooth_quant(_block(0), [_data(0)], alpha=1.5)
    with pytest.raises(ConfigError, match="bits"):
        reparam_scales(_block(0), [_data(0)], bits=1)
    with pytest.raises(ConfigError, match="calibration"):
        smooth_quant(_block(0), [])
