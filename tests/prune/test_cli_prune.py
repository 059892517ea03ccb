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


RESNET = textwrap.dedent(
    """
    import torch
    from torch import nn

    EDGEREP_INPUTS = ["x:1x3x12x12"]

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1 = nn.Conv2d(c, c, 3, padding=1)
            self.conv2 = nn.Conv2d(c, c, 3, padding=1)

        def forward(self, x):
            return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.b1, self.b2 = Block(16), Block(16)
            self.mix = nn.Conv2d(16, 32, 1)
            self.head = nn.Linear(32, 10)

        def forward(self, x):
            x = self.b2(self.b1(torch.relu(self.stem(x))))
            return self.head(torch.relu(self.mix(x)).mean((2, 3)))

    def build():
        torch.manual_seed(0)
        return Net().eval()
    """
)


def test_depth_and_rank_plan_made_in_python_replays_through_the_cli(tmp_path, capsys) -> None:
    import argparse

    from edgerep.cli import _parse_specs
    from edgerep.prune import prune
    from edgerep.prune._cli import _load_data
    from edgerep.prune._stage import _batched
    from edgerep.source import load_model

    src = tmp_path / "resnet.py"
    src.write_text(RESNET)
    _, data = _files(tmp_path)
    args = argparse.Namespace(
        calib=data,
        calib_samples=256,
        calib_seed=0,
        x_key="x",
        y_key="y",
        image_size=None,
        channels=3,
        mean=[0.0],
        std=[1.0],
    )
    # the calibration batch exactly as the CLI draws it (the plan checks its hash)
    calib, _ = _batched(_load_data(args, _parse_specs(["x:1x3x12x12"])), ["x"])
    model, _ = load_model(f"{src}:build")
    pruned, report = prune(
        model,
        calib[0][:1],
        method="depth,rank",
        calib=calib,
        depth_blocks=1,
        depth_error=10.0,
        rank_error=0.5,
        layer_cost=lambda ss: [float(s.macs()) for s in ss],
        measure=False,
    )
    assert report.plan.depth and report.plan.ranks
    plan = report.plan.save(tmp_path / "plan.json")
    out = tmp_path / "out"
    code = main(
        ["prune", f"{src}:build", "--no-fold", "--plan", str(plan), "--calib", data, "-o", str(out)]
    )
    assert code == EXIT_OK, capsys.readouterr().err
    assert "1 blocks, 1 factorized layers" in capsys.readouterr().out
    state = torch.load(out / "pruned_state_dict.pt", weights_only=True)
    ref = pruned.state_dict()
    assert list(state) == list(ref) and all(torch.equal(state[k], ref[k]) for k in ref)
    # the bundle was exported and verified like any other
    manifest = json.loads((out / "manifest.json").read_text())
    assert (out / "onnx" / "model.onnx").is_file() and manifest
    # without calibration data the depth maps cannot be re-solved: a named usage error
    code = main(
        ["prune", f"{src}:build", "--no-fold", "--plan", str(plan), "-o", str(out), "--force"]
    )
    assert code == EXIT_USAGE and "same calibration data" in capsys.readouterr().err


def test_method_usage_errors(tmp_path, capsys) -> None:
    src, data = _files(tmp_path)
    out = str(tmp_path / "o")
    cases = [
        (["--method", "depth"], "depth pruning (fits each replaced block): need --calib"),
        (["--method", "depth", "--target", "macs=0.5", "--calib", data], "prunes no channels"),
        (["--method", "channels,widths"], "unknown pruning method"),
        (["--method", "depth", "--calib", data], "no residual block"),
    ]
    for extra, message in cases:
        code = main(["prune", src, "-o", out, *extra])
        err = capsys.readouterr().err
        assert code == EXIT_USAGE, (extra, err)
        assert message in err, (extra, err)


def test_prune_takes_the_folds_pt2_and_its_bundle(tmp_path, capsys) -> None:
    """``edgerep fold`` -> ``prune f1/model.pt2`` (and ``prune f1``): the program's
    functional convs are lifted into layers Torch-Pruning groups; same plan either way."""
    src, data = _files(tmp_path)
    folded = tmp_path / "f1"
    assert main(["fold", src, "-o", str(folded)]) == EXIT_OK, capsys.readouterr().err
    runs = {}
    for name, source in (("pt2", folded / "model.pt2"), ("bundle", folded)):
        out = tmp_path / name
        argv = ["prune", str(source), "--target", "macs=0.5", "--calib", data, "-o", str(out)]
        code = main(argv)
        assert code == EXIT_OK, capsys.readouterr().err
        report = json.loads((out / "prune_report.json").read_text())
        assert report["status"] == "met" and report["achieved"] <= 0.5
        assert report["p50_before_ms"] > 0 and report["p50_after_ms"] > 0  # timed too
        runs[name] = torch.load(out / "pruned_state_dict.pt", weights_only=True)
    assert runs["pt2"].keys() == runs["bundle"].keys()
    assert all(torch.equal(runs["pt2"][k], runs["bundle"][k]) for k in runs["pt2"])
    # the plan replays on the .pt2 bit for bit
    again = tmp_path / "again"
    plan = str(tmp_path / "pt2" / "prune_plan.json")
    argv = ["prune", str(folded / "model.pt2"), "--plan", plan, "--calib", data, "-o", str(again)]
    assert main(argv) == EXIT_OK, capsys.readouterr().err
    state = torch.load(again / "pruned_state_dict.pt", weights_only=True)
    assert all(torch.equal(state[k], runs["pt2"][k]) for k in state)
    # a bundle without a torch program (the pruned bundle: ONNX only) is refused, named
    capsys.readouterr()
    code = main(["prune", str(tmp_path / "pt2"), "--target", "macs=0.5", "-o", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and "keeps no torch model to prune (its artifacts: onnx)" in err


def test_a_missed_target_exits_7_and_still_writes_the_bundle(
    tmp_path, capsys, monkeypatch, torchscript_onnx
) -> None:
    """A latency target the model cannot reach: exit code 7 (EXIT_TARGET_MISSED), the
    numbers on stderr, the bundle and its report written. The backend is a table here
    (layer cost = MACs, every pruned model 0.9 of the unpruned p50): deterministic."""
    from edgerep.cli import EXIT_TARGET_MISSED
    from edgerep.prune import _engine, _latency

    monkeypatch.setattr(
        _latency.LatencyTables, "ms", lambda self, shapes: [s.macs() * 1e-6 for s in shapes]
    )
    monkeypatch.setattr(_engine, "measure_pair", lambda *a, **k: (1.0, 0.9))
    src, data = _files(tmp_path)
    out = tmp_path / "o"
    argv = ["prune", src, "--target", "latency=0.3", "--calib", data, "-o", str(out)]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == EXIT_TARGET_MISSED == 7, err
    assert "pruning target latency=0.3 missed: measured ratio 0.900, asked 0.3" in err
    report = json.loads((out / "prune_report.json").read_text())
    assert report["status"] == "missed" and (out / "onnx" / "model.onnx").is_file()
    # a reachable target exits 0
    argv[3], argv[-1] = "latency=0.95", str(tmp_path / "met")
    assert main(argv) == EXIT_OK, capsys.readouterr().err
    # convert --prune reports a miss the same way
    conv = tmp_path / "conv"
    code = main(["convert", src, "--prune", "latency=0.3", "--calib", data, "-o", str(conv)])
    assert code == EXIT_TARGET_MISSED, capsys.readouterr().err
    assert (conv / "prune_report.json").is_file() and (conv / "manifest.json").is_file()
