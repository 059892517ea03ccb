"""Groups come from Torch-Pruning; coupled layers stay consistent, run, and export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgerep.errors import ConfigError
from edgerep.prune import prune
from edgerep.prune._groups import build_groups
from tests.prune._nets import chain, coupled


def test_interface_groups_are_never_prunable() -> None:
    _, groups = build_groups(chain(), (torch.randn(1, 3, 8, 8),))
    reasons = {g.name: g.reason for g in groups}
    assert reasons["0"].startswith("first layer")
    assert reasons["8"].startswith("model output")
    assert reasons["2"] == reasons["4"] == ""


def test_keep_excludes_a_group_and_unknown_keep_is_refused() -> None:
    _, groups = build_groups(chain(), (torch.randn(1, 3, 8, 8),), keep=["2"])
    assert {g.name: g.prunable for g in groups}["2"] is False
    with pytest.raises(ConfigError, match="names no module"):
        build_groups(chain(), (torch.randn(1, 3, 8, 8),), keep=["nope"])


def test_coupled_groups_span_add_concat_and_depthwise() -> None:
    _, groups = build_groups(coupled(), (torch.randn(1, 3, 8, 8),))
    by_root = {g.name: g for g in groups}
    # the residual sum a + b(a), concatenated with c, read by the depthwise conv
    joint = next(g for g in groups if {"a", "b", "c", "dw"} <= {m.name for m in g.members})
    assert joint.size == 32 and joint.prunable
    assert {("a", "out"), ("b", "out"), ("b", "in"), ("c", "out"), ("dw", "out"), ("pw", "in")} <= {
        (m.name, m.dim) for m in joint.members
    }
    # a grouped (not depthwise) conv is kept whole: slicing it would break its groups
    assert not by_root["g"].prunable and "grouped conv" in by_root["g"].reason


def test_pruned_coupled_net_runs_and_matches_through_onnxruntime(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    model = coupled()
    x = torch.randn(4, 3, 10, 10)
    pruned, report = prune(model, x[:1], target="macs=0.6", recovery="none")
    widths = {g.name: (g.size, g.width) for g in report.groups}
    assert any(w < s for s, w in widths.values())
    assert pruned.dw.groups == pruned.dw.in_channels == pruned.dw.out_channels
    assert pruned.b.in_channels == pruned.b.out_channels == pruned.a.out_channels
    assert pruned.dw.in_channels == pruned.b.out_channels + pruned.c.out_channels
    assert pruned.g.groups == 4 and pruned.g.in_channels % 4 == 0
    with torch.no_grad():
        ref = pruned(x).numpy()
    path = tmp_path / "m.onnx"
    torch.onnx.export(
        pruned, (x,), str(path), dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "n"}}
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert model.a.out_channels == 24  # the input model is untouched
