"""ExecuTorch export: .pte with the XNNPACK delegate, run here through the runtime bindings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from edgerep.errors import ConfigError
from edgerep.exporters import get_exporter
from edgerep.exporters.executorch import ExecuTorchExporter
from edgerep.fold import fold
from edgerep.runtimes import get_runtime
from edgerep.spec import example_inputs, parse_input_spec
from edgerep.zoo import randomize_

SPECS = [parse_input_spec("x:N[1..1..4]x3x8x8")]  # opt 1: traced at 2 (see the exporter)


class ConvBNHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_round_trip_dynamic_batch(tmp_path):
    model = randomize_(ConvBNHead(), seed=0).eval()
    ex = example_inputs(SPECS, seed=0)
    folded, _ = fold(model, ex)
    exporter = get_exporter("executorch")
    assert exporter.check(folded, ex, SPECS) == []
    art = exporter.export(folded, ex, SPECS, tmp_path)
    assert art.files == ("model.pte", "model.pte.json") and art.precision == "fp32"
    assert art.metadata["backends"] == ["XnnpackBackend"]
    assert art.metadata["delegated_partitions"] >= 1
    assert art.metadata["planned_input_shapes"] == {"x": [4, 3, 8, 8]}
    assert art.tool_versions["executorch"]
    io = json.loads((tmp_path / "model.pte.json").read_text())
    assert [t["name"] for t in io["inputs"]] == ["x"] and io["inputs"][0]["shape"][0] == "N"
    with get_runtime("executorch").load(art.path) as s:
        assert s.input_names == ["x"] and s.output_names == ["output"]
        for batch in (1, 2, 4):  # min, between, max
            x = torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(batch))
            with torch.no_grad():
                ref = model(x).numpy()
            (got,) = s.run({"x": x.numpy()})
            assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_unbounded_symbol_gets_a_bound_and_a_note(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).eval()
    specs = [parse_input_spec("x:Nx12")]
    art = get_exporter("executorch").export(model, (torch.randn(1, 12),), specs, tmp_path)
    assert any("no upper bound" in n and "1..16" in n for n in art.notes)
    assert art.metadata["planned_input_shapes"] == {"x": [16, 12]}


def test_options():
    with pytest.raises(ConfigError, match="choose one of xnnpack, none"):
        ExecuTorchExporter(delegate="coreml")
