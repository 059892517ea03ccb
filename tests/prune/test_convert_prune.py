"""`edgerep convert --prune`: the prune stage in the pipeline, the fine-tune hook, the sweep."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch

from edgerep.cli import EXIT_OK, EXIT_SOURCE, EXIT_USAGE, main
from edgerep.prune._stage import default_prune_backend
from tests.prune.test_cli_prune import MODEL, RESNET

FINETUNE = textwrap.dedent(
    """
    import torch

    CALLS = []

    def fill_bias(model, data):
        # proves the hook ran on the pruned model and that its result is what gets exported
        assert data.teacher is not None and data.inputs[0].shape[1:] == (3, 12, 12)
        head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        with torch.no_grad():
            head.bias.fill_(0.5)
        return model

    def boom(model, data):
        raise ValueError("kaboom from the user's fine-tune")

    def widen(model, data):
        return torch.nn.Linear(3, 3)
    """
)


@pytest.fixture
def files(tmp_path):
    src = tmp_path / "net.py"
    src.write_text(MODEL)
    (tmp_path / "ft.py").write_text(FINETUNE)
    data = tmp_path / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(
        data, x=rng.standard_normal((64, 3, 12, 12)).astype(np.float32), y=rng.integers(0, 10, 64)
    )
    return {"src": f"{src}:build", "data": str(data), "ft": str(tmp_path / "ft.py")}


def _folded(src: str):
    from edgerep.fold import fold
    from edgerep.source import load_model
    from edgerep.spec import example_inputs, parse_input_spec

    model, _ = load_model(src)
    x = example_inputs([parse_input_spec("x:1x3x12x12")], seed=0)
    folded, _ = fold(model, x)
    return folded, x


def _onnx_run(path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))])


def test_convert_prune_bundle_verifies_against_the_pruned_model_and_ledgers_its_error(
    files, tmp_path, capsys
) -> None:
    out = tmp_path / "out"
    argv = ["convert", files["src"], "--prune", "macs=0.5", "--calib", files["data"]]
    argv += ["--finetune", f"{files['ft']}:fill_bias", "-o", str(out)]
    code = main(argv)
    text = capsys.readouterr()
    assert code == EXIT_OK, text.err
    assert "lossy" in text.out and "finetuned" in text.out
    manifest = json.loads((out / "manifest.json").read_text())
    stages = [r["stage"] for r in manifest["ledger"]]
    assert stages.index("fold") < stages.index("prune") < stages.index("export")
    prune_rows = [r for r in manifest["ledger"] if r["stage"] == "prune"]
    lossy = next(r for r in prune_rows if r["action"] == "lossy")
    # pruning is lossy: its error is a measured number, not "verified exact"
    assert lossy["error"] is not None and lossy["error"] > 1e-3, lossy
    assert "not an exact transform" in lossy["detail"]
    assert any(r["action"] == "narrowed" for r in prune_rows)
    assert any(r["action"] == "finetuned" for r in prune_rows)
    art = manifest["artifacts"][0]
    assert art["parity"]["reference"].startswith("pruned model") and art["parity"]["passed"]
    assert {"prune_plan.json", "pruned_state_dict.pt", "prune_report.json"} <= set(
        manifest["files"]
    )

    # the saved plan + state_dict rebuild the pruned model; the fine-tune's bias is in it
    from edgerep.prune import load_pruned

    folded, x = _folded(files["src"])
    pruned = load_pruned(folded, x, out)
    head = [m for m in pruned.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert torch.all(head.bias == 0.5)
    # the ONNX artifact computes the pruned model, not the folded one
    xs = np.random.default_rng(1).standard_normal((4, 3, 12, 12)).astype(np.float32)
    got = _onnx_run(out / art["file"], xs)
    with torch.no_grad():
        want = pruned(torch.from_numpy(xs)).numpy()
        unpruned = folded(torch.from_numpy(xs)).numpy()
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-4 * scale
    assert np.abs(got - unpruned).max() > 1e-2 * scale

    report = json.loads((out / "prune_report.json").read_text())
    assert report["status"] == "met" and report["achieved"] <= 0.5
    # the roofline of `edgerep bench` counts the pruned model's FLOPs, not the unpruned fold's
    from edgerep.bench.roofline import bundle_flops

    fold = json.loads((out / "fold_report.json").read_text())
    assert fold["flops_after"] == 2 * report["macs_before"]
    assert bundle_flops(out) == 2 * report["macs_after"]
    ft = report["finetune"]
    assert ft["function"].endswith("ft.py:fill_bias") and ft["seconds"] >= 0
    assert ft["top1_before"] is not None and ft["top1_after"] is not None
    acc = report["accuracy"]
    assert acc["labelled"] and acc["before"] is not None and acc["finetuned"] == ft["top1_after"]


def test_convert_prune_composes_with_quantize(files, tmp_path, capsys) -> None:
    out = tmp_path / "q"
    argv = ["convert", files["src"], "--prune", "widths=fold_root2:16", "--calib", files["data"]]
    argv += ["--quantize", "int8", "--backend", "onnxruntime", "--seconds", "0.02"]
    argv += ["--repeats", "1", "-o", str(out)]
    code = main(argv)
    assert code == EXIT_OK, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    stages = [r["stage"] for r in manifest["ledger"]]
    assert stages.index("fold") < stages.index("prune") < stages.index("quantize")
    assert (out / "quantize_report.json").is_file() and (out / "prune_plan.json").is_file()
    plan = json.loads((out / "prune_plan.json").read_text())
    assert [(g["name"], len(g["kept"])) for g in plan["groups"]] == [("fold_root2", 16)]
    # the quantizer calibrated the pruned float artifact (16 channels after the stem)
    import onnx

    graph = onnx.load(str(out / "onnx" / "model.onnx")).graph
    shapes = [tuple(i.dims) for i in graph.initializer if len(i.dims) == 4]
    assert (16, 16, 3, 3) in shapes


def test_failing_finetune_is_reported_and_the_previous_output_is_kept(
    files, tmp_path, capsys
) -> None:
    out = tmp_path / "out"
    assert main(["convert", files["src"], "-o", str(out)]) == EXIT_OK
    before = (out / "manifest.json").read_bytes()
    capsys.readouterr()
    for fn, message in (("boom", "kaboom from the user's fine-tune"), ("widen", "structure")):
        argv = ["convert", files["src"], "--prune", "macs=0.5", "--calib", files["data"]]
        argv += ["--finetune", f"{files['ft']}:{fn}", "-o", str(out), "--force"]
        code = main(argv)
        err = capsys.readouterr().err
        assert code == EXIT_SOURCE, err
        assert "fine-tune function" in err and message in err, err
        assert (out / "manifest.json").read_bytes() == before
        assert not (out / "prune_plan.json").exists()


def test_convert_prune_usage_errors(files, tmp_path, capsys) -> None:
    out = str(tmp_path / "o")
    cases = [
        (["--prune", "latency=1.5"], "impossible"),
        (["--prune", "latency=0"], "impossible"),
        (["--prune", "speed=0.5"], "unknown pruning target"),
        (["--prune", "latency=0.5", "--prune-backend", "tensorrt"], "unknown pruning backend"),
        (["--prune", "macs=0.5", "--prune-recovery", "ls"], "need --calib"),
        (["--prune", "macs=0.5", "--finetune", f"{files['ft']}:boom"], "need --calib"),
        (["--prune", "macs=0.5", "--finetune", "nofile.py:fn"], "does not exist"),
        (["--prune", "macs=0.5", "--finetune", "ft:fn"], "FILE.py:FUNCTION"),
        (["--prune-backend", "openvino"], "add --prune"),
        (["--finetune", f"{files['ft']}:boom"], "add --prune"),
        (["--prune", "macs=0.5", "--sweep", "0.3,x"], "cannot read --sweep"),
        (["--prune", "macs=0.5", "--sweep", "0.3,1.2"], "impossible"),
        (["--prune", "macs=0.01", "--calib", files["data"]], "impossible for this model"),
        (["--prune", "macs=0.3", "--prune-keep", "fold_root2"], "impossible for this model"),
    ]
    for extra, message in cases:
        code = main(["convert", files["src"], "-o", out, *extra])
        err = capsys.readouterr().err
        assert code == EXIT_USAGE, (extra, err)
        assert message in err, (extra, err)
    assert not (tmp_path / "o").exists()


def test_latency_backend_defaults_from_the_formats() -> None:
    assert default_prune_backend(["onnx", "openvino"]) == "onnxruntime"
    assert default_prune_backend(["openvino"]) == "openvino"
    assert default_prune_backend(["coreml"]) == "onnxruntime"


def test_prune_sweep_writes_one_bundle_per_ratio_and_a_pareto_report(
    files, tmp_path, capsys
) -> None:
    out = tmp_path / "sweep"
    argv = ["prune", files["src"], "--target", "macs=0.5", "--sweep", "0.4,0.7"]
    argv += ["--calib", files["data"], "--seconds", "0.02", "--repeats", "1", "-o", str(out)]
    code = main([*argv, "--finetune", f"{files['ft']}:fill_bias"])
    text = capsys.readouterr()
    assert code == EXIT_OK, text.err
    assert "Pruning sweep" in text.out
    for name in ("unpruned", "macs-0.4", "macs-0.7"):
        assert (out / name / "manifest.json").is_file(), name
    assert not (out / "unpruned" / "prune_plan.json").exists()
    bench = json.loads((out / "bench" / "bench.json").read_text())
    variants = {v["variant"]: v for v in bench["pruning"]["variants"]}
    assert set(variants) == {"macs-0.4", "macs-0.7"}
    for v in variants.values():
        assert v["macs_after"] < v["macs_before"] and v["top1_before"] is not None
        assert v["finetune"]["function"].endswith("ft.py:fill_bias")
        assert v["p50_ratio"] and all(r > 0 for r in v["p50_ratio"].values())
    assert variants["macs-0.4"]["macs_after"] < variants["macs-0.7"]["macs_after"]
    points = bench["pruning"]["points"]
    assert {p["variant"] for p in points} == {"unpruned", "macs-0.4", "macs-0.7"}
    assert any(p["pareto"] for p in points)
    # the fastest point is never dominated
    fastest = min(points, key=lambda p: p["p50_ms"])
    assert fastest["pareto"] or any(
        p["p50_ms"] == fastest["p50_ms"] and p["top1"] > fastest["top1"] for p in points
    )
    md = (out / "bench" / "bench.md").read_text()
    html = (out / "bench" / "bench.html").read_text()
    assert "Pruning sweep" in md and "macs-0.4" in md
    assert "plot-pareto" in html and "<h2>Pruning</h2>" in html


def test_convert_sweep_one_ratio(files, tmp_path, capsys) -> None:
    out = tmp_path / "cs"
    argv = ["convert", files["src"], "--prune", "params=0.5", "--sweep", "0.6"]
    argv += ["--seconds", "0.02", "--repeats", "1", "--json", "-o", str(out)]
    code = main(argv)
    text = capsys.readouterr()
    assert code == EXIT_OK, text.err
    printed = json.loads(text.out)
    assert [v["variant"] for v in printed["bench"]["pruning"]["variants"]] == ["params-0.6"]
    manifest = json.loads((out / "params-0.6" / "manifest.json").read_text())
    assert any(r["stage"] == "prune" for r in manifest["ledger"])
    report = json.loads((out / "params-0.6" / "prune_report.json").read_text())
    assert (
        report["target"] == "params=0.6" and report["params_after"] <= 0.6 * report["params_before"]
    )
    # no --calib: no recovery, no accuracy, said so rather than guessed
    assert report["recovery_mode"] == "none" and report["accuracy"] == {}


def test_convert_prune_method_depth_refolds_and_verifies(tmp_path, files) -> None:
    """`convert --prune-method depth`: blocks replaced by fitted maps, the pruned model
    folded again before export (a ledger row), the artifact verified against it."""
    src = tmp_path / "resnet.py"
    src.write_text(RESNET)
    out = tmp_path / "out"
    code = main(
        [
            "convert", f"{src}:build", "--to", "onnx", "--prune-method", "depth",
            "--prune-depth-error", "10", "--prune-depth-blocks", "1",
            "--calib", files["data"], "-o", str(out),
        ]
    )  # fmt: skip
    assert code == EXIT_OK
    manifest = json.loads((out / "manifest.json").read_text())
    rows = [r for r in manifest["ledger"] if r["stage"] == "prune"]
    plan = json.loads((out / "prune_plan.json").read_text())
    assert len(plan["depth"]) == 1  # one block replaced by its fitted map
    assert any(r["action"] == "refolded" for r in rows)
    assert any(r["action"] == "lossy" for r in rows)
    onnx = next(a for a in manifest["artifacts"] if a["format"] == "onnx")
    assert onnx["status"].startswith("verified")


def test_convert_prune_method_needs_data_or_target(files, tmp_path, capsys) -> None:
    out = str(tmp_path / "o")
    code = main(["convert", files["src"], "--to", "onnx", "--prune-method", "depth", "-o", out])
    assert code == EXIT_USAGE and "need --calib" in capsys.readouterr().err
    code = main(["convert", files["src"], "--to", "onnx", "--prune-importance", "l1", "-o", out])
    assert code == EXIT_USAGE and "add --prune TARGET" in capsys.readouterr().err


BN_MODEL = textwrap.dedent(
    """
    import torch
    from torch import nn

    EDGEREP_INPUTS = ["x:1x3x12x12"]

    def build():
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
        )
        with torch.no_grad():  # small gammas on the 32-channel BN, large folded filters
            net[4].weight[[3, 7, 20, 31]] = 0.01
            net[4].running_var[[3, 7, 20, 31]] = 1e-6
        return net.eval()
    """
)


def test_convert_prune_importance_bn_reads_the_bns_before_folding(files, tmp_path, capsys) -> None:
    src = tmp_path / "bn_net.py"
    src.write_text(BN_MODEL)
    folded, _x = _folded(f"{src}:build")
    (layer,) = [
        n
        for n, m in folded.named_modules()
        if isinstance(m, torch.nn.Conv2d) and m.out_channels == 32 and m.in_channels == 16
    ]
    out = tmp_path / "out"
    argv = ["convert", f"{src}:build", "--to", "onnx", "--prune", f"widths={layer}:28"]
    argv += ["--prune-importance", "bn", "-o", str(out)]
    code = main(argv)
    assert code == EXIT_OK, capsys.readouterr().err
    plan = json.loads((out / "prune_plan.json").read_text())
    (group,) = [g for g in plan["groups"] if g["name"] == layer]
    assert sorted(set(range(32)) - set(group["kept"])) == [3, 7, 20, 31]


def test_convert_prune_method_errors_are_named_before_loading(files, tmp_path, capsys) -> None:
    out = str(tmp_path / "o")
    base = ["convert", files["src"], "--to", "onnx", "--calib", files["data"], "-o", out]
    code = main([*base, "--prune-method", "depth,bogus"])
    err = capsys.readouterr().err
    # the unknown method is named, with no second error about a missing target
    assert code == EXIT_USAGE and "bogus" in err and "pruning target" not in err
    code = main([*base, "--prune-method", "depth", "--sweep", "0.5"])
    captured = capsys.readouterr()
    assert code == EXIT_USAGE and "give --prune TARGET too" in captured.err
    assert "inputs (declared" not in captured.out  # refused before the model loads
    assert not (tmp_path / "o").exists()


def test_bad_depth_and_rank_bounds_are_refused_before_loading(files, tmp_path, capsys) -> None:
    base = ["convert", files["src"], "--to", "onnx", "--calib", files["data"]]
    code = main([*base, "--prune-method", "depth,rank", "--prune-depth-blocks", "0",
                 "--prune-rank-error", "2", "-o", str(tmp_path / "o")])  # fmt: skip
    captured = capsys.readouterr()
    assert code == EXIT_USAGE
    assert (
        "depth blocks must be >= 1" in captured.err
        and "rank error must be in (0, 1)" in captured.err
    )
    assert "inputs (declared" not in captured.out


def test_sweep_ratios_that_name_the_same_variant_are_refused() -> None:
    from edgerep.errors import ConfigError
    from edgerep.prune._sweep import parse_sweep

    assert parse_sweep("0.3,0.5", "macs") == ["macs=0.3", "macs=0.5"]
    for text in ("0.3,0.3", "0.3,0.30000001"):  # both would write OUT/macs-0.3/
        with pytest.raises(ConfigError, match="repeats a ratio"):
            parse_sweep(text, "macs")
