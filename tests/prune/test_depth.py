"""Depth pruning: residual blocks found on the traced graph, replaced by fitted linear maps."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from edgerep.errors import ConfigError
from edgerep.prune import PrunePlan, apply_plan, load_pruned, prune, save_pruned
from edgerep.prune._depth import find_blocks, replace_blocks, to_graph
from tests.prune._calls import macs, prune_on
from tests.prune._nets import chain, mixer, resnet_like


def _calib(seed: int, n: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(1, 3, 1, 1, generator=g, dtype=torch.float64) * 2 + 0.5
    shift = torch.randn(1, 3, 1, 1, generator=g, dtype=torch.float64)
    return torch.randn(n, 3, 12, 12, generator=g, dtype=torch.float64) * scale + shift


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_identity_and_projection_residual_blocks_are_found() -> None:
    gm = to_graph(resnet_like())
    blocks = {b.output: b for b in find_blocks(gm, [torch.randn(1, 3, 12, 12)])}
    layers = {b.layers for b in blocks.values()}
    assert layers == {
        ("block1.conv1", "block1.conv2"),
        ("block2.conv1", "block2.conv2"),
        ("down_f", "down_p"),  # down_p(x) + down_f(x): a projection shortcut
        ("block3.conv1", "block3.conv2"),
    }
    assert {b.map_kind for b in blocks.values()} == {"conv2d"}
    assert sorted(b.channels for b in blocks.values()) == [16, 16, 16, 32]
    (down,) = [b for b in blocks.values() if b.shortcut]
    assert down.shortcut == ("down_p",) and down.stride == (2, 2) and down.cout == 32
    # a pre-norm Mixer: every token- and channel-mixing block, chained output to input
    mix = find_blocks(to_graph(mixer()), [torch.randn(1, 3, 12, 12)])
    assert [b.map_kind for b in mix] == ["linear"] * 4
    assert [b.input for b in mix[1:]] == [b.output for b in mix[:-1]]


@pytest.mark.parametrize("seed", [0, 1])
def test_a_block_whose_branch_is_linear_is_recovered_exactly(seed: int) -> None:
    x = _calib(seed)
    for model in (resnet_like(seed, linear_first=True), mixer(seed, linear_last=True)):
        model = model.double()
        pruned, report = prune_on(model, x, "depth", ridge=0.0, depth_blocks=1)
        exact = [d for d in report.depth if d.rel_error < 1e-9]
        assert len(exact) == 1 and exact[0].removal_error > 0.05
        # the exact block has the best saving per error, so it is the one replaced
        assert [d.block for d in report.depth if d.replaced] == [exact[0].block]
        held_out = _calib(seed + 100, 16)
        with torch.no_grad():
            assert _rel(pruned(held_out), model(held_out)) < 1e-10
        names = dict(pruned.named_modules())
        assert not any(n in names for n in exact[0].layers)  # the block's layers are gone


def test_depth_pruning_beats_plain_block_removal_on_held_out_data() -> None:
    torch.manual_seed(0)
    model = resnet_like(3, c=8).double()
    teacher = resnet_like(4, c=8).double()
    data = _calib(5, 160)
    # a few steps of distillation from another net: trained-ish weights, not random
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for i in range(40):
        xb = data[(i % 5) * 32 : (i % 5 + 1) * 32]
        with torch.no_grad():
            target = teacher(xb).softmax(1)
        loss = torch.nn.functional.cross_entropy(model(xb), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    calib, held_out = data[:96], _calib(6, 64)
    pruned, report = prune_on(model, calib, "depth", depth_blocks=2, depth_error=10.0)
    replaced = [d for d in report.depth if d.replaced]
    assert len(replaced) == 2
    gm = to_graph(copy.deepcopy(model))
    blocks = [b for b in find_blocks(gm, [calib[:1]]) if b.output in {d.block for d in replaced}]
    removed = replace_blocks(gm, blocks)  # identity maps: the blocks simply dropped
    with torch.no_grad():
        ref = model(held_out)
        err_fit, err_removed = _rel(pruned(held_out), ref), _rel(removed(held_out), ref)
    assert err_fit < 0.8 * err_removed
    for d in replaced:
        assert d.rel_error <= d.removal_error


def test_blocks_are_chosen_by_latency_saved_per_error_and_never_when_not_faster() -> None:
    x = _calib(0)
    model = resnet_like(0).double()

    # block1's layers cost nothing here: replacing it saves nothing, so it never goes
    def cost(shapes):
        return [
            0.0 if s.cin == s.cout == 16 and s.kernel == (3, 3) else float(s.macs()) for s in shapes
        ]

    _, report = prune(
        model, x[:1], method="depth", calib=x, layer_cost=cost, measure=False, depth_error=10.0
    )
    rows = {d.layers[0].split(".")[0]: d for d in report.depth}
    assert not rows["block1"].replaced and "not faster" in rows["block1"].reason
    assert not rows["block2"].replaced and rows["block3"].replaced
    _, one = prune_on(model, x, "depth", depth_blocks=1, depth_error=10.0)
    best = max(one.depth, key=lambda d: d.saved_ms / d.rel_error)
    assert [d.block for d in one.depth if d.replaced] == [best.block]
    assert all("max_blocks=1" in d.reason for d in one.depth if not d.replaced)


def test_depth_errors_are_named() -> None:
    x = _calib(0).float()
    model = resnet_like(0)
    with pytest.raises(ConfigError, match="calibration data"):
        prune(model, x[:1], method="depth", layer_cost=macs, measure=False)
    with pytest.raises(ConfigError, match="no residual block"):
        prune_on(chain(), x, "depth")
    with pytest.raises(ConfigError, match="max depth blocks"):
        prune_on(model, x, "depth", depth_blocks=0)
    with pytest.raises(ConfigError, match="prunes no channels"):
        prune(model, x[:1], target="macs=0.5", method="depth", calib=x)
    with pytest.raises(ConfigError, match="needs a target"):
        prune(model, x[:1], method="depth,channels", calib=x)
    with pytest.raises(ConfigError, match=r"unknown pruning method.*did you mean 'depth'"):
        prune(model, x[:1], method="channels,dept", calib=x)

    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.conv(x) if float(x.sum()) > 0 else x

    with pytest.raises(Exception, match=r"torch\.fx-traceable"):
        prune_on(Untraceable(), x, "depth")


def test_depth_channels_rank_plan_is_reapplied_bit_for_bit_and_exports(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    model = resnet_like(0)
    x = _calib(0).float()
    pruned, report = prune_on(
        model,
        x,
        "depth,channels,rank",
        target="macs=0.7",
        depth_blocks=1,
        depth_error=10.0,
        rank_error=0.5,
    )
    plan = report.plan
    assert plan is not None and plan.depth and plan.kept and plan.ranks
    d = plan.to_dict()
    assert d["version"] == 2 and d["depth"] and d["rank"]
    again = PrunePlan.load(plan.save(tmp_path / "plan.json"))
    redone = apply_plan(model, x[:1], again, calib=x)
    a, b = pruned.state_dict(), redone.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="depth maps"):
        apply_plan(model, x[:1], again, calib=x[:8])
    save_pruned(pruned, plan, tmp_path / "out")
    loaded = load_pruned(model, x[:1], tmp_path / "out")
    assert all(torch.equal(loaded.state_dict()[k], a[k]) for k in a)
    # the pruned graph exports and matches through onnxruntime
    path = tmp_path / "m.onnx"
    with torch.no_grad():
        ref = pruned(x).numpy()
        # (a GraphModule's .graph confuses the TorchScript exporter's dynamic-axes check)
        torch.onnx.export(
            nn.Sequential(pruned),
            (x[:1],),
            str(path),
            dynamo=False,
            input_names=["x"],
            dynamic_axes={"x": {0: "n"}},
        )
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()}
    )[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_channel_only_plans_stay_version_1_and_old_plans_read() -> None:
    old = {
        "version": 1,
        "model_sha256": "ab",
        "target": "macs=0.5",
        "recovery": "none",
        "ridge": 1e-4,
        "calib_sha256": None,
        "groups": [{"name": "2", "size": 32, "kept": [0, 3]}],
        "extra": {},
    }
    plan = PrunePlan.from_dict(old)
    assert plan.to_dict() == old and not plan.depth and not plan.ranks
    with pytest.raises(ConfigError, match="unknown keys"):
        PrunePlan.from_dict({**old, "rank": []})  # depth/rank keys need version 2
    with pytest.raises(ConfigError, match="version 3"):
        PrunePlan.from_dict({**old, "version": 3})
    with pytest.raises(ConfigError, match="rank entry"):
        PrunePlan.from_dict({**old, "version": 2, "rank": [{"layer": "x"}]})


def test_a_depth_pruned_model_measured_slower_is_refused_and_a_no_op_is_not_timed(
    monkeypatch,
) -> None:
    from edgerep.prune import _engine

    x = _calib(0).float()
    calls = []

    def slower(*a, **k):
        calls.append(1)
        return 1.0, 1.3

    monkeypatch.setattr(_engine, "measure_pair", slower)
    with pytest.raises(_engine.PruneRefusedError, match=r"1\.300 ms vs 1\.000 ms"):
        prune_on(resnet_like(0), x, "depth", measure=None, depth_blocks=1, depth_error=10.0)
    calls.clear()
    # nothing within the error bound: the model comes back unchanged, nothing is timed
    _, report = prune_on(resnet_like(0), x, "depth", measure=None, depth_error=1e-9)
    assert not calls and report.status == "unchanged" and not report.plan.depth
    assert "unchanged" in report.notes[0]


def test_a_latency_target_counts_from_the_unpruned_model_after_depth(monkeypatch) -> None:
    from edgerep.prune import _engine

    x = _calib(0).float()
    # depth alone measured at 0.4 of the unpruned p50: latency=0.5 needs no channel pruning
    monkeypatch.setattr(_engine, "measure_pair", lambda *a, **k: (1.0, 0.4))
    pruned, report = prune_on(
        resnet_like(0),
        x,
        "depth,channels",
        measure=None,
        target="latency=0.5",
        depth_blocks=1,
        depth_error=10.0,
    )
    assert report.status == "met" and report.achieved == pytest.approx(0.4)
    assert report.plan.depth and not report.plan.kept
    assert any("0.400" in n for n in report.notes)
    assert any("met before any channel was pruned" in n for n in report.notes)
    assert pruned.stem.out_channels == 16


def test_depth_runs_on_the_graph_edgerep_fold_returns() -> None:
    from edgerep.fold import fold

    class BNBlock(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
            self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        BNBlock(8),
        BNBlock(8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):  # randomized statistics
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x = _calib(1).float()
    folded, _ = fold(net.eval(), (x[:1],))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    pruned, report = prune_on(folded, x, "depth", depth_blocks=1, depth_error=10.0)
    assert len(report.depth) == 2 and sum(d.replaced for d in report.depth) == 1
    redone = apply_plan(folded, x[:1], report.plan, calib=x)
    assert all(
        torch.equal(a, b)
        for a, b in zip(pruned.state_dict().values(), redone.state_dict().values())
    )
