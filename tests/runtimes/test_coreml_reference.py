"""The Core ML reference evaluator end to end: zoo nets converted by the existing
exporter, evaluated from the saved ``.mlpackage`` and compared with PyTorch.

Also: the parity gate it gives the pipeline (Core ML verified off macOS, and by what),
the converter bugs it catches (tanh-GELU, coremltools' fuse_conv_bias), and what
happens with an op it cannot evaluate.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("coremltools")
pytest.importorskip("scipy")

from edgerep.errors import ConfigError, UnsupportedError, VerificationError
from edgerep.exporters.coreml import CoreMLExporter
from edgerep.parity import NOT_VERIFIED_HERE, VERIFIED, tolerance_for
from edgerep.pipeline import convert
from edgerep.runtimes import get_runtime
from edgerep.spec import example_inputs, parse_input_spec
from edgerep.zoo import DiverseBranchBlock, demo_net, mobileone_net, randomize_

RT = get_runtime("coreml-reference")


class TransformerBlock(nn.Module):
    """Pre-norm attention + MLP with tanh-GELU (the converter bug's trigger)."""

    def __init__(self, dim: int = 16, heads: int = 2, approximate: str = "tanh") -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.approximate = approximate

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate=self.approximate))


class Decoder(nn.Module):
    """conv_transpose, bilinear/nearest upsampling, max pool with ceil_mode, cat, softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1)
        self.head = nn.Conv2d(7, 5, 1)

    def forward(self, x):
        y = F.max_pool2d(F.relu(self.down(x)), 3, 2, ceil_mode=True)
        y = F.interpolate(y, scale_factor=2.0, mode="bilinear", align_corners=False)
        y = self.up(y)
        y = torch.cat([F.interpolate(y, size=x.shape[-2:], mode="nearest"), x], dim=1)
        return torch.softmax(self.head(y), dim=1)


NETS = {
    "demo_net": (lambda: demo_net(), "x:1x1x16x16"),
    "mobileone": (lambda: mobileone_net(), "x:2x3x32x32"),
    "transformer": (lambda: TransformerBlock(), "x:2x5x16"),
    "decoder": (lambda: Decoder(), "x:1x3x12x12"),
}


def _net(name):
    factory, spec = NETS[name]
    torch.manual_seed(0)
    return randomize_(factory().eval(), seed=1), [parse_input_spec(spec)]


def _rel(got, ref):
    return float(np.abs(got.astype(np.float64) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(net, precision) -> (model, feeds, reference output, package path), made lazily."""
    cache = {}

    def get(name, precision):
        if (name, precision) not in cache:
            model, specs = _net(name)
            x = example_inputs(specs, seed=2)
            out = tmp_path_factory.mktemp(f"{name}-{precision}")
            art = CoreMLExporter(compute_precision=precision).export(model, x, specs, out)
            with torch.no_grad():
                ref = model(*x).double().numpy()
            cache[name, precision] = (model, {"x": x[0].numpy()}, ref, art.path)
        return cache[name, precision]

    return get


@pytest.mark.parametrize("name", list(NETS))
def test_fp32_programs_match_torch(exported, name):
    """float64 and float32 graph semantics within 1e-5 of PyTorch; on an fp32 program
    "declared" is float32."""
    _, feeds, ref, path = exported(name, "fp32")
    outs = {}
    for precision in ("float64", "float32", "declared"):
        with RT.load(path, options={"precision": precision}) as s:
            (outs[precision],) = s.run(feeds)
            assert s.describe()["precision_mode"] == precision
        assert outs[precision].shape == ref.shape
        assert _rel(outs[precision], ref) <= 1e-5, (name, precision, _rel(outs[precision], ref))
    assert outs["float64"].dtype == np.float64 and outs["float32"].dtype == np.float32
    np.testing.assert_array_equal(outs["declared"], outs["float32"])


@pytest.mark.parametrize("name", ["demo_net", "transformer"])
def test_fp16_programs_in_declared_precision(exported, name):
    """Declared precision rounds every op to fp16: within the fp16 gate, visibly further
    from PyTorch than the same program in float32 graph semantics."""
    _, feeds, ref, path = exported(name, "fp16")
    errors = {}
    for precision in ("float32", "declared"):
        with RT.load(path, options={"precision": precision}) as s:
            (out,) = s.run(feeds)
        errors[precision] = _rel(out, ref)
    gate = tolerance_for("coreml", "fp16", runtime="coreml-reference").rel
    assert errors["declared"] <= gate, errors
    assert errors["declared"] > errors["float32"], errors


def test_tolerance_table():
    """The reference evaluator gates fp32 Core ML 10x tighter than the framework does."""
    assert tolerance_for("coreml", "fp32", runtime="coreml-reference").rel == 1e-5
    assert tolerance_for("coreml", "fp32", runtime="coreml").rel == 1e-4
    assert tolerance_for("coreml", "fp16", runtime="coreml-reference").rel == 1e-2


def test_runtime_contract(exported, tmp_path):
    _, feeds, _, path = exported("demo_net", "fp32")
    assert RT.is_available() and RT.devices() == ["cpu"]
    caps = RT.capabilities("cpu")
    assert {"conv", "gelu", "layer_norm", "upsample_bilinear"} <= set(caps["op_types"])
    assert caps["verified_by"] == "reference evaluator"
    with pytest.raises(ConfigError, match="precisoin"):
        RT.load(path, options={"precisoin": "float64"})
    with pytest.raises(ConfigError, match="float16x"):
        RT.load(path, options={"precision": "float16x"})
    with pytest.raises(ConfigError, match="does not exist"):
        RT.load(tmp_path / "none.mlpackage")
    with pytest.raises(UnsupportedError, match="cpu"):
        RT.load(path, device="ane")
    # a file inside the package (what a bundle's manifest names) loads the package
    with RT.load(path / "Manifest.json") as s:
        assert s.input_names == ["x"] and s.output_names == ["output"]
        (y,) = s.run({"x": feeds["x"]})
        assert y.shape == (1, 10)


def test_fp32_resnet_sized_speed_is_not_a_test():
    """Speed is measured in bench/coreml_reference_speed.py, not here."""
    import pathlib

    assert (pathlib.Path(__file__).parents[2] / "bench" / "coreml_reference_speed.py").is_file()


# --- the pipeline: verified off macOS, and the bugs it catches -------------------------


def test_convert_verifies_coreml_with_the_reference_evaluator(tmp_path):
    model, specs = _net("transformer")
    _, result = convert(model, specs, to=["coreml"], out_dir=tmp_path / "b", fold=False)
    (status,) = result.formats
    if status.verified_by == "Core ML framework":  # macOS: the framework runs it
        return
    assert status.status == VERIFIED and status.label == "verified (reference evaluator)"
    (art,) = result.manifest["artifacts"]
    assert art["verified_by"] == "reference evaluator"
    assert art["parity"]["outputs"]["output"]["max_rel_error"] <= 1e-5
    assert any("gelu-tanh-kwarg" in n for n in art["notes"])  # the workaround acted
    # edgerep.load runs a Core ML-only bundle here through the evaluator
    import edgerep

    predictor = edgerep.load(tmp_path / "b")
    assert predictor.runtime == "coreml-reference"
    x = example_inputs(specs, seed=5)[0]
    (y,) = predictor.run(x.numpy())
    with torch.no_grad():
        ref = model(x).numpy()
    assert _rel(y, ref.astype(np.float64)) <= 1e-5


def test_tanh_gelu_converter_bug_is_caught_and_named(tmp_path):
    """Without the workaround coremltools computes exact GELU (~1e-4 of the output
    scale here): the reference evaluator fails parity and the failure names the op."""
    model, specs = _net("transformer")
    with pytest.raises(VerificationError) as e:
        convert(
            model,
            specs,
            to=["coreml"],
            out_dir=tmp_path / "b",
            fold=False,
            exporter_options={"coreml": {"workarounds": False}},
        )
    msg = str(e.value)
    assert "above the tolerance 1e-05" in msg, msg
    assert "converter bug gelu-tanh-kwarg" in msg and "compute exact GELU" in msg, msg
    assert "apple/coremltools#2863" in msg


def test_tanh_gelu_error_size(exported, tmp_path):
    """The bug's size: between the evaluator's gate and the framework's."""
    model, specs = _net("transformer")
    x = example_inputs(specs, seed=2)
    art = CoreMLExporter(workarounds=False).export(model, x, specs, tmp_path)
    with torch.no_grad():
        ref = model(*x).double().numpy()
    with RT.load(art.path, options={"precision": "float64"}) as s:
        (y,) = s.run({"x": x[0].numpy()})
    assert 1e-5 < _rel(y, ref) < 1e-3
    assert 1e-4 < np.abs(y - ref).max() < 1e-3  # ~5e-4 absolute, as reported upstream


def test_fuse_conv_bias_converter_bug_is_caught(tmp_path):
    """coremltools' fuse_conv_bias negates a constant shared by a sub and an add in
    place (DBB's BN-and-pad branch): with the pass left in, the shipped program is
    wrong by tens of percent and parity through the evaluator says so."""
    torch.manual_seed(0)
    model = randomize_(DiverseBranchBlock(4, 8, stride=2).eval(), seed=0)
    specs = [parse_input_spec("x:1x4x8x8")]
    x = example_inputs(specs, seed=0)
    with torch.no_grad():
        ref = model(*x).double().numpy()
    errors = {}
    for workarounds in (True, False):
        out = tmp_path / str(workarounds)
        out.mkdir()
        art = CoreMLExporter(workarounds=workarounds).export(model, x, specs, out)
        with RT.load(art.path) as s:
            (y,) = s.run({"x": x[0].numpy()})
        errors[workarounds] = _rel(y, ref)
    assert errors[True] <= 1e-5 and errors[False] > 1e-2, errors


def test_op_without_kernel_leaves_coreml_not_verified_with_the_op_named(tmp_path, monkeypatch):
    from edgerep.runtimes._mil import KERNELS

    monkeypatch.delitem(KERNELS, "relu")
    model, specs = _net("demo_net")
    _, result = convert(model, specs, to=["coreml"], out_dir=tmp_path / "b", fold=True)
    (status,) = result.formats
    if status.verified_by == "Core ML framework":
        return
    assert status.status == NOT_VERIFIED_HERE, status
    assert "relu (x" in status.reason and "reference evaluator" in status.reason


_REFERENCE_LOAD = type(RT).load  # the fake below keeps it when a test patches it


class _FakeFrameworkSession:
    """FAKE stand-in for Core ML's ``MLModel.predict`` (which needs macOS): the reference
    evaluator in float32 with a known offset added to every output, so that the cross
    check has a known difference to find. It proves the wiring, not the framework."""

    OFFSET_REL = 3e-5  # of each output's max abs value

    def __init__(self, path, device, options):
        self._inner = _REFERENCE_LOAD(RT, path, options={"precision": "float32"})
        self.input_names = self._inner.input_names
        self.output_names = self._inner.output_names

    def run(self, feeds):
        return [y + self.OFFSET_REL * np.abs(y).max() for y in self._inner.run(feeds)]

    def describe(self):
        return {"runtime": "coreml", "device": "cpu", "fake": "FAKE predict (tests only)"}

    def close(self):
        self._inner.close()


@pytest.fixture
def fake_macos_predict(monkeypatch):
    """Pretends Core ML can predict here (as on macOS) with `_FakeFrameworkSession`."""
    from edgerep.runtimes.coreml import CoreMLRuntime

    monkeypatch.setattr(CoreMLRuntime, "unavailable_reason", lambda self: "")
    monkeypatch.setattr(
        CoreMLRuntime,
        "load",
        lambda self, path, *, device="cpu", options=None: _FakeFrameworkSession(
            path, device, options
        ),
    )


def _convert_tiny(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    specs = [parse_input_spec("x:1x3x8x8")]
    return convert(model, specs, to=["coreml"], out_dir=tmp_path / "b", fold=False)


def test_where_the_framework_predicts_the_evaluator_is_cross_checked(tmp_path, fake_macos_predict):
    """With predict available (FAKED here: unrun on real macOS), the framework gates and
    the reference evaluator runs the same inputs; their mutual difference is recorded in
    the manifest and the ledger, not gating."""
    _, result = _convert_tiny(tmp_path)
    (status,) = result.formats
    assert status.status == VERIFIED and status.verified_by == "Core ML framework", status
    assert "coreml-reference (reference evaluator, declared) vs coreml" in status.reason
    (art,) = result.manifest["artifacts"]
    cross = art["parity"]["reference_cross_check"]
    assert cross["compared"] and cross["runtime"] == "coreml-reference"
    assert cross["against"] == "coreml" and cross["precision_mode"] == "declared"
    (out,) = cross["outputs"].values()
    # the fake's offset, found (the evaluator in declared fp32 vs float32: ~1e-7 more)
    assert (
        0.9 * _FakeFrameworkSession.OFFSET_REL
        < out["max_rel_diff"]
        < 1.1 * (_FakeFrameworkSession.OFFSET_REL)
    ), out
    ledger = result.manifest["ledger"]
    assert any("vs coreml (Core ML framework): max rel diff" in r["detail"] for r in ledger)


def test_cross_check_reports_what_the_evaluator_cannot_take(
    tmp_path, fake_macos_predict, monkeypatch
):
    """The evaluator cannot take the program (an op without a kernel, simulated): the
    framework still verifies (FAKE predict here), and the cross check says it did not
    compare, and why."""
    from edgerep.errors import UnsupportedError

    def declines(self, path, **kw):
        raise UnsupportedError("the reference evaluator cannot evaluate op(s) relu (x6)")

    monkeypatch.setattr(type(RT), "load", declines)
    _, result = _convert_tiny(tmp_path)
    (status,) = result.formats
    assert status.status == VERIFIED and status.verified_by == "Core ML framework", status
    cross = result.manifest["artifacts"][0]["parity"]["reference_cross_check"]
    assert cross["compared"] is False and "relu (x6)" in cross["reason"], cross


def test_cross_check_with_a_different_number_of_outputs_does_not_compare(
    tmp_path, fake_macos_predict, monkeypatch
):
    """An evaluator returning fewer outputs than the framework (simulated) is reported as
    not compared, with the counts, instead of comparing the pairs zip() happens to make."""
    original = type(RT).load

    class _Short:
        def __init__(self, inner):
            self._inner = inner
            self.input_names, self.output_names = inner.input_names, inner.output_names[:0]

        def run(self, feeds):
            return self._inner.run(feeds)[:0]

        def describe(self):
            return self._inner.describe()

        def close(self):
            self._inner.close()

    monkeypatch.setattr(
        type(RT), "load", lambda self, path, **kw: _Short(original(self, path, **kw))
    )
    _, result = _convert_tiny(tmp_path)
    (status,) = result.formats
    assert status.status == VERIFIED and status.verified_by == "Core ML framework", status
    cross = result.manifest["artifacts"][0]["parity"]["reference_cross_check"]
    assert cross["compared"] is False and "different numbers of outputs" in cross["reason"]
