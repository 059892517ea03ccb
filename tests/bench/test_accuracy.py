"""Accuracy: reference metrics on a known case, datasets, metric registry."""

from __future__ import annotations

import numpy as np
import pytest

from edgerep.bench.accuracy import (
    Dataset,
    available_metrics,
    compare_to_reference,
    evaluate,
    get_metric,
    load_dataset,
    register_metric,
)
from edgerep.errors import ConfigError


def test_compare_to_reference_known_case():
    ref = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [0.0, 5.0, 4.0]])
    out = ref.copy()
    out[2] = [0.0, 4.0, 5.0]  # argmax flips in row 2; reference argmax still in its top 2
    out[0, 0] = np.nan
    r = compare_to_reference([out], [ref], names=["logits"], k=2)["logits"]
    assert r["nan"] == 1 and r["inf"] == 0 and r["reference_nonfinite"] == 0
    assert r["max_abs_error"] == pytest.approx(1.0)
    assert r["max_rel_error"] == pytest.approx(1.0 / 5.0)
    # row 0's NaN wins numpy's argmax, row 2 flipped: only row 1 agrees at top-1
    assert r["top1_agreement"] == pytest.approx(1 / 3)
    assert r["topk_agreement"] == pytest.approx(1.0) and r["k"] == 2
    same = compare_to_reference([ref], [ref])["output_0"]
    assert same["cosine"] == pytest.approx(1.0) and same["max_abs_error"] == 0.0
    with pytest.raises(ConfigError, match="shape"):
        compare_to_reference([ref[:2]], [ref])


def test_metrics_and_registry():
    logits = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    labels = np.array([1, 1, 0])
    assert get_metric("top1")(logits, labels) == pytest.approx(1 / 3)
    assert get_metric("top5")(logits, labels) == pytest.approx(1.0)
    assert {"top1", "top5"} <= set(available_metrics())
    with pytest.raises(ConfigError, match="did you mean 'top1'"):
        get_metric("tpo1")
    with pytest.raises(ConfigError, match="already registered"):
        register_metric("top1", get_metric("top1"))
    register_metric("always", lambda lg, lb: 1.0, replace=True)
    ds = Dataset(np.zeros((5, 3), np.float32), np.zeros(5, np.int64), "zeros")
    res = evaluate(
        lambda b: np.tile([1.0, 0.0], (len(b), 1)), ds, metrics=["top1", "always"], batch_size=2
    )
    assert res == {"top1": 1.0, "always": 1.0, "samples": 5.0}


def test_npz_folder_and_factory(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.ones((4, 2), np.float64), labels=[0, 1, 0, 1])
    ds = load_dataset(tmp_path / "d.npz", x_key="images", y_key="labels")
    assert ds.x.dtype == np.float32 and ds.y.tolist() == [0, 1, 0, 1]
    with pytest.raises(ConfigError, match="no array 'x'"):
        load_dataset(tmp_path / "d.npz")

    from PIL import Image

    for label, value in (("cat", 0), ("dog", 255)):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (6 + i, 5), (value, value, value)).save(
                tmp_path / "imgs" / label / f"{i}.png"
            )
    with pytest.raises(ConfigError, match="differ in size"):
        load_dataset(tmp_path / "imgs")
    ds = load_dataset(tmp_path / "imgs", image_size=4, channels=1, mean=0.5, std=0.5)
    assert ds.x.shape == (4, 1, 4, 4) and ds.classes == ("cat", "dog")
    assert ds.y.tolist() == [0, 0, 1, 1]
    assert np.allclose(ds.x[0], -1.0) and np.allclose(ds.x[3], 1.0)

    (tmp_path / "data.py").write_text(
        "import numpy as np\ndef make():\n    return np.zeros((3, 2)), np.array([2, 1, 0])\n"
    )
    ds = load_dataset(f"{tmp_path / 'data.py'}:make")
    assert ds.x.shape == (3, 2) and ds.y.tolist() == [2, 1, 0]
    with pytest.raises(ConfigError, match="does not exist"):
        load_dataset(tmp_path / "missing.npz")


def test_torch_model_and_session_predictors(tmp_path):
    import torch

    from edgerep.bench.accuracy import session_predictor, torch_predictor
    from edgerep.runtimes import get_runtime
    from tests._tiny_bundle import B, W, make_bundle

    bundle = make_bundle(tmp_path / "b", openvino=False)
    x = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    y = (x @ W + B).argmax(1)
    ds = Dataset(x, y, "synthetic")
    lin = torch.nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(W.T.copy()))
        lin.bias.copy_(torch.from_numpy(B))
    assert evaluate(torch_predictor(lin.eval()), ds)["top1"] == 1.0
    session = get_runtime("onnxruntime").load(bundle / "onnx" / "model.onnx")
    assert evaluate(session_predictor(session), ds, batch_size=3)["top1"] == 1.0


def test_bundle_flops_of_an_unfolded_bundle_is_unknown(tmp_path):
    from edgerep.bench.roofline import bundle_flops

    (tmp_path / "fold_report.json").write_text("null\n")
    assert bundle_flops(tmp_path) is None
    (tmp_path / "fold_report.json").write_text('{"flops_after": 1234}\n')
    assert bundle_flops(tmp_path) == 1234
