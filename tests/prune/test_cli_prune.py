"""`edgerep prune`: one call from a factory file to a bundle with plan and plain state_dict."""

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

    EDGEREP_INPUTS = ["x:1x3x12x12"]

    def build():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
        ).eval()
    """
)


def _files(tmp_path):
    src = tmp_path / "net.py"
    src.write_text(MODEL)
    data = tmp_path / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(
        data, x=rng.standard_normal((64, 3, 12, 12)).astype(np.float32), y=rng.integers(0, 10, 64)
    )
    return f"{src}:build", str(data)


def test_prune_writes_bundle_plan_and_state_dict_and_replays_the_plan(tmp_path, capsys) -> None:
    src, data = _files(tmp_path)
    out = tmp_path / "out"
    code = main(["prune", src, "--target", "macs=0.5", "--calib", data, "-o", str(out)])
    assert code == EXIT_OK, capsys.readouterr().err
    assert (out / "manifest.json").is_file() and (out / "onnx" / "model.onnx").is_file()
    plan = json.loads((out / "prune_plan.json").read_text())
    assert plan["version"] == 1 and plan["recovery"] == "ls" and plan["groups"]
    report = json.loads((out / "prune_report.json").read_text())
    assert report["status"] == "met" and report["achieved"] <= 0.5
    state = torch.load(out / "pruned_state_dict.pt", weights_only=True)
    again = tmp_path / "again"
    code = main(
        ["prune", src, "--plan", str(out / "prune_plan.json"), "--calib", data, "-o", str(again)]
    )
    assert code == EXIT_OK, capsys.readouterr().err
    state2 = torch.load(again / "pruned_state_dict.pt", weights_only=True)
    assert state.keys() == state2.keys()
    assert all(torch.equal(state[k], state2[k]) for k in state)


def test_prune_usage_errors(tmp_path, capsys) -> None:
    src, data = _files(tmp_path)
    out = str(tmp_path / "o")
    cases = [
        (["--target", "latency=1.5"], "impossible"),
        (["--target", "latency=0.5", "--backend", "tensorrt"], "unknown pruning backend"),
        (["--target", "macs=0.5", "--recovery", "ls"], "need --calib"),
        ([], "give --target"),
        (["--target", "macs=0.01", "--calib", data], "impossible for this model"),
    ]
    for extra, message in cases:
        code = main(["prune", src, "-o", out, *extra])
        err = capsys.readouterr().err
        assert code == EXIT_USAGE, (extra, err)
        assert message in err, (extra, err)
