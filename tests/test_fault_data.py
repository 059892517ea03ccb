"""Fault injection: bad data files through every data path of the CLI.

Each case hands `edgerep bench --data` or `edgerep quantize --calib` a file that is
not what the bundle needs and checks that the run stops before anything runs, with
exit 2 and a message naming the file, the array and what was expected (never
"internal error", exit 1, or a backend's "scale issue", exit 5).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from edgerep.cli import EXIT_OK, EXIT_USAGE, main
from tests._tiny_bundle import B, W, make_bundle

FAST = ["--seconds", "0.05", "--repeats", "1"]
BENCH = [
    *FAST,
    "--min-iters",
    "3",
    "--warmup",
    "1",
    "--no-roofline",
    "--no-progress",
    "--runtime",
    "onnxruntime",
    "--threads",
    "1",
]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("fault-data") / "tiny", openvino=False)


def _x(n: int = 8, features: int = 4) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, features)).astype(np.float32)


def _labels(x: np.ndarray) -> np.ndarray:
    return (x @ W + B).argmax(1)


def _npz(**arrays: object) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        np.savez(d / "data.npz", **arrays)  # type: ignore[arg-type]
        return d / "data.npz"

    return make


def _text_npz(d: Path) -> Path:
    (d / "data.npz").write_text("x,y\n1,2\n")
    return d / "data.npz"


def _empty_file(d: Path) -> Path:
    (d / "data.npz").write_bytes(b"")
    return d / "data.npz"


def _npy_as_npz(d: Path) -> Path:
    with open(d / "data.npz", "wb") as f:
        np.save(f, _x())
    return d / "data.npz"


def _truncated_npz(d: Path) -> Path:
    np.savez(d / "full.npz", x=_x(256), y=np.zeros(256, np.int64))
    blob = (d / "full.npz").read_bytes()
    (d / "data.npz").write_bytes(blob[: len(blob) // 2])
    return d / "data.npz"


def _object_npz(d: Path) -> Path:
    x = np.empty(8, dtype=object)
    x[:] = [np.zeros(4)] * 8
    np.savez(d / "data.npz", x=x)
    return d / "data.npz"


def _factory(body: str) -> Callable[[Path], str]:
    def make(d: Path) -> str:
        (d / "data.py").write_text(f"import numpy as np\n\ndef make():\n    {body}\n")
        return f"{d / 'data.py'}:make"

    return make


def _folder(d: Path, *, corrupt: bool = False) -> Path:
    from PIL import Image

    for label in ("a", "b"):
        (d / "imgs" / label).mkdir(parents=True)
        Image.new("RGB", (4, 4), (9, 9, 9)).save(d / "imgs" / label / "0.png")
    if corrupt:
        (d / "imgs" / "a" / "1.png").write_bytes(b"\x89PNG not really")
    return d / "imgs"


# (case id, data maker, words the message must hold); every case must exit 2
BAD_DATA: list[tuple[str, Callable[[Path], object], tuple[str, ...]]] = [
    ("wrong-width", _npz(x=_x(features=5), y=np.zeros(8, np.int64)), ("'x'", "(8, 5)", "(N, 4)")),
    ("wrong-rank", _npz(x=np.zeros((8, 2, 2), np.float32)), ("'x'", "3 dims", "expected 2")),
    ("vector", _npz(x=np.zeros(8, np.float32)), ("'x'", "1 dims", "expected 2")),
    ("no-samples", _npz(x=np.zeros((0, 4), np.float32)), ("'x'",)),
    ("text-file", _text_npz, ("not an .npz archive", "starts with")),
    ("empty-file", _empty_file, ("not an .npz archive", "empty")),
    ("npy-file", _npy_as_npz, ("not an .npz archive", ".npy")),
    ("truncated", _truncated_npz, ("data.npz",)),
    ("object-array", _object_npz, ("'x'", "Python objects")),
    ("strings", _npz(x=np.array([["a"] * 4] * 8)), ("'x'", "not numeric")),
    ("all-nan", _npz(x=np.full((8, 4), np.nan, np.float32)), ("'x'", "32 NaN", "finite")),
    ("float32-overflow", _npz(x=np.full((8, 4), 1e300)), ("'x'", "beyond the range of float32")),
    ("one-inf", _npz(x=np.where(np.eye(8, 4) > 0, np.inf, 0).astype(np.float32)), ("Inf",)),
    ("missing-x", _npz(images=_x()), ("'x'", "images", "--x-key")),
    ("labels-range", _npz(x=_x(), y=np.full(8, 7)), ("'y'", "label 7", "3 classes")),
    ("labels-negative", _npz(x=_x(), y=np.full(8, -1)), ("'y'", "negative")),
    ("labels-fraction", _npz(x=_x(), y=np.full(8, 0.5)), ("'y'", "whole numbers")),
    ("labels-count", _npz(x=_x(), y=np.zeros(5, np.int64)), ("5 labels", "8")),
    ("labels-2d", _npz(x=_x(), y=np.zeros((8, 3))), ("'y'", "argmax")),
    ("factory-shape", _factory("return np.zeros((8, 6)), None"), ("make()[0]", "(8, 6)")),
    ("factory-nan", _factory("return np.full((8, 4), np.nan), np.zeros(8)"), ("NaN",)),
    ("folder-shape", _folder, ("images", "4 dims")),
    ("folder-corrupt", lambda d: _folder(d, corrupt=True), ("1.png", "not a readable image")),
]
_IDS = [case[0] for case in BAD_DATA]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize(("case", "make", "words"), BAD_DATA, ids=_IDS)
def test_bench_refuses_bad_data(bundle, tmp_path, capsys, case, make, words) -> None:
    source = str(make(tmp_path))
    code, err = _run(["bench", str(bundle), "--data", source, *BENCH], capsys)
    assert code == EXIT_USAGE, err
    assert "internal error" not in err and "ConfigError" in err, err
    # the file and what was wrong with it
    assert Path(source.partition(":")[0]).name in err or "make()" in err, err
    for w in words:
        assert w in err, (w, err)


# labels are optional for calibration: the label cases also hold for quantize, the
# cases of a malformed label array (2-D, fractional) with the same messages
_CALIB = [c for c in BAD_DATA if c[0] not in ("no-samples",)]


@pytest.mark.parametrize(("case", "make", "words"), _CALIB, ids=[c[0] for c in _CALIB])
def test_quantize_refuses_bad_calibration_data(bundle, tmp_path, capsys, case, make, words):
    source = str(make(tmp_path))
    argv = ["quantize", str(bundle), "-o", str(tmp_path / "q"), "--backend", "onnxruntime"]
    code, err = _run([*argv, "--calib", source, *FAST], capsys)
    assert code == EXIT_USAGE, err
    assert "internal error" not in err and "ConfigError" in err, err
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / "q").exists()  # refused before anything was written


def test_quantize_refuses_empty_calibration_data(bundle, tmp_path, capsys) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((0, 4), np.float32))
    argv = ["quantize", str(bundle), "-o", str(tmp_path / "q"), "--backend", "onnxruntime"]
    code, err = _run([*argv, "--calib", str(tmp_path / "d.npz")], capsys)
    assert code == EXIT_USAGE and "nonzero number of samples" in err, err


def test_bench_accepts_unlabelled_data_and_reports_agreement(bundle, tmp_path, capsys):
    np.savez(tmp_path / "d.npz", x=_x(20))
    argv = ["bench", str(bundle), "--compare", f"again={bundle}", "--data", str(tmp_path / "d.npz")]
    code = main([*argv, *BENCH, "--json"])
    out, err = capsys.readouterr()
    assert code == EXIT_OK, err
    report = json.loads(out)
    first, second = report["rows"]
    assert first["accuracy"] is None and second["accuracy"] is None
    assert report["settings"]["data_labels"] is False
    assert report["settings"]["reference_inputs"] == "every sample of the data"
    agreement = second["reference"]["output_0"]
    assert agreement["top1_agreement"] == 1.0 and agreement["max_abs_error"] == 0.0


def test_bench_x_key_and_y_key(bundle, tmp_path, capsys) -> None:
    x = _x(16)
    np.savez(tmp_path / "d.npz", images=x, labels=_labels(x))
    data = ["--data", str(tmp_path / "d.npz"), "--x-key", "images", "--y-key", "labels"]
    code = main(["bench", str(bundle), *data, *BENCH, "--json"])
    out, err = capsys.readouterr()
    assert code == EXIT_OK, err
    (row,) = json.loads(out)["rows"]
    assert row["accuracy"]["top1"] == 1.0 and row["accuracy"]["samples"] == 16
    # a named labels array must exist
    code = main(["bench", str(bundle), *data[:-1], "lbl", *BENCH])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and "no array 'lbl'" in err and "images, labels" in err, err
    # the data flags need --data
    code = main(["bench", str(bundle), "--x-key", "images", *BENCH])
    assert code == EXIT_USAGE and "give --data" in capsys.readouterr().err


def test_bench_fixed_batch_needs_whole_batches(tmp_path, capsys) -> None:
    """A bundle whose batch is fixed at 4 takes 8 samples, not 6."""
    from edgerep.bundle import read_manifest, write_manifest

    bundle = make_bundle(tmp_path / "b4", openvino=False)
    manifest = read_manifest(bundle)
    manifest["inputs"][0]["shape"] = [4, 4]
    for key in ("schema_version", "files", "checksum"):
        manifest.pop(key, None)
    write_manifest(bundle, manifest)
    np.savez(tmp_path / "d.npz", x=_x(6))
    code, err = _run(["bench", str(bundle), "--data", str(tmp_path / "d.npz"), *BENCH], capsys)
    assert code == EXIT_USAGE and "whole batches of 4" in err, err


def test_quantize_bundle_api_refuses_data_that_does_not_fit(bundle, tmp_path) -> None:
    """Data built in Python (not loaded from a file) is checked by quantize_bundle itself."""
    from edgerep.errors import ConfigError
    from edgerep.quantize import calibration_from_arrays, quantize_bundle

    bad = calibration_from_arrays(_x(features=5), None, input_names=["x"], source="mine")
    with pytest.raises(ConfigError, match=r"mine \(calibration part\).*\(8, 5\)"):
        quantize_bundle(bundle, tmp_path / "q", data=bad, backends=["onnxruntime"])
    nan = calibration_from_arrays(np.full((8, 4), np.nan), None, input_names=["x"], source="m")
    with pytest.raises(ConfigError, match="NaN"):
        quantize_bundle(bundle, tmp_path / "q", data=nan, backends=["onnxruntime"])
    assert not (tmp_path / "q").exists()


_CONVERT_CASES = [c for c in BAD_DATA if c[0] in ("wrong-width", "text-file", "all-nan", "strings")]


@pytest.mark.parametrize(
    ("case", "make", "words"), _CONVERT_CASES, ids=[c[0] for c in _CONVERT_CASES]
)
def test_convert_quantize_refuses_bad_calibration_data_before_converting(
    tmp_path, capsys, case, make, words
) -> None:
    (tmp_path / "model.py").write_text(
        "import torch\n\ndef build():\n    return torch.nn.Linear(4, 3)\n\n"
        "EDGEREP_INPUTS = ['x:Nx4']\n"
    )
    source = str(make(tmp_path))
    out = tmp_path / "out"
    argv = ["convert", f"{tmp_path / 'model.py'}:build", "-o", str(out), "--quantize", "int8"]
    code, err = _run([*argv, "--backend", "onnxruntime", "--calib", source, *FAST], capsys)
    assert code == EXIT_USAGE, err
    assert "ConfigError" in err and "internal error" not in err, err
    for w in words:
        assert w in err, (w, err)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_calibration_refuses_a_batch_minimum_above_one(tmp_path) -> None:
    """Calibration feeds one sample per call: N[2..8] cannot take it."""
    from edgerep.errors import ConfigError
    from edgerep.quantize import calibration_from_arrays

    spec = {"name": "x", "shape": ["N", 4], "dtype": "float32", "ranges": {"N": {"min": 2}}}
    with pytest.raises(ConfigError, match=r"at least 2 samples per call"):
        calibration_from_arrays(_x(), None, inputs=[spec], source="d.npz")
