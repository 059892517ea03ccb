"""Every format at once: CLI ``convert``/``export --to all``, round trips, registry coverage.

One folded and one unfolded bundle of a small RepVGG net are made through the CLI
(``main(argv)``) and shared by the tests below: each format's status, its parity
numbers, its manifest entry and tool versions, a structural check, and dynamic
batch at min/opt/max for the formats that run here.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgerep.bundle import read_manifest
from edgerep.cli import EXIT_OK, EXIT_UNSUPPORTED, main
from edgerep.errors import ConfigError, UnsupportedError
from edgerep.exporters import configure_exporter, resolve_formats
from edgerep.parity import NOT_BUILT_HERE, VERIFIED, parity_runs, tolerance_for
from edgerep.pipeline import convert
from edgerep.runtimes import get_runtime
from edgerep.spec import parse_input_spec

RUNS_HERE = ("onnx", "openvino", "executorch")

SPEC = "x:N[1..2..4]x3x16x16"
MODEL_FILE = """
from edgerep.zoo import RepVGGNet, randomize_


def build():
    return randomize_(RepVGGNet((8, 16), (1, 2), num_classes=5, in_channels=3), seed=0).eval()
"""


def _model() -> nn.Module:
    """The model MODEL_FILE builds."""
    from edgerep.zoo import RepVGGNet, randomize_

    return randomize_(RepVGGNet((8, 16), (1, 2), num_classes=5, in_channels=3), seed=0).eval()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("src") / "net.py"
    p.write_text(textwrap.dedent(MODEL_FILE))
    return p


def _run(argv) -> tuple[int, str]:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(a) for a in argv])
    return code, out.getvalue()


@pytest.fixture(scope="module")
def bundles(model_file, tmp_path_factory):
    """{"folded": (path, stdout), "unfolded": (path, stdout)} made by the CLI."""
    root = tmp_path_factory.mktemp("all")
    out = {}
    code, text = _run(
        ["convert", f"{model_file}:build", "--to", "all", "-o", root / "f", "--input", SPEC]
    )
    assert code == EXIT_OK, text
    out["folded"] = (root / "f", text)
    formats = ",".join(RUNS_HERE)  # Core ML and TensorRT are covered by the folded run
    code, text = _run(
        ["export", f"{model_file}:build", "--to", formats, "-o", root / "u", "--input", SPEC]
    )
    assert code == EXIT_OK, text
    out["unfolded"] = (root / "u", text)
    return out


def _artifact(bundle: Path, fmt: str) -> dict:
    return next(a for a in read_manifest(bundle)["artifacts"] if a["format"] == fmt)


def test_status_table_names_every_format(bundles):
    for variant, (_, text) in bundles.items():
        rows = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ")}
        for fmt in RUNS_HERE:
            assert VERIFIED in rows[fmt], rows[fmt]
        assert "default precision" in rows["openvino"]
        if variant == "unfolded":
            continue
        assert NOT_BUILT_HERE in rows["tensorrt"] and "trtexec" in rows["tensorrt"]
        # off macOS the shipped ML Program is checked by the numpy reference evaluator
        by = "Core ML framework" if sys.platform == "darwin" else "reference evaluator"
        assert f"{VERIFIED} ({by})" in rows["coreml"], rows["coreml"]
    assert "fold: skipped" in bundles["unfolded"][1]
    assert "fold report:" in bundles["folded"][1]


@pytest.mark.parametrize("variant", ["folded", "unfolded"])
@pytest.mark.parametrize("fmt", RUNS_HERE)
def test_round_trip_parity(bundles, fmt, variant):
    """fp32 parity against the original (unfolded) model, recorded in the manifest."""
    art = _artifact(bundles[variant][0], fmt)
    assert art["status"] == VERIFIED and art["precision"] == "fp32"
    parity = art["parity"]
    assert parity["passed"] is True
    assert [i["shapes"]["x"][0] for i in parity["inputs"]] == [2, 2, 4]  # opt, opt, other
    out = parity["outputs"]["output"]
    assert out["max_rel_error"] <= tolerance_for(fmt, "fp32").rel == 1e-4
    assert out["cosine"] > 0.999999 and out["nonfinite"] == 0
    versions = art["tool_versions"]
    assert versions[{"onnx": "onnx", "openvino": "openvino", "executorch": "executorch"}[fmt]]


def test_openvino_reports_both_precisions(bundles):
    parity = _artifact(bundles["folded"][0], "openvino")["parity"]
    assert parity["runtime"]["inference_precision"] == "fp32"
    (default,) = parity["also_ran"]
    assert default["label"] == "default precision"
    assert default["precision"] in ("fp32", "bf16", "fp16")
    assert (
        default["outputs"]["output"]["max_rel_error"]
        <= tolerance_for("openvino", default["precision"]).rel
    )


def test_unverified_formats_are_kept_with_their_reason(bundles):
    path = bundles["folded"][0]
    trt = _artifact(path, "tensorrt")
    assert trt["status"] == NOT_BUILT_HERE and trt["parity"]["passed"] is None
    assert trt["file"] == "tensorrt/build_plan.json"
    assert "tensorrt" in trt["tool_versions"]  # None here: recorded as absent
    script = (path / "tensorrt" / "build_engine.sh").read_text()
    assert "--minShapes=x:1x3x16x16" in script and "--optShapes=x:2x3x16x16" in script
    assert "--maxShapes=x:4x3x16x16" in script and "--saveEngine=model.engine" in script
    assert (path / "tensorrt" / "model.onnx").is_file()
    coreml = _artifact(path, "coreml")
    assert coreml["package"] == "coreml/model.mlpackage"
    assert coreml["file"] == "coreml/model.mlpackage/Manifest.json"
    assert coreml["tool_versions"]["coremltools"]
    if sys.platform != "darwin":
        # verified all the same, and the manifest says by what
        assert coreml["status"] == VERIFIED and coreml["verified_by"] == "reference evaluator"
        parity = coreml["parity"]
        assert parity["runtime"]["runtime"] == "coreml-reference"
        assert parity["runtime"]["precision_mode"] == "declared"
        assert parity["tolerance"]["rel_to_max_abs_reference"] == 1e-5
        assert parity["outputs"]["output"]["max_rel_error"] <= 1e-5
        ledger = read_manifest(path)["ledger"]
        assert any("coreml: coreml cannot run here" in r["detail"] for r in ledger)


def test_structure_after_folding(bundles):
    """Three RepVGG blocks: three convolutions after folding, no BN-like op in any format."""
    import onnx
    import openvino as ov

    folded, unfolded = bundles["folded"][0], bundles["unfolded"][0]
    ops = [n.op_type for n in onnx.load(str(folded / "onnx" / "model.onnx")).graph.node]
    assert ops.count("Conv") == 3 and "BatchNormalization" not in ops, ops
    ir = ov.Core().read_model(str(folded / "openvino" / "model.xml"))
    types = [op.get_type_name() for op in ir.get_ordered_ops()]
    assert types.count("Convolution") == 3, types
    assert not {"BatchNormInference", "Multiply"} & set(types), types
    raw = ov.Core().read_model(str(unfolded / "openvino" / "model.xml"))
    assert [op.get_type_name() for op in raw.get_ordered_ops()].count("Convolution") == 6
    meta = _artifact(folded, "coreml")["metadata"]
    assert meta["op_types"]["conv"] == 3 and "batch_norm" not in meta["op_types"]
    et = _artifact(folded, "executorch")["metadata"]
    assert et["backends"] == ["XnnpackBackend"] and et["delegated_partitions"] >= 1
    assert not any("convolution" in op for op in et["undelegated_ops"])


@pytest.mark.parametrize("fmt", RUNS_HERE)
def test_dynamic_batch_min_opt_max(bundles, fmt):
    path = bundles["folded"][0]
    art = _artifact(path, fmt)
    model = _model()
    runtime = get_runtime(configure_exporter(fmt).runtime)
    options = dict(parity_runs(fmt)[0].options)  # OpenVINO: the f32 precision hint
    with runtime.load(path / art["file"], options=options or None) as session:
        for batch in (1, 2, 4):  # min, opt, max of N[1..2..4]
            x = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(batch))
            with torch.no_grad():
                ref = model(x).numpy()
            (got,) = session.run({session.input_names[0]: x.numpy()})
            assert got.shape == (batch, 5)
            assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_manifest_is_tamper_evident(bundles, tmp_path):
    import shutil

    from edgerep.errors import VerificationError

    copy = tmp_path / "b"
    shutil.copytree(bundles["folded"][0], copy)
    data = json.loads((copy / "manifest.json").read_text())
    data["artifacts"][0]["precision"] = "fp16"
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(VerificationError, match="modified after it was written"):
        read_manifest(copy)


class Attention(nn.Module):
    """A tiny pre-norm transformer block: single-head attention and a GELU MLP."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
        x = x + self.proj(att @ v)
        return x + self.mlp(self.norm2(x))


def test_tiny_transformer_every_format(tmp_path):
    """Dynamic batch everywhere but ExecuTorch, whose memory planner does not honor the
    range for attention graphs (the exporter says so): it gets a static shape."""
    from edgerep.errors import ExportError
    from edgerep.exporters import get_exporter

    torch.manual_seed(0)
    model = Attention().eval()
    specs = [parse_input_spec("x:N[1..2..4]x8x16")]
    dynamic = ["onnx", "openvino", "tensorrt"]
    _, result = convert(model, specs, to=dynamic, out_dir=tmp_path / "t", fold=False)
    _, static = convert(
        model, [parse_input_spec("x:2x8x16")], to=["executorch"], out_dir=tmp_path / "s"
    )
    status = {s.format: s for s in [*result.formats, *static.formats]}
    for fmt in RUNS_HERE:
        assert status[fmt].status == VERIFIED, status[fmt].line()
        assert max(p.max_rel_error for p in status[fmt].parity) <= 1e-4
    assert status["tensorrt"].status == NOT_BUILT_HERE
    with pytest.raises(ExportError, match=r"planned the memory of input 'x' for at most"):
        get_exporter("executorch").export(model, (torch.randn(2, 8, 16),), specs, tmp_path)


class Svd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.tail = SvdTail()

    def forward(self, x):
        return self.tail(self.conv(x))


class SvdTail(nn.Module):
    def forward(self, x):
        return torch.linalg.svdvals(x.flatten(1, 2))


def test_op_coverage_is_reported_for_every_target_before_any_file(tmp_path):
    specs = [parse_input_spec("x:1x3x4x4")]
    with pytest.raises(UnsupportedError) as e:
        convert(
            Svd().eval(),
            specs,
            to=["onnx", "openvino", "coreml", "executorch", "tensorrt"],
            out_dir=tmp_path / "b",
            fold=False,
        )
    msg = str(e.value)
    for fmt in ("onnx", "openvino", "coreml", "executorch", "tensorrt"):
        assert f"[{fmt}] unsupported-op at tail" in msg, msg
    assert "svd" in msg and "Fix:" in msg
    assert list(tmp_path.iterdir()) == []


def test_cli_unsupported_lists_all_targets(tmp_path, capsys):
    src = tmp_path / "svd.py"
    src.write_text(
        "import torch\nfrom torch import nn\n\n"
        "class S(nn.Module):\n    def forward(self, x):\n        return torch.linalg.svdvals(x)\n\n"
        "def build():\n    return S()\n"
    )
    argv = ["export", f"{src}:build", "--to", "openvino,executorch", "-o", str(tmp_path / "o")]
    code = main([*argv, "--input", "x:1x4x4"])
    err = capsys.readouterr().err
    assert code == EXIT_UNSUPPORTED
    assert "[openvino]" in err and "[executorch]" in err and not (tmp_path / "o").exists()


def test_formats_and_options(model_file, tmp_path, capsys):
    assert resolve_formats(["all"])[:5] == ["onnx", "openvino", "coreml", "tensorrt", "executorch"]
    assert resolve_formats(["onnx", "all"]).count("onnx") == 1
    assert configure_exporter("openvino", {"compress_to_fp16": "true"}).compress_to_fp16 is True
    with pytest.raises(ConfigError, match="did you mean 'compress_to_fp16'"):
        configure_exporter("openvino", {"compress_fp16": "true"})
    with pytest.raises(ConfigError, match="true or false"):
        configure_exporter("openvino", {"compress_to_fp16": "maybe"})
    with pytest.raises(ConfigError, match="choose one of fp32, fp16, int8"):
        configure_exporter("tensorrt", {"precision": "fp8"})
    args = ["export", f"{model_file}:build", "--to", "onnx", "-o", tmp_path / "o", "--input", SPEC]
    assert main([str(a) for a in [*args, "--option", "openvino.via=onnx"]]) == 2
    assert "which --to does not export" in capsys.readouterr().err
    assert main([str(a) for a in [*args, "--option", "onnx"]]) == 2
    assert "FORMAT.KEY=VALUE" in capsys.readouterr().err
