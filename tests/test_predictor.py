"""edgerep.load: backend selection, input validation, thread safety, no torch needed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import edgerep
from edgerep.errors import ConfigError, UnsupportedError, VerificationError
from edgerep.predictor import DEFAULT_PRIORITY
from tests._tiny_bundle import make_bundle, reference


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("pred") / "tiny")


def test_default_priority_prefers_openvino_over_onnxruntime(bundle):
    assert DEFAULT_PRIORITY.index("openvino") < DEFAULT_PRIORITY.index("onnxruntime")
    with edgerep.load(bundle) as p:
        assert p.runtime == "openvino" and p.format == "openvino"
        skipped = dict(p.skipped)
        assert "tensorrt" in skipped  # no built TensorRT artifact in this bundle
        x = np.ones((2, 4), np.float32)
        np.testing.assert_allclose(p.run(x)[0], reference(x), rtol=1e-2, atol=1e-2)


def test_prefer_and_recorded_benchmark(bundle, tmp_path):
    with edgerep.load(bundle, prefer=["onnxruntime"]) as p:
        assert p.runtime == "onnxruntime"
        x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
        out = p({"x": x})
        np.testing.assert_allclose(out["output"], reference(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="did you mean 'onnxruntime'"):
        edgerep.load(bundle, prefer=["onnxruntim"])
    with pytest.raises(UnsupportedError, match="tensorrt"):
        edgerep.load(bundle, prefer=["tensorrt"])
    # a recorded benchmark in the bundle decides when prefer is not given
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    rows = [
        {"runtime": "openvino", "latency": {"stats": {"p50_ms": 0.5}}},
        {"runtime": "onnxruntime", "latency": {"stats": {"p50_ms": 0.1}}},
    ]
    (copy / "bench.json").write_text(json.dumps({"rows": rows}))
    with edgerep.load(copy) as p:
        assert p.runtime == "onnxruntime"


def test_input_validation(bundle):
    with edgerep.load(bundle, prefer=["onnxruntime"]) as p:
        with pytest.raises(ConfigError, match=r"must be float32; got float64.*astype"):
            p.run(np.ones((1, 4)))
        with pytest.raises(ConfigError, match=r"dim 1 must be 4"):
            p.run(np.ones((1, 5), np.float32))
        with pytest.raises(ConfigError, match=r"must have 2 dims"):
            p.run(np.ones((4,), np.float32))
        with pytest.raises(ConfigError, match=r"missing input\(s\) 'x'.*unexpected input 'y'"):
            p.run({"y": np.ones((1, 4), np.float32)})
        assert p.run(np.ones((7, 4), np.float32))[0].shape == (7, 3)  # N is symbolic


def test_symbolic_dims_must_agree_across_inputs():
    from edgerep.predictor import Predictor

    manifest = {
        "inputs": [
            {"name": "a", "shape": ["N", 2], "dtype": "float32"},
            {"name": "b", "shape": ["N", 3], "dtype": "float32"},
        ],
        "outputs": [{"name": "o", "shape": ["N"], "dtype": "float32"}],
    }
    p = Predictor([object()], runtime="x", artifact={"format": "f", "file": "f"}, manifest=manifest)
    with pytest.raises(ConfigError, match="symbolic dim 'N' is 3 in input 'b' but 2"):
        p.check({"a": np.ones((2, 2), np.float32), "b": np.ones((3, 3), np.float32)})


def test_tampered_bundle_is_refused(bundle, tmp_path):
    import shutil

    copy = tmp_path / "t"
    shutil.copytree(bundle, copy)
    (copy / "onnx" / "model.onnx").write_bytes(b"junk")
    with pytest.raises(VerificationError, match="modified"):
        edgerep.load(copy)


@pytest.mark.parametrize("pool_size", [1, 2])
def test_concurrent_calls(bundle, pool_size):
    xs = [np.full((2, 4), i, np.float32) for i in range(32)]
    with (
        edgerep.load(bundle, prefer=["onnxruntime"], pool_size=pool_size) as p,
        ThreadPoolExecutor(max_workers=4) as pool,
    ):
        outs = list(pool.map(lambda x: p.run(x)[0], xs))
    for x, out in zip(xs, outs):
        np.testing.assert_allclose(out, reference(x), rtol=1e-5, atol=1e-5)


class _NonReentrant:
    """A session that fails if two threads are inside `run` at once."""

    def __init__(self):
        import threading

        self.inside = 0
        self.lock = threading.Lock()
        self.max_inside = 0

    def run(self, feeds):
        import time

        with self.lock:
            self.inside += 1
            self.max_inside = max(self.max_inside, self.inside)
        time.sleep(0.002)
        with self.lock:
            self.inside -= 1
        return [feeds["x"]]

    def close(self):
        pass


@pytest.mark.parametrize("pool_size", [1, 3])
def test_pool_bounds_concurrency(pool_size):
    from edgerep.predictor import Predictor

    sessions = [_NonReentrant() for _ in range(pool_size)]
    manifest = {
        "inputs": [{"name": "x", "shape": ["N"], "dtype": "float32"}],
        "outputs": [{"name": "y", "shape": ["N"], "dtype": "float32"}],
    }
    p = Predictor(
        sessions, runtime="fake", artifact={"format": "f", "file": "f"}, manifest=manifest
    )
    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(lambda i: p.run(np.ones(2, np.float32)), range(30)))
    assert all(s.max_inside <= 1 for s in sessions)
    assert sum(s.max_inside for s in sessions) >= 1


def test_load_and_run_without_torch(bundle):
    code = textwrap.dedent(
        f"""
        import importlib.abc, sys

        class BlockTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
                return None

        sys.meta_path.insert(0, BlockTorch())
        import numpy as np
        import edgerep
        p = edgerep.load({str(bundle)!r}, prefer=["onnxruntime"])
        out = p.run(np.ones((2, 4), np.float32))[0]
        assert out.shape == (2, 3), out.shape
        assert "torch" not in sys.modules
        print("ok", p.runtime)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok onnxruntime"
