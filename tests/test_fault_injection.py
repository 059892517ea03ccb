"""Fault injection: garbage never ends "verified", exit 0, or "internal error" (issue 14).

Each case was reproduced on the main branch before the fix: NaN/Inf weights exported
as "verified max rel err 0", empty inputs "verified" over 0 elements, an unsigned
manifest with a swapped model accepted, batch 9 on N[1..1..8] run silently, the
OpenVINO artifact verified in f32 loaded in bf16. Signals are in test_interrupt.py,
bad data files in test_fault_data.py.
"""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

import edgerep
from edgerep.cli import EXIT_OK, EXIT_UNSUPPORTED, EXIT_USAGE, EXIT_VERIFICATION, main
from edgerep.errors import ConfigError, UnsupportedError, VerificationError
from edgerep.parity import Tolerance, compare_outputs
from tests._models import CONV_BN
from tests._tiny_bundle import make_bundle, reference

MODELS = (
    CONV_BN
    + """
def nan_weight():
    m = build()
    with torch.no_grad():
        m.conv.weight[0, 0, 0, 0] = float("nan")
    return m

def inf_variance():
    m = build()
    with torch.no_grad():
        m.bn.running_var[1] = float("inf")
    return m

class LogNet(nn.Module):
    # finite weights, NaN outputs: log of negative values
    def forward(self, x):
        return torch.log(x)

def log_net():
    return LogNet()

class MaskNet(nn.Module):
    # -inf on purpose (an attention-style mask), finite elsewhere
    def forward(self, x):
        return x.masked_fill(torch.arange(x.shape[-1]) % 2 == 0, float("-inf"))

def mask_net():
    return MaskNet()

class Empty(nn.Module):
    def forward(self, x):
        return x[:, :0]

def empty():
    return Empty()

class Constant(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)
        with torch.no_grad():
            self.lin.weight.zero_()
    def forward(self, x):
        return self.lin(x)

def constant():
    torch.manual_seed(0)
    return Constant()
"""
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    p = tmp_path_factory.mktemp("faults") / "models.py"
    p.write_text(textwrap.dedent(MODELS))
    return p


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- non-finite weights are refused by every command that loads a model ------------------


@pytest.mark.parametrize("factory", ["nan_weight", "inf_variance"])
@pytest.mark.parametrize("command", ["export", "convert", "fold", "merge"])
def test_non_finite_weights_refused(capsys, models, tmp_path, command, factory):
    out = tmp_path / "out"
    code, _, err = run(capsys, command, f"{models}:{factory}", "--input", "x:1x3x8x8", "-o", out)
    assert code == EXIT_UNSUPPORTED, err
    assert "non-finite values (NaN or Inf)" in err
    assert ("conv.weight" if factory == "nan_weight" else "bn.running_var") in err
    assert not out.exists()


# --- parity cannot pass on garbage ------------------------------------------------------


def test_nan_outputs_fail_parity(capsys, models, tmp_path, torchscript_onnx):
    out = tmp_path / "out"
    code, _, err = run(capsys, "export", f"{models}:log_net", "--input", "x:1x4", "-o", out)
    assert code == EXIT_VERIFICATION, err
    assert "NaN/Inf" in err and "reference" in err
    assert not out.exists()


def test_intended_non_finite_outputs_need_the_opt_in(capsys, models, tmp_path, torchscript_onnx):
    out = tmp_path / "out"
    argv = ["export", f"{models}:mask_net", "--input", "x:2x6", "-o", out]
    code, _, err = run(capsys, *argv)
    assert code == EXIT_VERIFICATION, err
    code, _, err = run(capsys, *argv, "--allow-nonfinite-reference")
    assert code == EXIT_OK, err
    manifest = json.loads((out / "manifest.json").read_text())
    parity = manifest["artifacts"][0]["parity"]["outputs"]
    assert all(o["elements"] > 0 for o in parity.values())


def test_empty_outputs_fail_parity(capsys, models, tmp_path, torchscript_onnx):
    out = tmp_path / "out"
    code, _, err = run(capsys, "export", f"{models}:empty", "--input", "x:1x4", "-o", out)
    assert code == EXIT_VERIFICATION, err  # empty outputs fail parity; never "verified"
    assert "empty" in err
    assert not out.exists()


def test_constant_output_is_flagged(capsys, models, tmp_path, torchscript_onnx):
    out = tmp_path / "out"
    code, _, err = run(capsys, "export", f"{models}:constant", "--input", "x:1x4", "-o", out)
    assert code == EXIT_OK, err
    ledger = json.loads((out / "manifest.json").read_text())["ledger"]
    warnings = [r for r in ledger if r["action"] == "warning"]
    assert warnings and "same for every parity input" in warnings[0]["detail"]


@pytest.mark.parametrize(
    ("ref", "got", "why"),
    [
        ([np.nan, 1.0], [np.nan, 1.0], "reference"),
        ([np.inf, 1.0], [np.inf, 1.0], "reference"),
        ([1.0, 2.0], [np.nan, 2.0], "NaN/Inf"),
        ([1.0, 2.0], [1.0, -np.inf], "NaN/Inf"),
        (np.zeros((0, 3)), np.zeros((0, 3)), "empty"),
    ],
    ids=["nan-nan", "inf-inf", "nan-in-artifact", "inf-in-artifact", "empty"],
)
def test_compare_outputs_refuses_garbage(ref, got, why):
    p = compare_outputs(
        [[np.asarray(ref, np.float32)]], [[np.asarray(got, np.float32)]], ["y"], Tolerance(1e-4)
    )[0]
    assert not p.passed and why in p.reason


def test_no_parity_inputs_is_an_error():
    with pytest.raises(ConfigError, match="at least one input"):
        compare_outputs([], [], ["y"], Tolerance(1e-4))


# --- empty and absurd inputs refused at parsing -------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        "x:0x3x8x8",
        "x:1x0x8x8",
        "x:N[0..1..8]x3x8x8",
        "x:N[0..8]x3x8x8",
        "x:1x3x999999999x999999999",
        "x:N[1..1..999999999999]x3x224x224",
    ],
)
def test_bad_input_specs_are_usage_errors(capsys, models, tmp_path, spec):
    out = tmp_path / "out"
    code, _, err = run(capsys, "export", f"{models}:build", "--input", spec, "-o", out)
    assert code == EXIT_USAGE, err
    assert "internal error" not in err
    assert not out.exists()


# --- manifest integrity ------------------------------------------------------------------


@pytest.fixture
def unsigned(tmp_path):
    """A bundle whose checksum was deleted and whose ONNX model and hash were swapped."""
    bundle = make_bundle(tmp_path / "b", openvino=False)
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    del data["checksum"]
    model = bundle / "onnx" / "model.onnx"
    model.write_bytes(model.read_bytes())  # same bytes: the point is the missing checksum
    path.write_text(json.dumps(data))
    return bundle


def test_load_refuses_a_manifest_without_checksum(unsigned):
    with pytest.raises(VerificationError, match="has no checksum"):
        edgerep.load(unsigned)
    with edgerep.load(unsigned, trust_unsigned=True, prefer=["onnxruntime"]) as p:
        x = np.ones((2, 4), np.float32)
        np.testing.assert_allclose(p.run(x)[0], reference(x), rtol=1e-5)


@pytest.mark.parametrize("command", ["bench", "quantize"])
def test_commands_refuse_a_manifest_without_checksum(capsys, unsigned, tmp_path, command):
    argv = [command, unsigned]
    if command == "quantize":
        argv += ["-o", tmp_path / "q", "--calib", "random"]
    code, _, err = run(capsys, *argv)
    assert code == EXIT_VERIFICATION, err
    assert "has no checksum" in err and "--trust-unsigned" in err


def test_signed_bundle(capsys, tmp_path):
    bundle = make_bundle(tmp_path / "b", openvino=False)
    key = tmp_path / "key"
    key.write_bytes(b"0123456789abcdef-secret")
    code, _, err = run(capsys, "sign", bundle, "--key-file", key)
    assert code == EXIT_OK, err
    with edgerep.load(bundle, key=key.read_bytes(), prefer=["onnxruntime"]) as p:
        assert p.runtime == "onnxruntime"
    with pytest.raises(VerificationError, match="does not match the key"):
        edgerep.load(bundle, key=b"another key of 16+ bytes")


# --- honest load --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("tiny") / "b", max_batch=8)


def test_load_runs_openvino_at_the_verified_precision(tiny):
    pytest.importorskip("openvino", reason="OpenVINO not installed")
    with edgerep.load(tiny, prefer=["openvino"]) as p:
        assert p.precision == "fp32"  # verified in fp32, run in fp32 whatever the CPU prefers
        d = p.describe()
        assert d["parity"]["applies"] and d["precision"] == "fp32"
    with edgerep.load(tiny, prefer=["openvino"], precision="default") as p:
        d = p.describe()
        if p.precision != "fp32":  # a CPU whose default is bf16/f16 (this one: bf16)
            assert not d["parity"]["applies"] and "does not apply" in d["parity"]["note"]
        else:
            assert d["parity"]["applies"]
    with edgerep.load(tiny, prefer=["openvino"], precision="f32") as p:
        assert p.precision == "fp32" and p.describe()["parity"]["applies"]


# --- dynamic ranges enforced before the runtime is called --------------------------------


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("batch", [9, 100])
def test_batch_above_max_is_refused(tiny, runtime, batch):
    if runtime == "openvino":
        pytest.importorskip("openvino", reason="OpenVINO not installed")
    with edgerep.load(tiny, prefer=[runtime]) as p:
        with pytest.raises(ConfigError, match=r"must be in 1\.\.8"):
            p.run(np.ones((batch, 4), np.float32))
        out = p.run(np.ones((8, 4), np.float32))[0]  # the maximum itself runs
        assert out.shape == (8, 3)


def test_range_check_happens_before_any_runtime_call(tiny):
    """Covers every runtime (ExecuTorch, Core ML, TensorRT, torch): the check is in the
    Predictor, and a session that records calls is never reached."""
    from edgerep.bundle import read_manifest
    from edgerep.predictor import Predictor

    calls = []

    class Recording:
        def run(self, feeds):
            calls.append(feeds)
            return [feeds["x"]]

        def describe(self):
            return {}

        def close(self):
            pass

    manifest = read_manifest(tiny)
    p = Predictor(
        [Recording()], runtime="fake", artifact=manifest["artifacts"][0], manifest=manifest
    )
    with pytest.raises(ConfigError, match=r"must be in 1\.\.8"):
        p.run(np.ones((9, 4), np.float32))
    with pytest.raises(ConfigError, match=r"must be in 1\.\.8"):
        p.run(np.ones((0, 4), np.float32))
    assert calls == []


def test_unsupported_error_is_not_internal(capsys, models, tmp_path):
    # a runtime that cannot exist here: the error names it, and the code is not 1
    with pytest.raises(UnsupportedError):
        edgerep.load(make_bundle(tmp_path / "b", openvino=False), prefer=["tensorrt"])
