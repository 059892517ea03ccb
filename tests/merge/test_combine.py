"""Combining several adapters: every method checked against its formula, computed here.

The adapters' deltas are computed in the test from PEFT's own LoRA factors
(``ΔW_i = s_i·B_i·A_i``), not read off by edgerep, and the combination formulas are
re-implemented with numpy.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import edgerep
from edgerep.errors import ConfigError
from edgerep.merge import _combine
from tests.merge import rel_error, same_state, state_snapshot

pytest.importorskip("peft", reason="peft is an optional extra (pip install 'edgerep[peft]')")

from peft import LoraConfig, get_peft_model

F64 = torch.float64
NAMES = ("cat", "dog", "eel")
WEIGHTS = {"cat": 0.7, "dog": -0.4, "eel": 1.3}
LAYERS = ("fc1", "fc2")


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 12)
        self.fc2 = nn.Linear(12, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def three_adapters(*, prune: bool = False) -> nn.Module:
    """fc1 and fc2 with adapters cat (r=2) and eel (r=4); dog (r=3) on fc1 only."""
    torch.manual_seed(0)
    base = MLP()
    if prune:
        with torch.no_grad():
            base.fc1.weight[:, ::3] = 0  # a structurally pruned base
            base.fc1.bias[::4] = 0
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=list(LAYERS)), "cat")
    model.add_adapter("dog", LoraConfig(r=3, lora_alpha=6, target_modules=["fc1"]))
    model.add_adapter("eel", LoraConfig(r=4, lora_alpha=2, target_modules=list(LAYERS)))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    return model.to(F64).eval()


def deltas(model: nn.Module, layer: str) -> list[np.ndarray]:
    """ΔW_i = s_i·B_i·A_i of each adapter (zero where the layer lacks it), from PEFT's factors."""
    m = model.base_model.model.get_submodule(layer)
    out = []
    for name in NAMES:
        if name in m.lora_A:
            d = m.lora_B[name].weight @ m.lora_A[name].weight * m.scaling[name]
            out.append(d.detach().numpy())
        else:
            out.append(np.zeros(tuple(m.base_layer.weight.shape)))
    return out


def base_params(model: nn.Module, layer: str) -> tuple[np.ndarray, np.ndarray]:
    base = model.base_model.model.get_submodule(layer).base_layer
    return base.weight.detach().numpy(), base.bias.detach().numpy()


def trim(d: np.ndarray, density: float) -> np.ndarray:
    k = int(density * d.size)
    flat = d.reshape(-1)
    keep = np.argsort(-np.abs(flat), kind="stable")[:k]
    out = np.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(d.shape)


def disjoint_mean(taus: list[np.ndarray], weights: list[float]) -> np.ndarray:
    contrib = np.stack([w * t for w, t in zip(weights, taus)])
    sign = np.where(contrib.sum(axis=0) >= 0, 1.0, -1.0)
    agree = np.sign(contrib) == sign
    count = np.maximum(agree.sum(axis=0), 1)
    return np.where(agree, contrib, 0.0).sum(axis=0) / count


def weights_of(merged: nn.Module, layer: str) -> tuple[np.ndarray, np.ndarray]:
    m = merged.get_submodule(layer)
    return m.weight.detach().numpy(), m.bias.detach().numpy()


# --- the methods, end to end --------------------------------------------------------------


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_weighted_sum_of_deltas(method):
    model = three_adapters()
    snapshot = state_snapshot(model)
    merged, report = edgerep.merge(model, combine=WEIGHTS, method=method)
    assert same_state(model, snapshot)
    w = list(WEIGHTS.values())
    for layer in LAYERS:
        w0, b0 = base_params(model, layer)
        want = w0 + sum(wi * d for wi, d in zip(w, deltas(model, layer)))
        got_w, got_b = weights_of(merged, layer)
        np.testing.assert_allclose(got_w, want, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(got_b, b0)
    assert report.mode == "combine" and report.method == method
    assert report.max_error <= 1e-9
    # the combined layer was also verified as a function: f0 + Σ w_i (f_i - f0)
    assert all(len(r.sizes_checked) > 0 for r in report.merged)


def test_linear_matches_peft_cat_combination():
    """PEFT's 'cat' combination stacks the factors, which is exactly Σ w_i ΔW_i."""
    model = three_adapters()
    merged, _ = edgerep.merge(model, combine=WEIGHTS, method="linear")
    reference = copy.deepcopy(model)
    reference.add_weighted_adapter(
        list(WEIGHTS), list(WEIGHTS.values()), "mix", combination_type="cat"
    )
    reference.set_adapter("mix")
    x = torch.randn(4, 10, dtype=F64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_error(reference(x), merged(x)) <= 1e-9


@pytest.mark.parametrize("density", [0.3, 0.5, 1.0])
def test_ties(density):
    model = three_adapters()
    merged, report = edgerep.merge(model, combine=WEIGHTS, method="ties", density=density)
    w = list(WEIGHTS.values())
    for layer in LAYERS:
        w0, b0 = base_params(model, layer)
        want = w0 + disjoint_mean([trim(d, density) for d in deltas(model, layer)], w)
        got_w, got_b = weights_of(merged, layer)
        np.testing.assert_allclose(got_w, want, rtol=0, atol=1e-12)
        np.testing.assert_allclose(got_b, b0, rtol=0, atol=1e-15)
    assert report.density == density
    assert "combine (ties: cat=0.7, dog=-0.4, eel=1.3; density" in report.to_text()


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_dare_follows_the_documented_random_stream(method):
    """One generator per call; masks drawn per tensor (weight, bias), per adapter, per layer."""
    model = three_adapters()
    density, seed = 0.6, 11
    merged, _ = edgerep.merge(model, combine=WEIGHTS, method=method, density=density, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    w = list(WEIGHTS.values())
    for layer in LAYERS:
        w0, b0 = base_params(model, layer)
        taus = []
        for d in deltas(model, layer):
            p = np.full(d.shape, density)
            if method.startswith("della"):  # MAGPRUNE: the probability follows the rank
                p = _combine.della_keep_probabilities(torch.from_numpy(d), density).numpy()
            keep = (torch.rand(d.shape, generator=gen, dtype=F64) < torch.from_numpy(p)).numpy()
            taus.append(np.where(keep, d / p, 0.0))
        for _ in NAMES:  # the bias deltas (zero for LoRA) draw their masks too
            torch.rand(b0.shape, generator=gen, dtype=F64)
        if method in ("dare_linear", "della_linear"):
            want = w0 + sum(wi * t for wi, t in zip(w, taus))
        else:
            want = w0 + disjoint_mean(taus, w)
        got_w, got_b = weights_of(merged, layer)
        np.testing.assert_allclose(got_w, want, rtol=0, atol=1e-12)
        np.testing.assert_allclose(got_b, b0, rtol=0, atol=1e-15)


def test_dare_is_reproducible_and_seeded():
    model = three_adapters()
    kw = {"combine": WEIGHTS, "method": "dare_linear", "density": 0.5}
    a, _ = edgerep.merge(model, seed=3, **kw)
    b, _ = edgerep.merge(model, seed=3, **kw)
    c, _ = edgerep.merge(model, seed=4, **kw)
    assert torch.equal(a.fc1.weight, b.fc1.weight)
    assert not torch.equal(a.fc1.weight, c.fc1.weight)
    # about `density` of each delta survives
    w0, _ = base_params(model, "fc2")
    only_cat, _ = edgerep.merge(model, combine={"cat": 1.0}, method="dare_linear", density=0.5)
    kept = (np.abs(weights_of(only_cat, "fc2")[0] - w0) > 1e-14).mean()
    assert 0.3 < kept < 0.7


def test_keep_zeros_keeps_a_pruned_base_sparse():
    model = three_adapters(prune=True)
    w0, b0 = base_params(model, "fc1")
    zeros_w, zeros_b = w0 == 0, b0 == 0
    assert zeros_w.sum() > 0 and zeros_b.sum() > 0
    dense, _ = edgerep.merge(model, combine=WEIGHTS)
    assert (weights_of(dense, "fc1")[0][zeros_w] != 0).all()
    sparse, report = edgerep.merge(model, combine=WEIGHTS, keep_zeros=True)
    got_w, got_b = weights_of(sparse, "fc1")
    assert (got_w[zeros_w] == 0).all() and (got_b[zeros_b] == 0).all()
    np.testing.assert_array_equal(got_w[~zeros_w], weights_of(dense, "fc1")[0][~zeros_w])
    assert any("keep_zeros" in n and "1 layer(s)" in n for n in report.notes)
    # also for a single adapter
    model.set_adapter("cat")
    one, _ = edgerep.merge(model, keep_zeros=True)
    assert (weights_of(one, "fc1")[0][zeros_w] == 0).all()


def test_combining_conv_adapters():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 1))
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["0", "2"]), "cat")
    model.add_adapter("dog", LoraConfig(r=3, target_modules=["0"], use_dora=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape) * 0.5)
    model = model.to(F64).eval()
    merged, report = edgerep.merge(model, combine={"cat": 0.5, "dog": 0.5})
    x = torch.randn(2, 3, 9, 8, dtype=F64)
    # each conv is affine, the net is not: check conv 0 against 0.5 (f_cat - f0) + ...
    f = copy.deepcopy(model.base_model.model[0])
    with torch.no_grad():
        f.set_adapter("cat")
        y_cat = f(x)
        f.set_adapter("dog")
        y_dog = f(x)
        f.enable_adapters(False)
        y0 = f(x)
        assert rel_error(y0 + 0.5 * (y_cat - y0) + 0.5 * (y_dog - y0), merged[0](x)) <= 1e-9
    assert type(merged[0]) is nn.Conv2d and merged[0].stride == (2, 2)
    assert report.max_error <= 1e-9


# --- the combination functions ------------------------------------------------------------


def test_ties_by_hand():
    d1 = torch.tensor([3.0, -1.0, 2.0, 0.5], dtype=F64)
    d2 = torch.tensor([-2.0, -4.0, 1.0, 0.1], dtype=F64)
    out = _combine.combine("ties", [d1, d2], [1.0, 1.0], density=0.5, generator=torch.Generator())
    # trimmed: [3, 0, 2, 0] and [-2, -4, 0, 0]; signs elected by mass: [+, -, +, +]
    assert out.tolist() == [3.0, -4.0, 2.0, 0.0]


def test_della_by_hand():
    """MAGPRUNE on two 2x4 deltas, density 0.5 (epsilon 0.1), seed 0, draws written out."""
    d1 = torch.tensor([[0.1, -0.4, 0.3, 0.2], [2.0, -1.0, 0.5, 4.0]], dtype=F64)
    d2 = torch.tensor([[-0.2, 0.8, -0.1, 0.05], [1.0, 3.0, -2.0, 0.5]], dtype=F64)
    # keep probabilities 0.4 + 0.2 * rank / 3, rank by |entry| within each row
    p1 = [[0.4, 0.6, 8 / 15, 7 / 15], [8 / 15, 7 / 15, 0.4, 0.6]]
    p2 = [[8 / 15, 0.6, 7 / 15, 0.4], [7 / 15, 0.6, 8 / 15, 0.4]]
    for d, p in ((d1, p1), (d2, p2)):
        got = _combine.della_keep_probabilities(d, 0.5)
        torch.testing.assert_close(got, torch.tensor(p, dtype=F64), rtol=0, atol=1e-15)
        assert got.mean().item() == pytest.approx(0.5)  # the mean keep rate is the density
    # the seed's draws: torch.rand(2, 4) twice (d1's mask, then d2's)
    gen = torch.Generator().manual_seed(0)
    u1 = torch.rand((2, 4), generator=gen, dtype=F64)
    u2 = torch.rand((2, 4), generator=gen, dtype=F64)
    u1_text = [
        [0.97005300, 0.70781986, 0.45938294, 0.92074768],
        [0.64502412, 0.79114789, 0.17860618, 0.35110762],
    ]
    u2_text = [
        [0.58134092, 0.28823589, 0.45286885, 0.17679953],
        [0.35526676, 0.62190525, 0.48184840, 0.44080050],
    ]
    torch.testing.assert_close(u1, torch.tensor(u1_text, dtype=F64), rtol=0, atol=1e-8)
    torch.testing.assert_close(u2, torch.tensor(u2_text, dtype=F64), rtol=0, atol=1e-8)
    # kept where u < p: d1 keeps (0,2) (1,2) (1,3); d2 keeps (0,1) (0,2) (0,3) (1,0) (1,2)
    tau1 = [[0, 0, 0.3 * 15 / 8, 0], [0, 0, 0.5 / 0.4, 4.0 / 0.6]]
    tau2 = [[0, 0.8 / 0.6, -0.1 * 15 / 7, 0.05 / 0.4], [1.0 * 15 / 7, 0, -2.0 * 15 / 8, 0]]
    t1, t2 = torch.tensor(tau1, dtype=F64), torch.tensor(tau2, dtype=F64)
    weights = [1.0, 0.5]

    def run(method: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return _combine.combine(method, [d1, d2], weights, density=0.5, generator=g)

    torch.testing.assert_close(run("della_linear"), t1 + 0.5 * t2, rtol=0, atol=1e-15)
    # sign election on c = [t1, 0.5 t2], then the mean of the agreeing nonzero entries
    c1, c2 = t1, 0.5 * t2
    want = [[0.0, c2[0, 1], c1[0, 2], c2[0, 3]], [c2[1, 0], 0.0, c2[1, 2], c1[1, 3]]]
    torch.testing.assert_close(run("della"), torch.tensor(want, dtype=F64), rtol=0, atol=1e-15)


def test_della_is_unbiased_and_keeps_density():
    delta = torch.randn(64, 256, dtype=F64, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    runs = torch.stack(
        [
            _combine.combine("della_linear", [delta], [1.0], density=0.3, generator=gen)
            for _ in range(200)
        ]
    )
    assert (runs != 0).double().mean().item() == pytest.approx(0.3, abs=0.01)
    # larger entries survive more often
    big = delta.abs() > delta.abs().median(dim=1, keepdim=True).values
    kept = (runs != 0).double().mean(dim=0)
    assert kept[big].mean() > kept[~big].mean() + 0.05
    # E[tau] = delta: the mean over 200 runs is within a few standard errors
    err = (runs.mean(dim=0) - delta).abs().mean() / delta.abs().mean()
    assert err < 0.15


def test_unknown_method_and_density_errors():
    model = three_adapters()
    with pytest.raises(ConfigError, match="did you mean 'ties'"):
        edgerep.merge(model, combine=WEIGHTS, method="tie")
    with pytest.raises(ConfigError, match="did you mean 'dare_ties'"):
        edgerep.merge(model, combine=WEIGHTS, method="dare-ties")
    with pytest.raises(ConfigError, match="needs density"):
        edgerep.merge(model, combine=WEIGHTS, method="ties")
    with pytest.raises(ConfigError, match=r"density must be in \(0, 1\]"):
        edgerep.merge(model, combine=WEIGHTS, method="dare_linear", density=1.5)
    with pytest.raises(ConfigError, match="does not use it"):
        edgerep.merge(model, combine=WEIGHTS, method="linear", density=0.5)
    with pytest.raises(ConfigError, match="'cow' not in the model"):
        edgerep.merge(model, combine={"cat": 0.5, "cow": 0.5})
    with pytest.raises(ConfigError, match="must map adapter names"):
        edgerep.merge(model, combine={})
    with pytest.raises(ConfigError, match="must be finite"):
        edgerep.merge(model, combine={"cat": float("nan")})
    assert set(edgerep.merge.combine_methods()) == {
        "linear",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "breadcrumbs",
        "della",
        "della_linear",
    }


def test_breadcrumbs_by_hand():
    # 200 distinct magnitudes 1..200 with alternating signs: gamma 0.01 drops the 2
    # largest (200, 199), density 0.5 keeps the next 100 (198 down to 99)
    values = torch.arange(1, 201, dtype=F64) * torch.tensor([1.0, -1.0], dtype=F64).repeat(100)
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(0))
    d = values[perm]
    out = _combine.combine(
        "breadcrumbs", [d, 2 * d], [0.5, 0.25], density=0.5, generator=torch.Generator()
    )
    kept = (d.abs() >= 99) & (d.abs() <= 198)
    assert torch.equal(out, torch.where(kept, d, torch.zeros_like(d)))  # 0.5 d + 0.25 (2 d) = d
    assert int((out != 0).sum()) == 100


def test_adapters_already_merged_by_peft_cannot_be_separated():
    model = three_adapters()
    model.base_model.merge_adapter(["cat"])
    with pytest.raises(ConfigError, match="already merged"):
        edgerep.merge(model, combine=WEIGHTS)
    # merging what the model computes still works
    x = torch.randn(3, 10, dtype=F64)
    merged, _ = edgerep.merge(model)
    with torch.no_grad():
        assert rel_error(model(x), merged(x)) <= 1e-9


def test_registering_a_method_twice_raises():
    with pytest.raises(ValueError, match="already registered"):
        _combine.register_method("ties", uses_density=True)(lambda d, w, p, g: d[0])
