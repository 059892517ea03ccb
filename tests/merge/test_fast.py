"""The fast path (`edgerep.merge._fast`): known algebra, same gate, probe as fallback.

Every PEFT tuner on every base it supports and every zoo adapter is merged twice in
float64 (fast path on, and ``fast=False``: the identity probe); the merged weights
must agree to 1e-12 relative and the report must name the route each layer took.
A rule whose formula is corrupted (a perturbation far below float32 precision) or
that raises must be caught by the verifier and fall back to the probe.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import edgerep
from edgerep.merge import _fast
from tests.merge import randomize_adapters, rel_error, same_state, state_snapshot
from tests.merge.test_custom_adapters import KEPT_CASES, MERGE_CASES, Case

peft = pytest.importorskip("peft", reason="peft is an optional extra (pip install 'edgerep[peft]')")
transformers = pytest.importorskip("transformers", reason="transformers comes with edgerep[peft]")

from peft import LoraConfig, get_peft_model  # noqa: E402

from tests.merge.test_merge_peft import NOT_ONE_LAYER, SUPPORTED, build, example  # noqa: E402

F64 = torch.float64
SAME = 1e-12
PEFT_RULE = "peft.tuners.tuners_utils.BaseTunerLayer"
LORA_RULE = "peft.tuners.lora.layer.Linear"
# zoo adapters with a rule, and the rule's name
ZOO_RULES = {
    "ssf": "ssf",
    "pissa": "low-rank",
    "sorsa": "low-rank",
    "ether": "reflection",
    "ether_plus": "reflection",
}


def _max_rel_diff(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    worst = 0.0
    for k in sa:
        scale = sb[k].to(F64).abs().max().item()
        diff = (sa[k].to(F64) - sb[k].to(F64)).abs().max().item()
        worst = max(worst, diff / scale if scale else diff)
    return worst


def _no_meta(model: nn.Module) -> bool:
    return not any(t.is_meta for t in (*model.parameters(), *model.buffers()))


@pytest.mark.parametrize(("tuner", "base"), SUPPORTED)
def test_peft_fast_path_equals_the_probe(tuner, base):
    model = build(tuner, base)
    snapshot = state_snapshot(model)
    fast, report = edgerep.merge(model)
    probed, probe_report = edgerep.merge(model, fast=False)

    assert same_state(model, snapshot)
    plain_lora = tuner in ("lora", "rslora") and base == "linear"
    assert report.routes == {"fast:lora" if plain_lora else "fast:peft-merge": len(report.merged)}
    assert all(r.fallback == "" for r in report.merged)
    assert probe_report.routes == {"probe": len(probe_report.merged)}
    assert _max_rel_diff(fast, probed) <= SAME
    x = example(base)
    with torch.no_grad():
        assert rel_error(model(x), fast(x)) <= 1e-9


@pytest.mark.parametrize(("tuner", "base"), sorted(NOT_ONE_LAYER))
def test_peft_merges_the_verifier_rejects_fall_back_and_stay_kept(tuner, base):
    """PEFT's merge of OFT/BOFT convs is not their forward: fast path rejected, probe too."""
    model = build(tuner, base)
    x = example(base)
    with torch.no_grad():
        ref = model(x)
    merged, report = edgerep.merge(model)
    assert report.kept
    assert all("rejected by the verifier" in k.reason for k in report.kept)
    assert _no_meta(merged)  # kept wrappers are whole copies, not the skeleton
    with torch.no_grad():
        assert rel_error(ref, merged(x)) <= 1e-9


@pytest.mark.parametrize("case", MERGE_CASES, ids=lambda c: c.id)
def test_zoo_fast_path_equals_the_probe(case: Case):
    model = case.build()
    fast, report = edgerep.merge(model)
    probed, _ = edgerep.merge(model, fast=False)
    (layer,) = report.merged
    rule = ZOO_RULES.get(case.adapter)
    assert layer.route == (f"fast:{rule}" if rule else "probe")
    assert layer.fallback == ""
    assert _max_rel_diff(fast, probed) <= SAME


@pytest.mark.parametrize(("case", "reason"), KEPT_CASES, ids=[c.id for c, _ in KEPT_CASES])
def test_zoo_adapters_that_cannot_merge_are_kept_either_way(case: Case, reason: str):
    merged, report = edgerep.merge(case.build())
    assert report.merged == []
    assert [k.path for k in report.kept] == ["adapted"] and reason in report.kept[0].reason
    assert _no_meta(merged)


def _corrupt(monkeypatch, qualname: str, how: str) -> None:
    name, rule = _fast.FAST_RULES[qualname]

    def corrupted(module, base_path, kind):
        if how == "raise":
            raise _fast.NoFastPath("not today")
        weight, bias = rule(module, base_path, kind)
        return weight * (1 + 1e-8), bias  # invisible in float32, not in float64

    monkeypatch.setitem(_fast.FAST_RULES, qualname, (name, corrupted))


@pytest.mark.parametrize("how", ["perturb", "raise"])
@pytest.mark.parametrize(
    ("tuner", "base"), [("lora", "linear"), ("dora", "conv"), ("ia3", "linear")]
)
def test_a_corrupted_peft_rule_is_caught_and_falls_back(monkeypatch, tuner, base, how):
    """Both PEFT rules corrupted. The LoRA rule writes into its float64 copy before it is
    rejected: the probe must read a fresh copy, or the merged layer would hold B·A twice."""
    model = build(tuner, base)
    _corrupt(monkeypatch, LORA_RULE, how)
    _corrupt(monkeypatch, PEFT_RULE, how)
    merged, report = edgerep.merge(model)
    assert report.routes == {"probe": len(report.merged)}
    why = "rejected by the verifier" if how == "perturb" else "declined: NoFastPath: not today"
    assert all(why in r.fallback for r in report.merged)
    assert "via probe" in report.to_text() and why in report.to_text()
    assert report.max_error <= 1e-9
    x = example(base)
    with torch.no_grad():
        assert rel_error(model(x), merged(x)) <= 1e-9


def test_a_declining_rule_passes_to_the_next_one(monkeypatch):
    model = build("lora", "linear")
    _corrupt(monkeypatch, LORA_RULE, "raise")
    merged, report = edgerep.merge(model)
    assert report.routes == {"fast:peft-merge": 2}
    assert all(r.fallback == "" for r in report.merged)
    x = example("linear")
    with torch.no_grad():
        assert rel_error(model(x), merged(x)) <= 1e-9


@pytest.mark.parametrize("variant", ["two-adapters", "lora-bias", "disabled", "pissa"])
def test_the_lora_rule_equals_the_probe(variant):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8, bias=False))
    init = "pissa" if variant == "pissa" else True
    bias = variant == "lora-bias"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(
            net,
            LoraConfig(r=3, target_modules=["0", "2"], lora_bias=bias, init_lora_weights=init),
            adapter_name="a",
        )
        if variant == "two-adapters":
            model.add_adapter("b", LoraConfig(r=2, lora_alpha=5, target_modules=["0"]))
            model.base_model.set_adapter(["a", "b"])
    randomize_adapters(model)
    model = model.to(F64).eval()
    if variant == "disabled":
        model.base_model.disable_adapter_layers()
    fast, report = edgerep.merge(model)
    probed, _ = edgerep.merge(model, fast=False)
    assert report.routes == {"fast:lora": 2}
    assert _max_rel_diff(fast, probed) <= SAME
    x = torch.randn(3, 5, 12, dtype=F64)
    with torch.no_grad():
        assert rel_error(model(x), fast(x)) <= 1e-9


def test_a_corrupted_zoo_rule_is_caught_and_falls_back(monkeypatch):
    model = Case("ssf", "conv").build()
    _corrupt(monkeypatch, "edgerep.zoo.adapters.SSFAdapter", "perturb")
    merged, report = edgerep.merge(model)
    (layer,) = report.merged
    assert layer.route == "probe" and "rejected by the verifier" in layer.fallback
    probed, _ = edgerep.merge(model, fast=False)
    assert _max_rel_diff(merged, probed) == 0.0


def test_combinations_take_the_fast_path_per_adapter():
    torch.manual_seed(0)
    model = get_peft_model(
        nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8)),
        LoraConfig(r=3, target_modules=["0", "2"]),
        adapter_name="a",
    )
    model.add_adapter("b", LoraConfig(r=2, use_dora=True, target_modules=["0"]))
    randomize_adapters(model)
    model = model.to(F64).eval()
    for method, density in (("linear", None), ("ties", 0.5), ("dare_ties", 0.7)):
        combine = {"a": 0.7, "b": 0.4}
        fast, report = edgerep.merge(model, combine=combine, method=method, density=density)
        probed, _ = edgerep.merge(
            model, combine=combine, method=method, density=density, fast=False
        )
        # layer "0": base and "a" by the LoRA rule, DoRA "b" by PEFT's merge
        assert report.routes == {"mixed": 1, "fast:lora": 1}
        assert _max_rel_diff(fast, probed) <= SAME


def test_tied_weights_are_copied_not_skipped():
    """LoRA on GPT-2's word embeddings, which the LM head shares: the head keeps real weights."""
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40, n_positions=16)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(config)
    assert base.lm_head.weight is base.transformer.wte.weight
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, LoraConfig(r=2, target_modules=["wte", "c_attn"]))
    model = randomize_adapters(model).to(F64).eval()
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    merged, report = edgerep.merge(model)
    assert _no_meta(merged)
    assert report.routes == {"fast:peft-merge": 2}
    with torch.no_grad():
        assert rel_error(ref, merged(input_ids=ids).logits) <= 1e-9
        again = copy.deepcopy(merged)(input_ids=ids).logits
    assert torch.equal(again, merged(input_ids=ids).logits)


def test_unchanged_tensors_share_storage_and_merged_ones_do_not():
    """share_unchanged (the default): no second copy of what merge leaves as it is."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(30, 12), nn.LayerNorm(12), nn.Linear(12, 8))
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["2"]))
    model = randomize_adapters(model).to(F64).eval()
    snapshot = state_snapshot(model)
    inner = model.base_model.model
    merged, _ = edgerep.merge(model)
    independent, _ = edgerep.merge(model, share_unchanged=False)
    assert merged[0].weight.data_ptr() == inner[0].weight.data_ptr()
    assert merged[0].weight is not inner[0].weight  # a new Parameter over the same storage
    assert independent[0].weight.data_ptr() != inner[0].weight.data_ptr()
    for m in (merged, independent):
        assert m[2].weight.data_ptr() != inner[2].base_layer.weight.data_ptr()
    merged.to(torch.float32)  # casting the result rebinds its own tensors only
    assert same_state(model, snapshot)
    assert merged[0].weight.dtype == torch.float32 and inner[0].weight.dtype == F64
    ids = torch.randint(0, 30, (2, 5))
    with torch.no_grad():
        assert rel_error(model(ids), independent(ids)) <= 1e-9


class _Scaled(nn.Module):
    """A custom adapter: a per-output scale after a base Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(6, 6)
        self.scale = nn.Parameter(torch.rand(6) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) * self.scale


def test_a_wrapper_held_at_two_paths_stays_tied():
    torch.manual_seed(0)
    wrapper = _Scaled()
    model = nn.Sequential(wrapper, nn.ReLU(), wrapper).to(F64).eval()
    merged, report = edgerep.merge(model)
    assert len(report.merged) == 1 and type(merged[0]) is nn.Linear
    assert merged[2] is merged[0]  # one module at both paths, like the input
    x = torch.randn(4, 6, dtype=F64)
    with torch.no_grad():
        assert rel_error(model(x), merged(x)) <= 1e-9


@pytest.mark.parametrize("entry", [(0, 0), (-1, -1), (5, 3)])
def test_one_wrong_entry_of_the_lora_rule_is_caught(monkeypatch, entry):
    """The verifier multiplies the candidate's dense weight by its random rows (as
    ``W·xᵀ``): a single entry off by 1e-6 relative, anywhere, is rejected."""
    name, rule = _fast.FAST_RULES[LORA_RULE]

    def one_entry(module, base_path, kind):
        weight, bias = rule(module, base_path, kind)
        weight[entry] *= 1 + 1e-6
        return weight, bias

    monkeypatch.setitem(_fast.FAST_RULES, LORA_RULE, (name, one_entry))
    model = build("lora", "linear")
    merged, report = edgerep.merge(model)
    assert report.routes == {"probe": len(report.merged)}
    assert all("'lora' rejected by the verifier" in r.fallback for r in report.merged)
    probed, _ = edgerep.merge(model, fast=False)
    assert _max_rel_diff(merged, probed) == 0.0


@pytest.mark.parametrize("bias", [True, False])
def test_merged_linear_layers_are_plain_nn_linear(bias):
    """`_plain_linear` assembles the Linear without its random init: same class,
    attributes, repr, state_dict and copy/pickle behaviour as ``nn.Linear(...)``."""
    import io

    torch.manual_seed(0)
    model = get_peft_model(
        nn.Sequential(nn.Linear(6, 5, bias=bias)), LoraConfig(r=2, target_modules=["0"])
    )
    randomize_adapters(model)
    merged, report = edgerep.merge(model.eval())
    assert report.routes == {"fast:lora": 1}
    layer = merged[0]
    ref = nn.Linear(6, 5, bias=bias)
    assert type(layer) is nn.Linear and repr(layer) == repr(ref)
    assert layer.state_dict().keys() == ref.state_dict().keys()
    assert (layer.bias is None) == (not bias) and "bias" in layer._parameters
    assert not layer.training and all(p.requires_grad for p in layer.parameters())
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    x = torch.randn(3, 6)
    assert torch.equal(again(x), layer(x)) and torch.equal(copy.deepcopy(layer)(x), layer(x))
