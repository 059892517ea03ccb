"""`edgerep.merge` on PEFT models: every tuner whose effect is linear, on every base it supports.

All models are built offline (no hub) in float64 with random adapter weights, and
the merged model must equal the unmerged one to 1e-9 relative. PEFT's own
``merge_and_unload`` is measured next to it; in bfloat16 our merge must be at
least as close to the unmerged model as PEFT's.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import edgerep
from edgerep.errors import ConfigError
from edgerep.fold.probe import round_to
from tests.merge import peft_modules, randomize_adapters, rel_error, same_state, state_snapshot

peft = pytest.importorskip("peft", reason="peft is an optional extra (pip install 'edgerep[peft]')")
transformers = pytest.importorskip("transformers", reason="transformers comes with edgerep[peft]")

from peft import (  # noqa: E402
    AdaLoraConfig,
    BOFTConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    VeraConfig,
    get_peft_model,
)
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402

RTOL = 1e-9
F64 = torch.float64


# --- small base nets ----------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, width: int = 16, d_in: int = 12, d_out: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, width)
        self.fc2 = nn.Linear(width, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class ConvNet(nn.Module):
    """Padding, stride, 1x1, bias and no bias: geometries that change the probe's math."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(4, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
        self.c3 = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))


class DilatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(4, 8, 3, dilation=2, padding=2)
        self.c2 = nn.Conv2d(8, 4, 3, bias=False)  # no padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(torch.relu(self.c1(x)))


class EmbNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 16, padding_idx=0)
        self.head = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(x))


def tiny_bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    return transformers.BertModel(config)


BASES = {
    "linear": (MLP, ["fc1", "fc2"], lambda g: torch.randn(3, 5, 12, generator=g, dtype=F64)),
    "conv": (
        ConvNet,
        ["c1", "c2", "c3"],
        lambda g: torch.randn(2, 4, 9, 10, generator=g, dtype=F64),
    ),
    "dilated": (
        DilatedNet,
        ["c1", "c2"],
        lambda g: torch.randn(2, 4, 9, 10, generator=g, dtype=F64),
    ),
    "embedding": (EmbNet, ["emb"], lambda g: torch.randint(0, 30, (3, 7), generator=g)),
}

# tuner -> config for the given target modules
TUNERS = {
    "lora": lambda t: LoraConfig(r=4, lora_alpha=8, target_modules=t),
    "rslora": lambda t: LoraConfig(r=4, lora_alpha=8, target_modules=t, use_rslora=True),
    "dora": lambda t: LoraConfig(r=4, lora_alpha=8, target_modules=t, use_dora=True),
    "adalora": lambda t: AdaLoraConfig(init_r=4, target_modules=t, total_step=10),
    "loha": lambda t: LoHaConfig(r=4, target_modules=t),
    "lokr": lambda t: LoKrConfig(r=4, target_modules=t),
    "ia3": lambda t: IA3Config(target_modules=t, feedforward_modules=t[:1]),
    "oft": lambda t: OFTConfig(r=0, oft_block_size=4, target_modules=t),
    "boft": lambda t: BOFTConfig(boft_block_size=4, target_modules=t),
    "vera": lambda t: VeraConfig(r=4, target_modules=t),
}

# what peft 0.21 cannot build or run, with the error it gives
UNSUPPORTED = {
    ("lora", "dilated"): "must match the size",  # LoRA's conv A ignores the base's dilation
    ("rslora", "dilated"): "must match the size",
    ("dora", "dilated"): "must match the size",
    ("oft", "dilated"): "dilation > 1 is not supported",
    ("vera", "dilated"): "No layers types compatible with VeRA",
    ("adalora", "embedding"): "not supported",
    ("loha", "embedding"): "not supported",
    ("lokr", "embedding"): "not supported",
    ("ia3", "embedding"): "not supported",
    ("boft", "embedding"): "not supported",
    ("vera", "conv"): "No layers types compatible with VeRA",
    ("vera", "embedding"): "No layers types compatible with VeRA",
}
# built, but its forward is not one layer of the base's geometry (see the test below)
NOT_ONE_LAYER = {("oft", "conv"), ("boft", "dilated")}
SUPPORTED = [
    (t, b)
    for t in TUNERS
    for b in BASES
    if (t, b) not in UNSUPPORTED and (t, b) not in NOT_ONE_LAYER
]


def build(tuner: str, base: str, *, seed: int = 0, dtype: torch.dtype = F64) -> nn.Module:
    cls, targets, _ = BASES[base]
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(cls(), TUNERS[tuner](targets))
    randomize_adapters(model, seed=seed)
    return model.to(dtype).eval()


def example(base: str, seed: int = 1) -> torch.Tensor:
    return BASES[base][2](torch.Generator().manual_seed(seed))


# --- float64: merged equals unmerged ------------------------------------------------------


@pytest.mark.parametrize(("tuner", "base"), SUPPORTED)
def test_merged_equals_unmerged_in_float64(tuner, base, record_property):
    model = build(tuner, base)
    snapshot = state_snapshot(model)
    x = example(base)
    with torch.no_grad():
        ref = model(x)

    merged, report = edgerep.merge(model)

    assert same_state(model, snapshot), "merge() changed its input"
    assert peft_modules(model), "the input lost its adapters"
    assert peft_modules(merged) == []
    targets = BASES[base][1]
    original = model.base_model.model
    for path in targets:
        layer, before = merged.get_submodule(path), original.get_submodule(path).base_layer
        assert type(layer) is type(before)
        assert layer.weight.shape == before.weight.shape
        assert layer.weight.dtype == before.weight.dtype
        assert (getattr(layer, "bias", None) is None) == (getattr(before, "bias", None) is None)
    assert [r.path for r in report.merged] == targets
    assert report.kept == []
    assert report.max_error <= RTOL
    with torch.no_grad():
        ours = rel_error(ref, merged(x))
        theirs = rel_error(ref, copy.deepcopy(model).merge_and_unload()(x))
    record_property("ours_rel_error", ours)
    record_property("peft_rel_error", theirs)
    assert ours <= RTOL
    assert theirs <= RTOL  # PEFT's own merge is exact in float64 for these


@pytest.mark.parametrize(("tuner", "base"), sorted(UNSUPPORTED))
def test_combinations_peft_cannot_build_or_run(tuner, base):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=UNSUPPORTED[(tuner, base)]):
        build(tuner, base)(example(base))


@pytest.mark.parametrize(
    ("tuner", "base", "merged_paths", "kept_paths", "why"),
    [
        ("oft", "conv", ["c3"], ["c1", "c2"], "differs by"),
        ("boft", "dilated", ["c2"], ["c1"], "output shape [1, 8, 12, 12] != [1, 8, 14, 14]"),
    ],
)
def test_peft_forwards_that_are_not_one_layer_are_kept(tuner, base, merged_paths, kept_paths, why):
    """Two peft 0.21 tuner layers whose forward is not a conv of the base's geometry.

    OFT Conv2d rotates unfolded patches and folds them back with overlap-add: linear,
    but not a convolution (the borders differ; a 1x1 conv has no overlap and merges).
    BOFT Conv2d drops the base conv's dilation, so its output has another size. No
    plain conv of the base's geometry equals either: edgerep keeps them with the
    verifier's reason, while PEFT's own merge_and_unload silently changes the model.
    """
    model = build(tuner, base)
    x = example(base)
    with torch.no_grad():
        ref = model(x)
    merged, report = edgerep.merge(model)
    assert [r.path for r in report.merged] == merged_paths
    assert [k.path for k in report.kept] == kept_paths
    assert all("rejected by the verifier" in k.reason and why in k.reason for k in report.kept)
    with torch.no_grad():
        assert rel_error(ref, merged(x)) <= RTOL  # kept layers compute what they did
        theirs = copy.deepcopy(model).merge_and_unload()(x)
    assert theirs.shape != ref.shape or rel_error(ref, theirs) > 1e-2


BERT_TARGETS = {"default": ["query", "key", "value", "dense"], "ia3": ["query", "value", "dense"]}


@pytest.mark.parametrize("tuner", list(TUNERS))
def test_tiny_transformer(tuner, record_property):
    torch.manual_seed(0)
    targets = BERT_TARGETS.get(tuner, BERT_TARGETS["default"])
    config = TUNERS[tuner](targets)
    if tuner == "ia3":
        config = IA3Config(target_modules=targets, feedforward_modules=["dense"])
    if tuner in ("lora", "dora", "oft"):  # these also take the word embeddings
        config.target_modules = {*targets, "word_embeddings"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_bert(), config)
    model = randomize_adapters(model).to(F64).eval()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(input_ids=ids)

    merged, report = edgerep.merge(model)

    assert type(merged).__name__ == "BertModel"
    assert peft_modules(merged) == []
    assert report.kept == []
    assert len(report.merged) == sum(isinstance(m, BaseTunerLayer) for m in model.modules())
    with torch.no_grad():
        out = merged(input_ids=ids)
        theirs = copy.deepcopy(model).merge_and_unload()(input_ids=ids)
    ours = max(
        rel_error(ref.last_hidden_state, out.last_hidden_state),
        rel_error(ref.pooler_output, out.pooler_output),
    )
    peft_err = rel_error(ref.last_hidden_state, theirs.last_hidden_state)
    record_property("ours_rel_error", ours)
    record_property("peft_rel_error", peft_err)
    assert ours <= RTOL
    assert peft_err <= RTOL


# --- bfloat16: at least as close to the unmerged model as PEFT's merge ---------------------


def _rms_rel(reference: torch.Tensor, other: torch.Tensor) -> float:
    ref = reference.to(F64)
    return ((other.to(F64) - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


BF16_CASES = [
    (t, "linear") for t in ("lora", "dora", "adalora", "loha", "lokr", "ia3", "oft", "boft", "vera")
] + [(t, "conv") for t in ("lora", "dora", "loha")]


@pytest.mark.parametrize(("tuner", "base"), BF16_CASES)
def test_bfloat16_merge_is_at_least_as_close_as_peft(tuner, base, record_property):
    """Weights: ours is the bf16 value nearest the exact merged weight, element by element.

    The exact merged weight comes from PEFT's own merge of a float64 copy of the bf16
    model (independent of edgerep). The unmerged model's function is its bf16 weights
    evaluated exactly (float64); measured against it, our merged model's RMS error is
    at most PEFT's (10% slack for ties: IA3's and VeRA's merges round almost as well).
    """
    cls, targets, _ = BASES[base]
    if base == "linear":
        cls = lambda: MLP(width=96, d_in=64, d_out=32)  # noqa: E731
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(cls(), TUNERS[tuner](targets))
    model = randomize_adapters(model).to(torch.bfloat16).eval()
    x = torch.randn(
        (64, 64) if base == "linear" else (4, 4, 12, 12), generator=torch.Generator().manual_seed(5)
    )
    exact_model = copy.deepcopy(model).to(F64)
    exact_merged = copy.deepcopy(exact_model).merge_and_unload()

    ours, report = edgerep.merge(model)
    theirs = copy.deepcopy(model).merge_and_unload()

    assert report.max_error <= RTOL
    for path in targets:
        exact = exact_merged.get_submodule(path).weight.to(F64)
        w_ours = ours.get_submodule(path).weight
        w_theirs = theirs.get_submodule(path).weight
        assert w_ours.dtype == torch.bfloat16
        assert ((w_ours.to(F64) - exact).abs() <= (w_theirs.to(F64) - exact).abs()).all()
    with torch.no_grad():
        ref = exact_model(x.to(F64))
        err_ours = _rms_rel(ref, copy.deepcopy(ours).to(F64)(x.to(F64)))
        err_theirs = _rms_rel(ref, copy.deepcopy(theirs).to(F64)(x.to(F64)))
        ref_bf16 = model(x.bfloat16())
        bf16_ours = _rms_rel(ref_bf16, ours(x.bfloat16()))
        bf16_theirs = _rms_rel(ref_bf16, theirs(x.bfloat16()))
    record_property("ours_rms_rel", err_ours)
    record_property("peft_rms_rel", err_theirs)
    record_property("ours_rms_rel_bf16_arithmetic", bf16_ours)
    record_property("peft_rms_rel_bf16_arithmetic", bf16_theirs)
    assert err_ours <= err_theirs * 1.1


def test_round_to_is_correctly_rounded_where_torch_rounds_twice():
    # just below a bfloat16 midpoint: float32 rounds onto the midpoint, then ties-to-even
    lo, hi = 0.2021484375, 0.203125  # neighbours in bfloat16 (hi has the even mantissa)
    mid = (lo + hi) / 2
    values = torch.tensor([mid - 5.6e-9, mid + 5.6e-9, mid, -(mid - 5.6e-9)], dtype=F64)
    naive = values.to(torch.bfloat16).to(F64).tolist()
    exact = round_to(values, torch.bfloat16).to(F64).tolist()
    assert naive[0] == hi  # torch's double rounding goes to the far neighbour
    assert exact == [lo, hi, hi, -lo]
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        v = torch.randn(100_000, generator=gen, dtype=F64)
        r = round_to(v, dtype)
        step_up = torch.nextafter(r.to(F64), torch.full_like(v, float("inf"))).to(dtype)
        assert ((r.to(F64) - v).abs() <= (step_up.to(F64) - v).abs()).all()
        assert torch.equal(round_to(v.to(torch.float32).to(F64), dtype), v.float().to(dtype))


# --- what cannot merge stays, visibly -----------------------------------------------------


@pytest.mark.parametrize(
    ("config", "kind"),
    [
        (
            lambda: PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=3),
            "PROMPT_TUNING",
        ),
        (
            lambda: PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=3),
            "PREFIX_TUNING",
        ),
        (
            lambda: PromptEncoderConfig(
                task_type="FEATURE_EXTRACTION", num_virtual_tokens=3, encoder_hidden_size=16
            ),
            "P_TUNING",
        ),
    ],
)
def test_prompt_learning_is_kept_with_the_reason(config, kind):
    torch.manual_seed(0)
    model = get_peft_model(tiny_bert(), config()).to(F64).eval()
    randomize_adapters(model)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    merged, report = edgerep.merge(model)
    assert type(merged) is type(model)
    assert report.merged == []
    assert len(report.kept) == 1 and kind in report.kept[0].reason
    assert "no adapter-wrapped layer" in report.kept[0].reason
    with torch.no_grad():
        assert torch.equal(
            model(input_ids=ids).last_hidden_state, merged(input_ids=ids).last_hidden_state
        )


class Bottleneck(nn.Module):
    """A Houlsby/AdaptFormer-style adapter: nonlinear, so it cannot become one layer."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.out_features, 4)
        self.up = nn.Linear(4, base.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + self.up(torch.relu(self.down(y)))


class Routed(nn.Module):
    """Input-dependent routing: a gate computed from the input scales a low-rank delta."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.gate = nn.Parameter(torch.randn(base.in_features))
        self.a = nn.Parameter(torch.randn(2, base.in_features))
        self.b = nn.Parameter(torch.randn(base.out_features, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(x @ self.gate).unsqueeze(-1)
        return self.base(x) + g * (x @ self.a.T @ self.b.T)


@pytest.mark.parametrize("adapter", [Bottleneck, Routed])
def test_nonlinear_adapters_are_kept_with_the_reason(adapter):
    torch.manual_seed(0)
    model = MLP().to(F64)
    model.fc1 = adapter(model.fc1).to(F64)
    model.eval()
    x = example("linear")
    merged, report = edgerep.merge(model)
    assert report.merged == []
    assert [k.path for k in report.kept] == ["fc1"]
    assert "not affine" in report.kept[0].reason
    assert type(merged.fc1) is adapter
    with torch.no_grad():
        assert torch.equal(model(x), merged(x))


def test_lora_on_multihead_attention_is_kept_with_the_reason():
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
            self.fc = nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.attn(x, x, x)[0])

    torch.manual_seed(0)
    model = get_peft_model(Attn(), LoraConfig(r=2, target_modules=["attn", "fc"]))
    model = randomize_adapters(model).to(F64).eval()
    x = torch.randn(2, 5, 16, dtype=F64)
    merged, report = edgerep.merge(model)
    assert [r.path for r in report.merged] == ["fc"]
    assert [k.path for k in report.kept] == ["attn"]
    assert "MultiheadAttention is not a Linear" in report.kept[0].reason
    with torch.no_grad():
        assert rel_error(model(x), merged(x)) <= RTOL


# --- adapters that are not PEFT's: the same path ------------------------------------------


class ScaleShift(nn.Module):
    """SSF-style: scale and shift after the base layer (affine, a `base` child)."""

    def __init__(self, base: nn.Module, channels: int) -> None:
        super().__init__()
        self.base = base
        self.scale = nn.Parameter(torch.randn(channels))
        self.shift = nn.Parameter(torch.randn(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        view = (1, -1, *([1] * (y.ndim - 2))) if isinstance(self.base, nn.Conv2d) else (-1,)
        return y * self.scale.view(view) + self.shift.view(view)


class LoraLinear(nn.Linear):
    """loralib style: a Linear subclass carrying its own LoRA factors."""

    def __init__(self, d_in: int, d_out: int, r: int = 3) -> None:
        super().__init__(d_in, d_out)
        self.lora_A = nn.Parameter(torch.randn(r, d_in))
        self.lora_B = nn.Parameter(torch.randn(d_out, r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 0.5 * (x @ self.lora_A.T @ self.lora_B.T)


class ConvWithGain(nn.Module):
    """One conv child (not named base) and a parameter of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.gain = nn.Parameter(torch.randn(8, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.gain + self.conv(x)


def test_custom_adapters_merge_through_the_same_path():
    torch.manual_seed(0)
    model = nn.Sequential(
        ScaleShift(nn.Conv2d(4, 4, 3, padding=1), 4),
        ConvWithGain(),
        nn.Flatten(2),
        nn.Sequential(nn.Linear(25, 16), nn.ReLU()),  # plain: not an adapter, left alone
        LoraLinear(16, 6),
        ScaleShift(nn.Linear(6, 6), 6),
    ).to(F64)
    model.eval()
    x = torch.randn(2, 4, 9, 9, dtype=F64)
    merged, report = edgerep.merge(model)
    assert [r.path for r in report.merged] == ["0", "1", "4", "5"]
    assert [r.adapter for r in report.merged] == [
        "ScaleShift",
        "ConvWithGain",
        "LoraLinear",
        "ScaleShift",
    ]
    assert report.kept == []
    assert [type(m) for m in merged] == [
        nn.Conv2d,
        nn.Conv2d,
        nn.Flatten,
        nn.Sequential,
        nn.Linear,
        nn.Linear,
    ]
    assert merged[1].stride == (2, 2)
    assert merged[5].bias is not None  # the shift became a bias
    with torch.no_grad():
        assert rel_error(model(x), merged(x)) <= RTOL


def test_plain_models_and_plain_subclasses_are_left_alone():
    model = nn.Sequential(nn.Linear(4, 4), nn.MultiheadAttention(4, 2)).eval()
    _, report = edgerep.merge(model)
    assert report.merged == [] and report.kept == []
    assert any("no adapter-wrapped layer" in n for n in report.notes)


# --- choosing adapters --------------------------------------------------------------------


def two_adapter_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(
        MLP(), LoraConfig(r=2, target_modules=["fc1", "fc2"]), adapter_name="cat"
    )
    model.add_adapter("dog", LoraConfig(r=3, lora_alpha=6, target_modules=["fc1"]))
    return model


def _randomize_all_lora(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.to(F64).eval()


def test_merge_one_adapter_by_name():
    model = _randomize_all_lora(two_adapter_mlp())
    x = example("linear")
    for name in ("cat", "dog"):
        reference = copy.deepcopy(model)
        reference.set_adapter(name)
        with torch.no_grad():
            ref = reference(x)
        merged, report = edgerep.merge(model, adapter=name)
        assert report.mode == "adapter"
        with torch.no_grad():
            assert rel_error(ref, merged(x)) <= RTOL
        other = "dog" if name == "cat" else "cat"
        assert any(repr(other) in n and "not in the merged model" in n for n in report.notes)


def test_unknown_adapter_name_suggests_the_close_one():
    model = _randomize_all_lora(two_adapter_mlp())
    with pytest.raises(ConfigError, match=r"'cow' not in the model.*its adapters: cat, dog"):
        edgerep.merge(model, adapter="cow")
    model.add_adapter("style", LoraConfig(r=2, target_modules=["fc1"]))
    with pytest.raises(ConfigError, match="did you mean 'style'"):
        edgerep.merge(model, adapter="styel")


def test_several_active_adapters_merge_together():
    model = _randomize_all_lora(two_adapter_mlp())
    model.base_model.set_adapter(["cat", "dog"])
    x = example("linear")
    with torch.no_grad():
        ref = model(x)
    merged, report = edgerep.merge(model)
    assert report.merged[0].adapters == ("cat", "dog")
    with torch.no_grad():
        assert rel_error(ref, merged(x)) <= RTOL


def test_modules_to_save_becomes_the_trained_copy():
    torch.manual_seed(0)
    model = get_peft_model(MLP(), LoraConfig(r=2, target_modules=["fc1"], modules_to_save=["fc2"]))
    model = randomize_adapters(model).to(F64).eval()
    x = example("linear")
    merged, report = edgerep.merge(model)
    assert peft_modules(merged) == []
    assert type(merged.fc2) is nn.Linear
    assert [r.adapter for r in report.merged] == ["lora.Linear", "ModulesToSaveWrapper"]
    with torch.no_grad():
        assert rel_error(model(x), merged(x)) <= RTOL
        assert not torch.equal(merged.fc2.weight, model.base_model.model.fc2.original_module.weight)


def test_train_mode_model_is_merged_in_eval_mode_and_noted():
    model = build("lora", "linear").train()
    merged, report = edgerep.merge(model)
    assert model.training and not merged.training
    assert any("train mode" in n for n in report.notes)


def test_bad_arguments():
    model = build("lora", "linear")
    with pytest.raises(ConfigError, match="not both"):
        edgerep.merge(model, adapter="default", combine={"default": 1.0})
    with pytest.raises(ConfigError, match=r"needs a torch\.nn\.Module"):
        edgerep.merge("model.pt")
    with pytest.raises(ConfigError, match="apply only to combine"):
        edgerep.merge(model, method="ties", density=0.5)
    with pytest.raises(ConfigError, match="rtol"):
        edgerep.merge(model, rtol=0)


def test_report_text_and_dict():
    model = build("dora", "conv")
    _, report = edgerep.merge(model)
    text = report.to_text()
    assert "merge: active" in text and "lora.Conv2d [default] -> Conv2d(" in text
    d = report.to_dict()
    assert d["max_rel_error"] == report.max_error <= RTOL
    assert [m["path"] for m in d["merged"]] == ["c1", "c2", "c3"]


def test_edgerep_merge_is_callable_module():
    import edgerep.merge as merge_module

    assert callable(merge_module)
    assert edgerep.merge is merge_module
    assert "merge" in edgerep.__all__ and "MergeReport" in edgerep.__all__


@pytest.mark.parametrize(
    "config",
    [
        lambda: LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
        lambda: IA3Config(
            target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"], fan_in_fan_out=True
        ),
    ],
)
def test_gpt2_conv1d_bases_stay_conv1d(config):
    """transformers' Conv1D (GPT-2) stores its weight transposed; it is rebuilt as a Conv1D."""
    cfg = transformers.GPT2Config(
        vocab_size=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = get_peft_model(transformers.GPT2Model(cfg), config())
    model = randomize_adapters(model).to(F64).eval()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    merged, report = edgerep.merge(model)
    assert peft_modules(merged) == [] and report.kept == []
    assert type(merged.h[0].attn.c_attn).__name__ == "Conv1D"
    with torch.no_grad():
        ref, out = model(input_ids=ids), merged(input_ids=ids)
    assert rel_error(ref.last_hidden_state, out.last_hidden_state) <= RTOL


def test_mixed_model_with_stacked_tuners():
    """PeftMixedModel: LoHa wrapped around a LoRA layer; the outer wrapper's function is read."""
    torch.manual_seed(0)
    model = peft.PeftMixedModel(MLP(), LoraConfig(r=2, target_modules=["fc1", "fc2"]), "lo")
    model.add_adapter("ha", LoHaConfig(r=2, target_modules=["fc1"]))
    model.set_adapter(["lo", "ha"])
    model = randomize_adapters(model).to(F64).eval()
    x = example("linear")
    merged, report = edgerep.merge(model)
    assert [r.adapters for r in report.merged] == [("ha", "lo"), ("lo",)]
    assert peft_modules(merged) == []
    with torch.no_grad():
        assert rel_error(model(x), merged(x)) <= RTOL


def test_importing_merge_loads_no_torch():
    import subprocess
    import sys

    code = (
        "import sys, edgerep, edgerep.merge\n"
        "edgerep.merge.MergeReport().to_text(); edgerep.merge.parse_adapter_spec('a=b:1')\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
