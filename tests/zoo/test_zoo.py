"""The zoo: blocks build and run in train/eval and float64, nets, randomize_, demo data."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgerep.errors import ConfigError
from edgerep.zoo import (
    BLOCKS,
    AngularDifferenceConv2d,
    BNAndPad,
    CentralDifferenceConv2d,
    HorizontalDifferenceConv2d,
    RepVGGNet,
    VerticalDifferenceConv2d,
    accuracy,
    demo_net,
    get_block,
    load_digits_tensors,
    mobileone_net,
    randomize_,
    register_block,
    repvgg_a0,
    train_classifier,
)

# name -> (build, input shape, expected output shape)
EXAMPLES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], tuple[int, ...]]] = {
    "repvgg": (lambda: BLOCKS["repvgg"](4, 8, stride=2), (2, 4, 9, 9), (2, 8, 5, 5)),
    "repvgg1d": (lambda: BLOCKS["repvgg1d"](4, 4), (2, 4, 11), (2, 4, 11)),
    "acnet": (lambda: BLOCKS["acnet"](4, 6, dilation=2), (2, 4, 8, 7), (2, 6, 8, 7)),
    "dbb": (lambda: BLOCKS["dbb"](4, 8, stride=2), (2, 4, 8, 8), (2, 8, 4, 4)),
    "mobileone": (
        lambda: BLOCKS["mobileone"](6, 6, groups=6, num_branches=3),
        (2, 6, 7, 7),
        (2, 6, 7, 7),
    ),
    "repmlp": (lambda: BLOCKS["repmlp"](4, 5, 6, groups=2), (2, 4, 5, 6), (2, 4, 5, 6)),
    "deconv": (lambda: BLOCKS["deconv"](4, 8, stride=2), (2, 4, 9, 8), (2, 8, 5, 4)),
    "ssf": (lambda: BLOCKS["ssf"](4, 8, position="before"), (2, 4, 6, 6), (2, 8, 6, 6)),
    "ssf_linear": (lambda: BLOCKS["ssf_linear"](5, 3), (2, 7, 5), (2, 7, 3)),
    "repghost": (lambda: BLOCKS["repghost"](4, 8, stride=2), (2, 4, 8, 8), (2, 8, 4, 4)),
    "weightnorm": (lambda: BLOCKS["weightnorm"](4, 8, norm="spectral"), (2, 4, 6, 6), (2, 8, 6, 6)),
    "ghostnetv3": (lambda: BLOCKS["ghostnetv3"](4, 6, 3, stride=2), (2, 4, 8, 8), (2, 6, 4, 4)),
    "repvit": (lambda: BLOCKS["repvit"](4, 6, stride=2, se=True), (2, 4, 7, 7), (2, 6, 4, 4)),
    "bn_linear": (lambda: BLOCKS["bn_linear"](6, 3), (4, 6), (4, 3)),
    "regnetx": (lambda: BLOCKS["regnetx"](4, 8, stride=2), (2, 4, 8, 8), (2, 8, 4, 4)),
    "shvit": (lambda: BLOCKS["shvit"](6, partial=2, qk_dim=2), (2, 6, 5, 4), (2, 6, 5, 4)),
    "lcnetv2": (lambda: BLOCKS["lcnetv2"](4, 6, stride=2), (2, 4, 8, 8), (2, 6, 4, 4)),
    "tinyvit": (lambda: BLOCKS["tinyvit"](4, window=2), (2, 4, 4, 6), (2, 4, 4, 6)),
    "efficientvim": (lambda: BLOCKS["efficientvim"](4, state=2), (2, 4, 5, 6), (2, 4, 5, 6)),
}


def test_examples_cover_the_registry() -> None:
    assert set(EXAMPLES) == set(BLOCKS)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_block_runs_in_train_and_eval(name: str, dtype: torch.dtype) -> None:
    build, in_shape, out_shape = EXAMPLES[name]
    block = build().to(dtype)
    x = torch.randn(in_shape, dtype=dtype)

    y = block.train()(x)
    assert y.shape == out_shape and y.dtype == dtype
    y.square().mean().backward()
    missing = [n for n, p in block.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reached {missing}"

    with torch.no_grad():
        y = block.eval()(x)
    assert y.shape == out_shape and y.dtype == dtype
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_blocks_carry_no_deploy_code(name: str) -> None:
    cls = BLOCKS[name]
    assert issubclass(cls, nn.Module) and cls.__doc__
    names = {
        attr
        for klass in cls.__mro__
        if klass.__module__.startswith("edgerep")
        for attr in vars(klass)
    }
    deploy = {
        n for n in names if any(w in n.lower() for w in ("deploy", "reparam", "fuse", "merge"))
    }
    assert not deploy, f"{cls.__name__} defines {deploy}: folding belongs to edgerep.fold"


# ------------------------------------------------------------------ registry


def test_get_block_returns_the_class() -> None:
    assert get_block("repvgg") is BLOCKS["repvgg"]


def test_unknown_block_suggests_a_close_name() -> None:
    with pytest.raises(KeyError, match="did you mean 'repvgg'"):
        get_block("repvgq")


def test_duplicate_registration_raises() -> None:
    with pytest.raises(ConfigError, match="already registered"):

        @register_block("repvgg")
        class Another(nn.Module):
            pass

    assert BLOCKS["repvgg"].__name__ == "RepVGGBlock"


def test_registration_adds_the_class() -> None:
    name = "_test_only_block"
    try:

        @register_block(name)
        class Probe(nn.Module):
            pass

        assert get_block(name) is Probe
    finally:
        BLOCKS.pop(name, None)


# ------------------------------------------------------------------ geometry and algebra


def test_repvgg_identity_branch_only_where_shapes_allow() -> None:
    rep = BLOCKS["repvgg"]
    assert rep(8, 8).identity_bn is not None
    assert rep(8, 8, identity=False).identity_bn is None
    assert rep(8, 16).identity_bn is None
    assert rep(8, 8, stride=2).identity_bn is None


def test_mobileone_pointwise_has_no_scale_branch() -> None:
    block = BLOCKS["mobileone"](8, 8, 1, num_branches=2)
    assert block.scale is None and len(block.branches) == 2 and block.identity_bn is not None


def test_dbb_depthwise_drops_the_1x1_branch() -> None:
    assert BLOCKS["dbb"](8, 8, groups=8).conv_1x1 is None
    assert BLOCKS["dbb"](8, 8, groups=2).conv_1x1 is not None


@pytest.mark.parametrize(
    ("name", "args", "kwargs"),
    [
        ("repvgg", (4, 4, 2), {}),
        ("acnet", (4, 4, 4), {}),
        ("mobileone", (4, 4), {"num_branches": 0}),
        ("ssf", (4, 4), {"position": "middle"}),
        ("ssf_linear", (4, 4), {"position": "middle"}),
        ("weightnorm", (4, 4), {"norm": "batch"}),
    ],
)
def test_invalid_options_raise_config_error(name: str, args: tuple, kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        BLOCKS[name](*args, **kwargs)


def test_repmlp_rejects_other_input_sizes() -> None:
    with pytest.raises(ConfigError, match=r"\(N, 4, 5, 6\)"):
        BLOCKS["repmlp"](4, 5, 6)(torch.randn(1, 4, 6, 6))


def test_bn_and_pad_equals_bn_of_zero_padded_input_in_eval() -> None:
    layer = randomize_(BNAndPad(3, 2), seed=0).double().eval()
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer.bn(F.pad(x, [2] * 4)), rtol=0, atol=1e-14)


def test_bn_and_pad_border_is_the_batch_statistics_zero_response_in_train() -> None:
    layer = randomize_(BNAndPad(3, 1), seed=0).double().train()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
    c = layer.bn.bias - mean * layer.bn.weight / torch.sqrt(var + layer.bn.eps)
    y = layer(x)
    torch.testing.assert_close(y[:, :, 0, 0], c.expand(4, 3), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        y[:, :, 1:-1, 1:-1],
        F.batch_norm(
            x, None, None, layer.bn.weight, layer.bn.bias, training=True, eps=layer.bn.eps
        ),
        rtol=0,
        atol=1e-12,
    )


def _kernel(cls: type, raw: torch.Tensor) -> torch.Tensor:
    layer = cls(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(raw.reshape(layer.weight.shape))
    return layer.effective_weight()[0, 0].detach()


def test_difference_conv_kernels() -> None:
    w = torch.arange(1.0, 10.0).reshape(3, 3)
    cd = w.clone()
    cd[1, 1] = w[1, 1] - w.sum()
    torch.testing.assert_close(_kernel(CentralDifferenceConv2d, w), cd)
    # every outer tap moves one step clockwise around the centre, then is subtracted
    rotated = torch.tensor([[4.0, 1.0, 2.0], [7.0, 5.0, 3.0], [8.0, 9.0, 6.0]])
    torch.testing.assert_close(_kernel(AngularDifferenceConv2d, w), w - rotated)
    v = torch.tensor([1.0, 2.0, 3.0])
    hd = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [3.0, 0.0, -3.0]])
    torch.testing.assert_close(_kernel(HorizontalDifferenceConv2d, v), hd)
    torch.testing.assert_close(_kernel(VerticalDifferenceConv2d, v), hd.T)


@pytest.mark.parametrize(
    "cls",
    [
        CentralDifferenceConv2d,
        AngularDifferenceConv2d,
        HorizontalDifferenceConv2d,
        VerticalDifferenceConv2d,
    ],
)
def test_difference_convs_ignore_a_constant_image(cls: type) -> None:
    layer = cls(3, 4).double()
    y = layer(torch.full((1, 3, 6, 6), 2.5, dtype=torch.float64))
    torch.testing.assert_close(y[0, :, 1:-1, 1:-1], layer.bias.view(4, 1, 1).expand(4, 4, 4))


# ------------------------------------------------------------------ nets


def test_repvgg_a0_size_and_output() -> None:
    model = repvgg_a0().eval()
    n_params = sum(p.numel() for p in model.parameters())
    assert 7.5e6 <= n_params <= 9.5e6
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
        assert model(torch.randn(1, 3, 33, 32)).shape == (1, 1000)


def test_repvgg_net_rejects_mismatched_stages() -> None:
    with pytest.raises(ConfigError, match="one width, depth and stride per stage"):
        RepVGGNet((8, 16), (1,))


def test_small_nets_run() -> None:
    demo = demo_net()
    assert 50_000 <= sum(p.numel() for p in demo.parameters()) <= 200_000
    assert demo.eval()(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    mobile = mobileone_net(num_classes=5).eval()
    assert mobile(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_randomize_sets_bn_stats_deterministically() -> None:
    a = demo_net()
    torch.manual_seed(123)  # different initial weights: randomize_ must not depend on them
    b = demo_net()
    rng_state = torch.get_rng_state()
    randomize_(a, seed=7)
    randomize_(b, seed=7)
    assert torch.equal(torch.get_rng_state(), rng_state), "randomize_ used the global RNG"
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)

    bns = [m for m in a.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    for bn in bns:
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        assert (bn.running_var > 0).all()
        assert not torch.allclose(bn.weight, torch.ones_like(bn.weight))
        assert not torch.allclose(bn.bias, torch.zeros_like(bn.bias))

    sc = randomize_(demo_net(), seed=8).state_dict()
    assert not torch.equal(sc["0.conv_kxk.bn.running_mean"], sa["0.conv_kxk.bn.running_mean"])
    assert not torch.equal(sc["0.conv_kxk.conv.weight"], sa["0.conv_kxk.conv.weight"])


def test_randomize_changes_scale_shift_parameters() -> None:
    block = randomize_(BLOCKS["ssf"](4, 4), seed=0)
    assert not torch.allclose(block.gamma, torch.ones(4), atol=0.1)
    assert not torch.allclose(block.beta, torch.zeros(4), atol=0.1)


# ------------------------------------------------------------------ data and training


def test_load_digits_tensors_shapes_and_dtypes() -> None:
    x_train, y_train, x_test, y_test = load_digits_tensors(32, seed=0)
    assert x_train.shape == (1347, 1, 32, 32) and x_test.shape == (450, 1, 32, 32)
    assert x_train.dtype == x_test.dtype == torch.float32
    assert y_train.dtype == y_test.dtype == torch.int64
    assert y_train.shape == (1347,) and set(y_test.tolist()) == set(range(10))
    assert abs(x_train.mean().item()) < 1e-4 and abs(x_train.std().item() - 1) < 1e-4
    again = load_digits_tensors(32, seed=0)
    assert torch.equal(again[0], x_train) and torch.equal(again[3], y_test)


def test_load_digits_rejects_bad_fraction() -> None:
    with pytest.raises(ConfigError, match="test_fraction"):
        load_digits_tensors(8, test_fraction=1.5)


def test_demo_net_learns_digits() -> None:
    # 16x16 inputs and 30 steps keep this around a CPU-second; demo_net takes any size >= 8
    x_train, y_train, x_test, y_test = load_digits_tensors(16, seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = demo_net()
    trained = train_classifier(model, x_train, y_train, epochs=3, lr=5e-3, batch_size=128, seed=0)
    assert trained is model and not model.training
    assert accuracy(model, x_test, y_test) > 0.8
