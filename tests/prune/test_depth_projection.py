"""Depth pruning of projection-shortcut blocks ``P(x) + f(x)``: one fitted (strided) 1x1 conv."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgerep.fold import fold
from edgerep.prune import PrunePlan, apply_plan, load_pruned, save_pruned
from edgerep.prune._depth import find_blocks, to_graph
from tests.prune._calls import prune_on
from tests.prune._nets import paper_resnet


def _data(seed: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 12, 12, generator=g, dtype=torch.float64) * 1.3 + 0.2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_projection_blocks_are_found_with_and_without_folding() -> None:
    x = _data(0, 1).float()
    net = paper_resnet(0)
    blocks = find_blocks(to_graph(net), [x])
    proj = [b for b in blocks if b.shortcut]
    assert [b.shortcut for b in proj] == [
        ("layer2.0.shortcut.0", "layer2.0.shortcut.1"),  # conv1x1 then its BatchNorm
        ("layer3.0.shortcut.0", "layer3.0.shortcut.1"),
    ]
    assert [(b.channels, b.cout, b.stride) for b in proj] == [(8, 16, (2, 2)), (16, 32, (2, 2))]
    assert len(blocks) == 4  # and the two identity blocks
    folded, _ = fold(net, (x,))  # the BNs go into the convs: the shortcut is one conv
    fb = find_blocks(to_graph(folded), [x])
    assert [len(b.shortcut) for b in fb if b.shortcut] == [1, 1] and len(fb) == 4
    assert [(b.channels, b.cout, b.stride) for b in fb if b.shortcut] == [
        (8, 16, (2, 2)),
        (16, 32, (2, 2)),
    ]


def test_an_affine_downsampling_block_is_replaced_by_one_exact_strided_1x1_conv() -> None:
    # unfolded, with its BatchNorms (edgerep.fold would merge this whole block into one
    # conv itself); the next block's input has dead ReLU channels, solved at minimum norm
    net = paper_resnet(1, affine_down=True).double()
    calib, held_out = _data(2, 64), _data(3, 16)
    pruned, report = prune_on(net, calib, "depth", ridge=0.0, depth_blocks=1)
    (row,) = [d for d in report.depth if d.replaced]
    assert row.rel_error < 1e-9 and row.removal_error > 0.05  # P(x) alone is far off
    assert len(row.layers) == 3  # conv1, conv2 and the projection, all gone
    (entry,) = report.plan.depth
    assert entry["stride"] == [2, 2] and (entry["channels"], entry["out_channels"]) == (8, 16)
    maps = [m for n, m in pruned.named_modules() if n.startswith("depth_")]
    assert len(maps) == 1 and maps[0].stride == (2, 2) and maps[0].kernel_size == (1, 1)
    assert not any(n in dict(pruned.named_modules()) for n in row.layers)
    with torch.no_grad():
        assert _rel(pruned(held_out), net(held_out)) < 1e-10


def test_projection_maps_beat_the_shortcut_alone_replay_and_export(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    x = _data(4, 96).float()
    net, _ = fold(paper_resnet(5), (x[:1],))
    pruned, report = prune_on(net, x, "depth", depth_error=10.0)
    proj = [d for d in report.depth if d.replaced and len(d.layers) == 3]
    assert len(proj) == 2  # both downsampling blocks replaced
    assert all(d.rel_error <= d.removal_error for d in report.depth)
    plan = PrunePlan.load(report.plan.save(tmp_path / "plan.json"))
    redone = apply_plan(net, x[:1], plan, calib=x)
    a, b = pruned.state_dict(), redone.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    save_pruned(pruned, plan, tmp_path / "out")
    loaded = load_pruned(net, x[:1], tmp_path / "out")
    assert all(torch.equal(loaded.state_dict()[k], a[k]) for k in a)
    path = tmp_path / "m.onnx"
    with torch.no_grad():
        ref = pruned(x).numpy()
        torch.onnx.export(
            nn.Sequential(pruned),
            (x[:1],),
            str(path),
            dynamo=False,
            input_names=["x"],
            dynamic_axes={"x": {0: "n"}},
        )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
