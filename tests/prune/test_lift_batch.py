"""A ``.pt2`` exported at a fixed batch size meets calibration batches: refused, named.

Calibration runs in batches of up to `CALIB_BATCH` samples; a program specialised to
its example batch (``x.view(x.shape[0], -1)`` exported at batch 1) used to fail deep
inside the importance code with an internal error (exit 1). It is now refused up
front with a usage error naming the fixes, while the same net exported with a dynamic
batch prunes to the same weights as its Python source.
"""

from __future__ import annotations

import json
import textwrap

import numpy as np
import torch

from edgerep.cli import EXIT_OK, EXIT_USAGE, main

MODEL = textwrap.dedent(
    """
    import torch
    from torch import nn

    EDGEREP_INPUTS = ["x:1x3x8x8"]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 32, 3, padding=1)
            self.conv3 = nn.Conv2d(32, 16, 3, padding=1, stride=2)
            self.fc = nn.Linear(16 * 4 * 4, 10)

        def forward(self, x):
            y = torch.relu(self.conv2(torch.relu(self.conv(x))))
            y = torch.relu(self.conv3(y))
            return self.fc(y.view(y.shape[0], -1))

    def build():
        torch.manual_seed(0)
        return Net().eval()
    """
)


def _files(tmp_path):
    import importlib.util

    src = tmp_path / "net.py"
    src.write_text(MODEL)
    spec = importlib.util.spec_from_file_location("lift_batch_net", src)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    net = mod.build()
    fixed = torch.export.export(net, (torch.randn(1, 3, 8, 8),))
    torch.export.save(fixed, tmp_path / "fixed.pt2")
    batch = torch.export.Dim("batch", min=1, max=64)
    dynamic = torch.export.export(net, (torch.randn(2, 3, 8, 8),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(dynamic, tmp_path / "dynamic.pt2")
    data = tmp_path / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.standard_normal((40, 3, 8, 8)).astype(np.float32))
    return f"{src}:build", str(data)


def _prune(src, data, out, *extra):
    argv = ["prune", src, "--target", "macs=0.6", "--calib", data, "-o", str(out), *extra]
    return main(argv)


def test_fixed_batch_pt2_is_refused_and_dynamic_one_prunes_as_its_source(tmp_path, capsys) -> None:
    src, data = _files(tmp_path)
    # the program exported at batch 1: refused with the fixes named (was: exit 1, einsum)
    capsys.readouterr()
    code = _prune(
        str(tmp_path / "fixed.pt2"), data, tmp_path / "bad", "--importance", "reconstruction"
    )
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err
    assert "only runs at its example batch size (1)" in err
    assert "torch.export.Dim" in err and "edgerep fold" in err and "file.py:factory" in err
    assert "internal error" not in err
    # without calibration data nothing runs a batch: the same file still prunes
    argv = ["prune", str(tmp_path / "fixed.pt2"), "--target", "macs=0.6", "--recovery", "none"]
    code = main([*argv, "-o", str(tmp_path / "nocalib")])
    assert code == EXIT_OK, capsys.readouterr().err
    # the same net with a dynamic batch: prunes, to the weights its Python source gives
    states = {}
    for name, source in (("pt2", str(tmp_path / "dynamic.pt2")), ("py", src)):
        out = tmp_path / name
        code = _prune(source, data, out, "--importance", "reconstruction")
        assert code == EXIT_OK, capsys.readouterr().err
        report = json.loads((out / "prune_report.json").read_text())
        assert report["status"] == "met" and report["achieved"] <= 0.6
        states[name] = torch.load(out / "pruned_state_dict.pt", weights_only=True)
    # layer names differ (lifted ``conv`` vs the source's ``conv``/folded names): by order
    pt2, py = list(states["pt2"].values()), list(states["py"].values())
    assert [t.shape for t in pt2] == [t.shape for t in py]
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(pt2, py))


def test_python_api_refuses_a_fixed_batch_program_with_calib(tmp_path) -> None:
    """`edgerep.prune` on ``torch.export.load(...).module()``: the same check, before
    any calibration batch; the lift itself (no calib) keeps working at the example."""
    import pytest

    from edgerep.errors import ConfigError
    from edgerep.prune import prune
    from edgerep.prune._lift import plain_module

    _files(tmp_path)
    example = (torch.randn(1, 3, 8, 8),)
    fixed = torch.export.load(tmp_path / "fixed.pt2").module()
    lifted = plain_module(fixed, example)
    assert torch.equal(lifted(*example), fixed(*example))
    with pytest.raises(ConfigError, match=r"only runs at its example batch size \(1\)"):
        plain_module(fixed, example, batched=True)
    calib = torch.randn(40, 3, 8, 8)
    with pytest.raises(ConfigError, match=r"torch\.export\.Dim"):
        prune(fixed, example, target="macs=0.6", importance="reconstruction", calib=calib)
    dynamic = torch.export.load(tmp_path / "dynamic.pt2").module()
    lifted = plain_module(dynamic, example, batched=True)
    assert torch.allclose(lifted(calib), dynamic(calib), rtol=1e-5, atol=1e-6)
