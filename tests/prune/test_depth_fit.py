"""Depth maps fitted from statistics accumulated per calibration batch.

Checked against a direct least-squares solve on the whole calibration set captured
at once (what depth pruning did before), and for memory that does not grow with the
number of calibration batches.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import fx

from edgerep.prune import _calib
from edgerep.prune._depth import depth_prune, find_blocks, replace_blocks, to_graph
from tests.prune._calls import macs
from tests.prune._memory import LiveTensorBytes
from tests.prune._nets import mixer, resnet_like


def _data(seed: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 12, 12, generator=g, dtype=torch.float64) * 1.7 + 0.4


class _All(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n.name] = out
        return out


def _full_capture(gm: fx.GraphModule, x: torch.Tensor) -> dict[str, Any]:
    rec = _All(gm)
    with torch.no_grad():
        rec.run(x)
    return rec.values


def _rows(t: torch.Tensor, kind: str) -> torch.Tensor:
    return (
        t.reshape(-1, t.shape[-1]) if kind == "linear" else t.movedim(1, -1).reshape(-1, t.shape[1])
    )


def _shortcut(gm: fx.GraphModule, b) -> tuple[torch.Tensor, torch.Tensor]:
    """(W₀, b₀) of the block's shortcut: the identity, or its 1x1 conv's own weights."""
    if not b.shortcut:
        return torch.eye(b.channels, dtype=torch.float64), torch.zeros(b.channels).double()
    (name,) = b.shortcut  # the test nets' projections are one conv
    conv = gm.get_submodule(name)
    return conv.weight.detach().double().reshape(b.cout, b.channels), conv.bias.detach().double()


def _direct(x: torch.Tensor, y: torch.Tensor, b, gm: fx.GraphModule, ridge: float):
    """min ||X Wᵀ + b - Y||² + λ||W - W₀||² as one augmented lstsq on all rows.

    Returns (W, b, rel error, rel error of the shortcut alone).
    """
    if b.stride:
        x = x[:, :, :: b.stride[0], :: b.stride[1]]
    xr, yr = _rows(x, b.map_kind), _rows(y, b.map_kind)
    n, c = xr.shape
    w0, b0 = _shortcut(gm, b)
    lam = ridge * float((xr**2).sum()) / c
    a = torch.cat([xr, torch.ones(n, 1, dtype=torch.float64)], 1)
    eye = torch.eye(c, dtype=torch.float64)
    a_aug = torch.cat([a, torch.cat([lam**0.5 * eye, torch.zeros(c, 1, dtype=torch.float64)], 1)])
    y_aug = torch.cat([yr, lam**0.5 * w0.T])
    sol = torch.linalg.lstsq(a_aug, y_aug, driver="gelsd").solution
    err = float((a @ sol - yr).norm() / yr.norm())
    removal = float((xr @ w0.T + b0 - yr).norm() / yr.norm())
    return sol[:c].T, sol[c], err, removal


@pytest.mark.parametrize("make", [resnet_like, mixer])
def test_batched_statistics_give_the_full_capture_solution(make, monkeypatch) -> None:
    monkeypatch.setattr(_calib, "CALIB_BATCH", 16)  # 72 samples: 4 full batches and one of 8
    model = make(2).double()
    calib = _data(3, 72)
    ridge = 1e-3
    fitted, chosen, rows = depth_prune(
        model, [calib[:1]], [calib], macs, max_blocks=2, max_error=10.0, ridge=ridge
    )
    gm = to_graph(copy.deepcopy(model))
    blocks = find_blocks(gm, [calib[:1]])
    values = _full_capture(gm, calib)
    ref = {b.output: _direct(values[b.input], values[b.output], b, gm, ridge) for b in blocks}
    assert any(b.shortcut for b in blocks) == (make is resnet_like)
    for r in rows:
        assert r.rel_error == pytest.approx(ref[r.block][2], rel=1e-9)
        assert r.removal_error == pytest.approx(ref[r.block][3], rel=1e-12)
    # the choice: the two best by saving per error (no overlaps among these blocks)
    best = sorted(rows, key=lambda r: -r.saved_ms / r.rel_error)[:2]
    assert {b.output for b in chosen} == {r.block for r in best}
    # sequential fit: each map on the inputs of the model with the earlier maps fitted
    work = replace_blocks(gm, chosen).double()
    for b in chosen:
        node = next(n for n in work.graph.nodes if n.target == b.module_name)
        x = _full_capture(work, calib)[node.args[0].name]  # the map's input, earlier maps fitted
        w, bias, _, _ = _direct(x, values[b.output], b, gm, ridge)
        m = work.get_submodule(b.module_name)
        with torch.no_grad():
            m.weight.copy_(w.reshape(m.weight.shape))
            m.bias.copy_(bias)
        got = fitted.get_submodule(b.module_name).requires_grad_(False)
        scale = float(w.abs().max())
        assert float((got.weight.reshape(w.shape) - w).abs().max()) <= 1e-9 * scale
        assert float((got.bias - bias).abs().max()) <= 1e-9 * max(float(bias.abs().max()), 1.0)
    with torch.no_grad():
        out, expected = fitted(calib), work(calib)
    assert float((out - expected).norm() / expected.norm()) < 1e-10


def _full_capture_fit(model, calib: torch.Tensor) -> None:
    """What depth pruning did before: every block's input and output on all of `calib`."""
    gm = to_graph(copy.deepcopy(model).double())
    blocks = find_blocks(gm, [calib[:1].double()])
    values = _full_capture(gm, calib.double())
    for b in blocks:
        _direct(values[b.input], values[b.output], b, gm, 1e-4)


def test_peak_memory_does_not_grow_with_the_number_of_calibration_batches(monkeypatch) -> None:
    monkeypatch.setattr(_calib, "CALIB_BATCH", 8)
    model = resnet_like(0)  # float32, as a folded model comes
    peaks: dict[str, list[int]] = {"batched": [], "full capture": []}
    for n in (16, 96):  # 2 and 12 batches
        calib = _data(1, n).float()
        with LiveTensorBytes(calib) as live:
            depth_prune(model, [calib[:1]], [calib], macs, max_error=10.0)
        peaks["batched"].append(live.peak)
        with LiveTensorBytes(calib) as live:
            _full_capture_fit(model, calib)
        peaks["full capture"].append(live.peak)
    small, big = peaks["full capture"]
    assert big > 3 * small  # the tracker sees activations held for the whole set
    small, big = peaks["batched"]
    # six times the batches, the same peak (models, one batch, the Gram matrices)
    assert big <= 1.02 * small, peaks
