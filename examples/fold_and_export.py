"""Fold a RepVGG-A0 from the zoo, print the report, export to ONNX and run it with onnxruntime."""

import numpy as np
import torch

from edgerep.fold import fold
from edgerep.pipeline import convert
from edgerep.runtimes import get_runtime
from edgerep.spec import parse_input_spec
from edgerep.zoo import randomize_, repvgg_a0

# random weights and BN statistics: default BN statistics would make any fold look exact
model = randomize_(repvgg_a0(), seed=0).eval()
x = torch.randn(1, 3, 224, 224)

folded, report = fold(model, x)  # `model` is not modified
print(report.to_text())

# convert() folds again, exports, and checks the ONNX model against `model` through onnxruntime
specs = [parse_input_spec("x:Nx3x224x224")]  # N: a dynamic batch dimension
bundle, result = convert(model, specs, to=("onnx",), out_dir="repvgg-a0-onnx", overwrite=True)
print(result.status_table())

session = get_runtime("onnxruntime").load(bundle / "onnx" / "model.onnx")
(logits,) = session.run({"x": x.numpy()})
with torch.no_grad():
    expected, from_folded = model(x).numpy(), folded(x).numpy()
scale = np.abs(expected).max()  # errors as a fraction of the largest logit
print(f"torch folded vs original: {np.abs(from_folded - expected).max() / scale:.1e}")
print(f"onnxruntime vs original:  {np.abs(logits - expected).max() / scale:.1e}")
