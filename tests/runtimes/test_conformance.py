"""Every runtime that runs here, on one zoo net: the same outputs as torch, the same contract.

A small net of zoo blocks (RepVGG and MobileOne in training form, every branch
present, randomized BatchNorm statistics, a classifier head) is exported once per
format; each runtime must then

- report its capabilities before anything is loaded (and refuse an unknown device
  there, not later);
- return torch's outputs within float32 tolerance, by name and order;
- refuse wrong input names and dtypes with `ConfigError` on the fast path too;
- close idempotently, then refuse to run;
- give `concurrent_runs` that return the right output for each thread's own input
  (no shared buffers), or say it cannot (ExecuTorch: one session per thread).

Core ML and TensorRT cannot run here; their rows skip with the reason. The Core ML
package still runs here through the numpy reference evaluator (``coreml-reference``).
"""

from __future__ import annotations

import importlib.util
import sys
import threading

import numpy as np
import pytest
import torch

from edgerep.errors import ConfigError, UnsupportedError
from edgerep.exporters import get_exporter
from edgerep.runtimes import get_runtime
from edgerep.runtimes._base import SessionBase
from edgerep.spec import parse_input_spec
from edgerep.zoo.blocks import MobileOneBlock, RepVGGBlock
from edgerep.zoo.nets import randomize_

SHAPE = (2, 1, 16, 16)
# runtime -> (export format, load options)
CASES = {
    "onnxruntime": ("onnx", {"threads": 1}),
    "openvino": ("openvino", {"threads": 1, "inference_precision": "f32"}),
    "executorch": ("executorch", {}),
    "torch": ("pt2", {}),
    "coreml": ("coreml", {}),
    "coreml-reference": ("coreml", {}),
    "tensorrt": ("tensorrt", {}),
}
CANNOT_RUN = {
    "coreml": "Core ML predicts only on macOS; coremltools converts on Linux but cannot run",
    "tensorrt": "TensorRT needs the tensorrt package and an NVIDIA GPU (absent here)",
}


def _cannot_run(name: str) -> str:
    if name == "coreml" and sys.platform != "darwin":
        return CANNOT_RUN[name]
    if name == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
        return CANNOT_RUN[name]
    return get_runtime(name).unavailable_reason()


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        RepVGGBlock(1, 8, stride=2),
        MobileOneBlock(8, 8, 3, groups=8, num_branches=2),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 10),
    )
    model = randomize_(model, seed=3).eval()
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    return model, x


@pytest.fixture(scope="module")
def artifacts(net, tmp_path_factory):
    """format -> artifact path, exported lazily (only for runtimes that run here)."""
    model, x = net
    out = tmp_path_factory.mktemp("conformance")
    cache: dict[str, object] = {}

    def get(fmt: str):
        if fmt not in cache:
            if fmt == "pt2":
                path = out / "model.pt2"
                torch.export.save(torch.export.export(model, (torch.from_numpy(x),)), str(path))
                cache[fmt] = path
            else:
                spec = [parse_input_spec("x:" + "x".join(map(str, SHAPE)))]
                (out / fmt).mkdir()
                art = get_exporter(fmt).export(model, (torch.from_numpy(x),), spec, out / fmt)
                cache[fmt] = art.path
        return cache[fmt]

    return get


@pytest.fixture(params=list(CASES))
def loaded(request, net, artifacts):
    name = request.param
    why = _cannot_run(name)
    if why:
        pytest.skip(f"{name}: {why}")
    fmt, options = CASES[name]
    rt = get_runtime(name)
    caps = rt.capabilities("cpu")  # before any load
    session = rt.load(artifacts(fmt), options=options)
    yield name, rt, caps, session
    session.close()


def test_capabilities_before_load(loaded):
    name, rt, caps, _ = loaded
    assert caps["runtime"] == name and caps["device"] == "cpu"
    assert set(rt.formats) <= set(caps.get("formats", rt.formats))
    with pytest.raises(UnsupportedError):
        rt.capabilities("tpu") if name in ("onnxruntime", "openvino") else rt.load(
            "missing", device="tpu"
        )


def test_outputs_match_torch(loaded, net):
    name, _, _, session = loaded
    model, x = net
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    (name_in,) = session.input_names
    outs = session.run({name_in: x})
    assert len(outs) == 1 and outs[0].shape == ref.shape and outs[0].dtype == np.float32
    scale = np.abs(ref).max()
    assert np.abs(outs[0] - ref).max() <= 1e-4 * scale, name
    # the same call again (reused buffers must not leak into the returned arrays)
    first = outs[0].copy()
    session.run({name_in: -x})
    np.testing.assert_array_equal(outs[0], first)


def test_input_validation(loaded, net):
    name, _, _, session = loaded
    _, x = net
    (name_in,) = session.input_names
    with pytest.raises(ConfigError, match=rf"missing '{name_in}'"):
        session.run({"nope": x})
    with pytest.raises(ConfigError, match="unexpected 'extra'"):
        session.run({name_in: x, "extra": x})
    if name != "torch":  # torch eager casts nothing but accepts float64 modules' inputs
        session.run({name_in: x})  # warm the fast path first
        with pytest.raises(ConfigError, match="float32"):
            session.run({name_in: x.astype(np.float64)})


def test_close_is_idempotent(loaded, net):
    _, _, _, session = loaded
    _, x = net
    (name_in,) = session.input_names
    session.close()
    session.close()
    with pytest.raises(ConfigError, match="closed"):
        session.run({name_in: x})


def test_concurrent_runs_keep_inputs_apart(loaded, net):
    name, _, _, session = loaded
    model, x = net
    assert isinstance(session, SessionBase)
    if name == "executorch":
        with pytest.raises(UnsupportedError, match="one session per thread"):
            session.concurrent_runs(2)
        return
    runs = session.concurrent_runs(2)
    (name_in,) = session.input_names
    inputs = [x, x[::-1].copy() * 2]
    with torch.no_grad():
        refs = [model(torch.from_numpy(v)).numpy() for v in inputs]
    bad: list[str] = []

    def work(i: int) -> None:
        for _ in range(20):
            (y,) = runs[i]({name_in: inputs[i]})
            if np.abs(y - refs[i]).max() > 1e-4 * np.abs(refs[i]).max():
                bad.append(f"thread {i} got another input's output")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad, bad
