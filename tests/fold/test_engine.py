"""The fold engine's behaviour: refusals, kept regions with reasons, both passes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgerep.errors import ConfigError, UnsupportedError
from edgerep.fold import fold

RTOL = 1e-9


def _bn(c, dims=2):
    bn = (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(c)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    return bn


def _close(a: nn.Module, b: nn.Module, *shapes, rtol=RTOL):
    for shape in shapes:
        x = torch.randn(shape, dtype=torch.float64)
        with torch.no_grad():
            ya, yb = a(x), b(x)
        err = (ya - yb).abs().max().item() / ya.abs().max().item()
        assert err <= rtol, f"{err:.2e} on {shape}"


class Branchy(nn.Module):
    """A RepVGG-like block the engine has never heard of."""

    def __init__(self, c=6):
        super().__init__()
        self.dense = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), _bn(c))
        self.point = nn.Conv2d(c, c, 1)
        self.scale = nn.Parameter(torch.randn(c, 1, 1))
        self.ident = _bn(c)

    def forward(self, x):
        return F.relu(self.dense(x) + 0.5 * self.point(x) + self.scale * self.ident(x))


def _kinds(model):
    names = [type(m).__name__ for m in model.modules()]
    if isinstance(model, torch.fx.GraphModule):
        names += [str(n.target) for n in model.graph.nodes if n.op == "call_function"]
    return names


def test_branchy_block_folds_to_one_conv_and_relu():
    torch.manual_seed(0)
    model = nn.Sequential(Branchy(), Branchy()).double().eval()
    folded, report = fold(model, torch.randn(1, 6, 9, 8, dtype=torch.float64))
    _close(model, folded, (2, 6, 9, 8), (1, 6, 12, 11))
    kinds = _kinds(folded)
    assert kinds.count("Conv2d") == 2
    assert not any("batch_norm" in k or "BatchNorm" in k for k in kinds)
    assert len([r for r in report.folded if r.level == "graph"]) == 2
    assert report.params_after < report.params_before
    assert report.max_error <= RTOL
    stages = ["prepare", "capture", "module pass", "graph pass", "end-to-end check"]
    assert list(report.stage_seconds) == stages
    assert 0 < sum(report.stage_seconds.values()) <= report.seconds


def test_input_model_is_not_mutated_and_stays_in_train_mode():
    torch.manual_seed(1)
    model = nn.Sequential(Branchy()).double().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded, report = fold(model, torch.randn(1, 6, 8, 8, dtype=torch.float64))
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any("train mode" in n for n in report.notes)
    _close(model.eval(), folded, (1, 6, 8, 8))


def test_folding_twice_changes_nothing():
    torch.manual_seed(2)
    model = nn.Sequential(Branchy(), Branchy()).double().eval()
    x = torch.randn(1, 6, 8, 8, dtype=torch.float64)
    once, _ = fold(model, x)
    twice, report = fold(once, x)
    assert report.folded == []
    assert torch.equal(once(x), twice(x))


def test_non_finite_weights_are_refused_by_name():
    model = nn.Sequential(nn.Conv2d(2, 2, 3), _bn(2))
    with torch.no_grad():
        model[1].running_var[0] = float("nan")
    with pytest.raises(UnsupportedError, match=r"1\.running_var"):
        fold(model, torch.randn(1, 2, 8, 8))


def test_model_failing_on_example_input_names_the_shapes():
    with pytest.raises(UnsupportedError, match=r"\[1, 3, 8, 8\]"):
        fold(nn.Conv2d(2, 2, 3), torch.randn(1, 3, 8, 8))


def test_bad_arguments_raise_config_error():
    with pytest.raises(ConfigError):
        fold("not a model", torch.randn(1))  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        fold(nn.Linear(2, 2), ("x",))


def test_biased_1x1_before_zero_padded_conv_is_kept_with_reason():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(4, 4, 1, bias=True), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
    model = model.double().eval()
    with torch.no_grad():
        model[0].bias.uniform_(1, 2)
    folded, report = fold(model, torch.randn(1, 4, 8, 8, dtype=torch.float64))
    assert report.folded == []
    reasons = " ".join(k.reason for k in report.kept)
    assert "border" in reasons
    _close(model, folded, (1, 4, 8, 8), rtol=1e-14)


class Adapter(nn.Module):
    """A Houlsby-style nonlinear bottleneck adapter beside a Linear."""

    def __init__(self, d=8):
        super().__init__()
        self.base = nn.Linear(d, d)
        self.down, self.up = nn.Linear(d, 2), nn.Linear(2, d)

    def forward(self, x):
        return self.base(x) + self.up(F.gelu(self.down(x)))


def test_nonlinear_adapter_is_kept_and_reported():
    torch.manual_seed(4)
    model = nn.Sequential(Adapter()).double().eval()
    folded, report = fold(model, torch.randn(3, 8, dtype=torch.float64))
    kept = {k.path: k.reason for k in report.kept}
    assert "0" in kept and "not affine" in kept["0"]
    _close(model, folded, (3, 8), rtol=1e-14)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.branch = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), _bn(3))

    def forward(self, x):
        y = self.branch(x)
        if y.sum() > 0:  # data-dependent control flow: no graph capture
            return F.relu(y)
        return -y


def test_capture_failure_falls_back_to_module_level_only():
    torch.manual_seed(5)
    model = DataDependent().double().eval()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    folded, report = fold(model, x)
    assert report.capture == "none"
    assert any("module-level" in n for n in report.notes)
    assert [r.path for r in report.folded] == ["branch"]
    assert isinstance(folded.branch, nn.Conv2d)
    _close(model, folded, (1, 3, 8, 8), (1, 3, 9, 7))


def test_fx_capture_needs_no_torch_export(monkeypatch):
    torch.manual_seed(6)

    def broken(*args, **kwargs):
        raise RuntimeError("export unavailable")

    monkeypatch.setattr(torch.export, "export", broken)
    model = nn.Sequential(Branchy()).double().eval()
    folded, report = fold(model, torch.randn(1, 6, 8, 8, dtype=torch.float64), module_level=False)
    assert report.capture == "torch.fx"
    assert [r.level for r in report.folded] == ["graph"]
    _close(model, folded, (1, 6, 8, 8), (2, 6, 7, 9))


class ShapeBranch(nn.Module):
    """Control flow on a shape: torch.fx cannot trace it, torch.export can."""

    def __init__(self):
        super().__init__()
        self.block = Branchy()

    def forward(self, x):
        if x.shape[-1] > 4:
            return self.block(x)
        return x


def test_torch_export_captures_what_fx_cannot_trace():
    torch.manual_seed(9)
    model = ShapeBranch().double().eval()
    folded, report = fold(model, torch.randn(1, 6, 8, 8, dtype=torch.float64))
    assert report.capture == "torch.export"
    assert any("torch.fx" in n and "after" in n for n in report.notes), report.notes
    assert [r.level for r in report.folded] == ["graph"]
    assert report.max_error <= RTOL
    # the batch stays dynamic although torch.export saw one example
    _close(model, folded, (1, 6, 8, 8), (3, 6, 9, 7))


class TracingSensitive(nn.Module):
    """Computes something else while torch.fx traces it: that trace must not be folded."""

    def __init__(self):
        super().__init__()
        self.block = Branchy()

    def forward(self, x):
        y = self.block(x)
        if torch.fx._symbolic_trace.is_fx_symbolic_tracing():
            return -y
        return y


def test_trace_that_does_not_reproduce_the_model_is_rejected():
    torch.manual_seed(10)
    model = TracingSensitive().double().eval()
    folded, report = fold(model, torch.randn(1, 6, 8, 8, dtype=torch.float64))
    assert report.capture == "torch.export"
    assert any("differs from the model" in n for n in report.notes), report.notes
    assert [r.level for r in report.folded] == ["graph"]
    _close(model, folded, (2, 6, 8, 8), (1, 6, 7, 9))


class OptionalShift(nn.Module):
    """An optional argument left at None: traced as a placeholder it would be truthy."""

    def __init__(self):
        super().__init__()
        self.block = Branchy()

    def forward(self, x, shift=None):
        y = self.block(x)
        if shift is not None:
            y = y + shift
        return y


def test_fx_keeps_defaults_of_arguments_the_example_omits():
    torch.manual_seed(11)
    model = OptionalShift().double().eval()
    folded, report = fold(model, torch.randn(1, 6, 8, 8, dtype=torch.float64))
    assert report.capture == "torch.fx"
    assert [r.level for r in report.folded] == ["graph"]
    _close(model, folded, (2, 6, 8, 8), (1, 6, 9, 7))


def test_fx_regions_are_composed_analytically(monkeypatch):
    """The fast path models fx's call_module/operator nodes: no region needs the probe."""
    from edgerep.fold import _collapse

    def no_probe(*args, **kwargs):
        raise AssertionError("the probe ran: the analytic path declined an fx region")

    monkeypatch.setattr(_collapse, "collapse", no_probe)
    torch.manual_seed(12)
    dilated = nn.Sequential(nn.Conv2d(6, 4, 3, padding=2, dilation=2, groups=2), _bn(4))
    model = nn.Sequential(Branchy(), Branchy(), dilated).double().eval()
    folded, report = fold(model, torch.randn(1, 6, 11, 10, dtype=torch.float64))
    assert report.capture == "torch.fx"
    assert len([r for r in report.folded if r.level == "graph"]) == 3
    _close(model, folded, (1, 6, 11, 10), (2, 6, 12, 9))


def test_weight_norm_parametrization_is_evaluated_once():
    torch.manual_seed(7)
    conv = nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 5, 3))
    legacy = torch.nn.utils.weight_norm(nn.Conv2d(5, 5, 1))
    model = nn.Sequential(conv, nn.ReLU(), legacy, nn.ReLU()).double().eval()
    folded, report = fold(model, torch.randn(1, 3, 8, 8, dtype=torch.float64))
    rows = [r for r in report.folded if r.level == "parametrization"]
    assert [r.path for r in rows] == ["0", "2"]
    assert all(r.max_rel_error <= RTOL and r.sizes_checked for r in rows)
    # the input model keeps its parametrization (removing it from a deepcopy must not leak)
    assert torch.nn.utils.parametrize.is_parametrized(model[0], "weight")
    assert not any("parametriz" in type(m).__name__.lower() for m in folded.modules())
    _close(model, folded, (1, 3, 8, 8))


def test_constant_multiplier_and_bn_fold_into_linear_layers():
    torch.manual_seed(8)

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.bn, self.fc2 = nn.Linear(6, 10), _bn(10, dims=1), nn.Linear(10, 10)

        def forward(self, x):
            h = F.relu(self.fc1(x))
            return self.fc2(self.bn(h)) * 0.25 - 1.0

    model = MLP().double().eval()
    folded, report = fold(model, torch.randn(4, 6, dtype=torch.float64))
    assert [r.level for r in report.folded] == ["graph"]
    assert report.folded[0].became.startswith("Linear(in_features=10, out_features=10")
    _close(model, folded, (4, 6), (1, 6))


def test_linear_region_on_token_inputs():
    torch.manual_seed(9)

    class Tok(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
            self.gamma = nn.Parameter(torch.randn(8))

        def forward(self, x):
            return F.gelu(self.a(x) + self.gamma * self.b(x) + x)

    model = Tok().double().eval()
    folded, _report = fold(model, torch.randn(2, 5, 8, dtype=torch.float64))
    assert sum(isinstance(m, nn.Linear) for m in folded.modules()) == 1
    _close(model, folded, (2, 5, 8), (1, 3, 8))


def test_whole_affine_model_folds_to_one_conv_in_the_graph():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _bn(4), nn.Conv2d(4, 4, 1)).double().eval()
    folded, report = fold(model, torch.randn(1, 3, 8, 8, dtype=torch.float64))
    assert _kinds(folded).count("Conv2d") == 1 and "BatchNorm2d" not in _kinds(folded)
    assert [r.level for r in report.folded] == ["graph"]
    _close(model, folded, (1, 3, 8, 8), (2, 3, 11, 6))


class Opaque(nn.Module):
    """Affine, but through an op the graph pass does not model (einsum)."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Parameter(torch.randn(4, 3))
        self.conv = nn.Conv2d(4, 4, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(torch.einsum("oc,nchw->nohw", self.mix, x)) * 0.5


def test_opaque_affine_model_collapses_at_module_level():
    torch.manual_seed(15)
    model = Opaque().double().eval()
    folded, report = fold(model, torch.randn(1, 3, 9, 8, dtype=torch.float64))
    assert isinstance(folded, nn.Conv2d) and folded.stride == (2, 2)
    assert report.folded[0].path == "" and report.folded[0].level == "module"
    _close(model, folded, (1, 3, 9, 8), (2, 3, 12, 7))


def test_low_rank_bottleneck_is_kept_unless_allowed():
    torch.manual_seed(11)

    class Bottleneck(nn.Module):
        def __init__(self):
            super().__init__()
            self.down, self.up = nn.Linear(32, 2), nn.Linear(2, 32)

        def forward(self, x):
            return torch.tanh(self.up(self.down(x)))

    model = Bottleneck().double().eval()
    x = torch.randn(2, 32, dtype=torch.float64)
    _, report = fold(model, x)
    assert report.folded == [] and any("FLOPs" in k.reason for k in report.kept)
    folded, report = fold(model, x, allow_flops_increase=True)
    assert len(report.folded) == 1
    _close(model, folded, (2, 32))


def test_float32_model_stays_float32_and_close():
    torch.manual_seed(12)
    model = nn.Sequential(Branchy(), Branchy()).eval()
    x = torch.randn(1, 6, 10, 10)
    folded, _ = fold(model, x)
    assert all(p.dtype == torch.float32 for p in folded.parameters())
    with torch.no_grad():
        ref, out = model(x), folded(x)
    assert (ref - out).abs().max() <= 1e-5 * ref.abs().max()


def test_report_text_lists_folded_and_kept():
    torch.manual_seed(13)
    model = nn.Sequential(Branchy(), Adapter(8)).double().eval()

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.adapter = Branchy(), Adapter(6)

        def forward(self, x):
            return self.adapter(self.block(x).mean((2, 3)))

    model = Wrap().double().eval()
    _, report = fold(model, torch.randn(1, 6, 8, 8, dtype=torch.float64))
    text = report.to_text()
    assert "folded (1)" in text and "kept" in text and "adapter" in text
    d = report.to_dict()
    assert d["folded"][0]["level"] == "graph" and d["max_rel_error"] <= RTOL


def test_folded_graph_accepts_other_batch_sizes_after_batch_one_example():
    torch.manual_seed(14)

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.fc = Branchy(4), nn.Linear(4 * 6 * 6, 3)

        def forward(self, x):
            return self.fc(self.block(x).view(x.shape[0], -1))

    model = Head().double().eval()
    folded, _ = fold(model, torch.randn(1, 4, 6, 6, dtype=torch.float64))
    _close(model, folded, (1, 4, 6, 6), (5, 4, 6, 6))


@pytest.mark.parametrize(
    ("kernel", "padding", "folds"),
    [(1, 0, True), (3, 0, True), (3, 1, False)],
    ids=["bn-conv1x1", "bn-conv3x3-valid", "bn-conv3x3-zero-padded"],
)
def test_bn_before_conv_folds_only_where_exact(kernel, padding, folds):
    """BN on the input side of a conv is exact unless zero padding meets the BN shift."""
    torch.manual_seed(16)
    model = nn.Sequential(nn.ReLU(), _bn(4), nn.Conv2d(4, 5, kernel, padding=padding), nn.ReLU())
    model = model.double().eval()
    folded, report = fold(model, torch.randn(1, 4, 9, 9, dtype=torch.float64))
    assert bool(report.folded) is folds
    if folds:
        assert not any("batch_norm" in k or "BatchNorm" in k for k in _kinds(folded))
    else:
        assert any("border" in k.reason for k in report.kept)
    _close(model, folded, (1, 4, 9, 9), (2, 4, 10, 12))


# ------------------------------------------------------------ sub-region fallback


def _batch_norms(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_region_rejected_by_the_verifier_is_split_into_exact_pairs():
    """A biased 1x1 conv-BN before a zero-padded depthwise conv-BN is not one conv
    (the border differs), but each conv-BN pair is."""
    torch.manual_seed(21)
    model = (
        nn.Sequential(nn.Conv2d(4, 6, 1), _bn(6), nn.Conv2d(6, 6, 3, padding=1, groups=6), _bn(6))
        .double()
        .eval()
    )
    folded, report = fold(model, torch.randn(1, 4, 8, 9, dtype=torch.float64))
    assert _batch_norms(folded) == []
    (kept,) = [k for k in report.kept if k.modules == ("0", "1", "2", "3")]
    assert "varies over positions" in kept.reason
    assert len(kept.folded_inside) == 2 and "groups=6" in kept.folded_inside[1]
    assert len([r for r in report.folded if r.level == "graph"]) == 2
    _close(model, folded, (1, 4, 8, 9), (2, 4, 11, 10))


class ResidualConvBN(nn.Module):
    """``x + BN(conv(x))`` after a branch sum and its BN (RepViT's pattern): the
    maximal region reaches back through the previous residual and has two inputs."""

    def __init__(self, c=6):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.pw = nn.Conv2d(c, c, 1, groups=c)
        self.bn_sum = _bn(c)
        self.fc1, self.bn1 = nn.Conv2d(c, 2 * c, 1, bias=False), _bn(2 * c)
        self.fc2, self.bn2 = nn.Conv2d(2 * c, c, 1, bias=False), _bn(c)

    def forward(self, x):
        t = self.bn_sum(self.dw(x) + self.pw(x) + x)
        return t + self.bn2(self.fc2(F.gelu(self.bn1(self.fc1(t)))))


def test_region_with_two_inputs_is_narrowed_to_its_single_input_parts():
    torch.manual_seed(22)
    model = nn.Sequential(ResidualConvBN(), ResidualConvBN()).double().eval()
    folded, report = fold(model, torch.randn(1, 6, 9, 8, dtype=torch.float64))
    assert _batch_norms(folded) == []
    two_inputs = [k for k in report.kept if "2 activation inputs" in k.reason]
    assert two_inputs and all(k.folded_inside for k in two_inputs)
    # per block: the branch sum + BN, fc1-BN, fc2-BN each one conv
    convs = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 6
    _close(model, folded, (1, 6, 9, 8), (2, 6, 10, 11))


def test_more_expensive_replacement_is_declined_and_split():
    """A depthwise 3x3 conv-BN then a 1x1 conv-BN is one dense 3x3 conv, which costs
    more FLOPs and parameters: declined with the reason, the pairs folded instead."""
    torch.manual_seed(23)
    model = (
        nn.Sequential(
            nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False),
            _bn(8),
            nn.Conv2d(8, 12, 1, bias=False),
            _bn(12),
        )
        .double()
        .eval()
    )
    folded, report = fold(model, torch.randn(1, 8, 10, 9, dtype=torch.float64))
    assert _batch_norms(folded) == []
    (kept,) = [k for k in report.kept if "raise the cost" in k.reason]
    assert "parameters" in kept.reason and kept.folded_inside
    assert report.flops_after <= report.flops_before
    assert report.params_after <= report.params_before
    _close(model, folded, (1, 8, 10, 9), (2, 8, 11, 12))
