"""A tiny bundle built by hand (no torch export): y = x @ W + b on float32 x[N, 4].

ONNX written with onnx.helper and, when openvino is installed, the same graph as
OpenVINO IR; the manifest is written by `edgerep.bundle.write_manifest`, so it is a
real, checksummed bundle. Fast enough for every test that needs one.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from edgerep.bundle import sha256_file, write_manifest

W = np.arange(12, dtype=np.float32).reshape(4, 3) / 10 - 0.5
B = np.array([0.1, -0.2, 0.3], dtype=np.float32)


def reference(x: np.ndarray) -> np.ndarray:
    return x @ W + B


def make_bundle(directory: Path, *, openvino: bool = True, max_batch: int | None = None) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "onnx").mkdir(exist_ok=True)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 3])
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "B"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [x], [y], [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx_path = directory / "onnx" / "model.onnx"
    onnx.save(model, str(onnx_path))
    artifacts = [_entry("onnx", "onnx/model.onnx", directory, ["onnx/model.onnx"])]
    if openvino and importlib.util.find_spec("openvino") is not None:
        import openvino as ov

        (directory / "openvino").mkdir(exist_ok=True)
        ov.save_model(ov.convert_model(str(onnx_path)), str(directory / "openvino" / "model.xml"))
        artifacts.append(
            _entry(
                "openvino",
                "openvino/model.xml",
                directory,
                ["openvino/model.xml", "openvino/model.bin"],
            )
        )
    write_manifest(
        directory,
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": ["N", 4],
                    "dtype": "float32",
                    **(
                        {"ranges": {"N": {"min": 1, "opt": 1, "max": max_batch}}}
                        if max_batch
                        else {}
                    ),
                }
            ],
            "outputs": [{"name": "output", "shape": ["N", 3], "dtype": "float32"}],
            "artifacts": artifacts,
            "ledger": [],
        },
    )
    return directory


def _entry(fmt: str, rel: str, root: Path, files: list[str]) -> dict:
    return {
        "format": fmt,
        "file": rel,
        "precision": "fp32",
        "status": "verified",
        "sha256": sha256_file(root / rel),
        "tool_versions": {},
        "parity": {},
        "files": files,
    }
