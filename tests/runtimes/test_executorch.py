"""The ExecuTorch runtime: sessions over .pte programs, names from the sidecar, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgerep.errors import ConfigError, UnsupportedError
from edgerep.exporters import get_exporter
from edgerep.runtimes import get_runtime
from edgerep.spec import parse_input_spec


class TwoOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, a, b):
        y = self.fc(a)
        return y, y * b


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    torch.manual_seed(0)
    model = TwoOut().eval()
    specs = [parse_input_spec("a:N[1..2..4]x6"), parse_input_spec("b:1")]
    out = tmp_path_factory.mktemp("et")
    art = get_exporter("executorch").export(model, (torch.randn(2, 6), torch.ones(1)), specs, out)
    return model, art.path


def test_session(program):
    model, path = program
    rt = get_runtime("executorch")
    assert rt.is_available() and rt.devices() == ["cpu"] and rt.unavailable_reason() == ""
    assert "XnnpackBackend" in rt.capabilities("cpu")["backends"]
    with rt.load(path) as s:
        assert s.input_names == ["a", "b"] and s.output_names == ["output_0", "output_1"]
        assert s.describe()["backends"] == ["XnnpackBackend"]
        a = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)
        b = np.array([2.0], np.float32)
        y, z = s.run({"a": a, "b": b})
        with torch.no_grad():
            ref_y, ref_z = model(torch.from_numpy(a), torch.from_numpy(b))
        np.testing.assert_allclose(y, ref_y.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(z, ref_z.numpy(), rtol=1e-5, atol=1e-6)
        with pytest.raises(ConfigError, match="missing 'b'"):
            s.run({"a": a})
        with pytest.raises(UnsupportedError, match=r"a: \(9, 6\).*within the ranges"):
            s.run({"a": np.zeros((9, 6), np.float32), "b": b})
    with pytest.raises(ConfigError, match="closed"):
        s.run({"a": a, "b": b})


def test_names_without_sidecar_and_errors(program, tmp_path):
    _, path = program
    bare = tmp_path / "bare.pte"
    bare.write_bytes(path.read_bytes())
    rt = get_runtime("executorch")
    with rt.load(bare) as s:
        assert s.input_names == ["input_0", "input_1"]
    with pytest.raises(ConfigError, match="no options"):
        rt.load(path, options={"threads": 2})
    with pytest.raises(UnsupportedError, match="cpu only"):
        rt.load(path, device="cuda")
    with pytest.raises(ConfigError, match="does not exist"):
        rt.load(tmp_path / "missing.pte")
    (tmp_path / "junk.pte").write_bytes(b"not a program")
    with pytest.raises(UnsupportedError, match="cannot load"):
        rt.load(tmp_path / "junk.pte")
