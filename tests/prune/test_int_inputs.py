"""Integer (token id) inputs through every pruning method: they are never cast to float."""

from __future__ import annotations

import pytest
import torch

from edgerep.bench.latency import LatencyConfig
from edgerep.prune import apply_plan, prune
from edgerep.prune._engine import measure_pair
from tests.prune._calls import prune_on
from tests.prune._nets import token_ids, token_net


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_channels_with_recovery_on_token_ids() -> None:
    model = token_net(0).double()
    calib, held_out = token_ids(1, 96), token_ids(2, 64)
    assert calib.dtype == torch.int64
    kw = dict(target="macs=0.6", calib=calib, measure=False, importance="reconstruction")
    pruned, report = prune(model, calib[:1], **kw)
    plain, _ = prune(model, calib[:1], recovery="none", **kw)
    assert report.achieved <= 0.6 + 1e-9 and report.plan.kept
    assert any(r.kept for r in report.recovery)  # the consumers were re-solved on the ids
    with torch.no_grad():
        ref = model(held_out)
        assert _rel(pruned(held_out), ref) < _rel(plain(held_out), ref)
    redone = apply_plan(model, calib[:1], report.plan, calib=calib)
    a, b = pruned.state_dict(), redone.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rank_on_token_ids() -> None:
    model = token_net(0).double()
    calib = token_ids(3, 64)
    pruned, report = prune_on(model, calib, "rank", rank_error=0.4)
    kept = {r.layer: r for r in report.rank if r.rank is not None}
    assert kept  # activation-weighted errors were computed on the embedded ids
    name, row = next(iter(kept.items()))
    # the reported error is the layer's output error on the calibration ids
    acts = {}
    layer = model.get_submodule(name)
    h = layer.register_forward_pre_hook(lambda m, a: acts.setdefault("x", a[0]))
    with torch.no_grad():
        model(calib)
    h.remove()
    with torch.no_grad():
        err = _rel(pruned.get_submodule(name)(acts["x"]), layer(acts["x"]))
    assert err == pytest.approx(row.rel_error, rel=1e-6)


def test_depth_on_token_ids_replaces_the_affine_block_exactly() -> None:
    model = token_net(0, linear_last=True).double()
    calib, held_out = token_ids(4, 80), token_ids(5, 32)
    pruned, report = prune_on(model, calib, "depth", ridge=0.0, depth_blocks=1)
    replaced = [d for d in report.depth if d.replaced]
    assert len(report.depth) == 2 and len(replaced) == 1
    assert (
        replaced[0].layers == ("blocks.1.fc1", "blocks.1.fc2") and replaced[0].map_kind == "linear"
    )
    with torch.no_grad():
        assert _rel(pruned(held_out), model(held_out)) < 1e-10


@pytest.mark.parametrize("backend", ["onnxruntime", "executorch"])
def test_token_ids_export_and_time_as_integers(backend) -> None:
    pytest.importorskip(backend)
    model = token_net(0)
    ids = token_ids(6, 1)
    tiny = LatencyConfig(min_seconds=0.01, repeats=2, warmup_seconds=0.0)
    p0, p1 = measure_pair(backend, model, model, [ids], config=tiny)
    assert p0 > 0 and p1 > 0
