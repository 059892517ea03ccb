"""A small conv net trained on scikit-learn's digits, exported to ONNX (shared fixture)."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgerep.zoo import load_digits_tensors, train_classifier


def digits_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


@functools.cache
def _trained_state(seed: int) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, ...]]:
    x_tr, y_tr, x_te, y_te = load_digits_tensors(8, seed=seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny net trains several times faster on a shared CPU
    try:
        torch.manual_seed(seed)
        model = train_classifier(
            digits_net(), x_tr, y_tr, epochs=6, lr=5e-3, batch_size=64, seed=seed
        )
    finally:
        torch.set_num_threads(threads)
    return copy.deepcopy(model.state_dict()), (x_tr, x_te, y_te)


def trained_digits(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(trained model, x_train, x_test, y_test) on 8x8 digits.

    Trained once per process and seed; every call gets its own model and tensors, so a
    test may change them.
    """
    state, tensors = _trained_state(seed)
    model = digits_net()
    model.load_state_dict(copy.deepcopy(state))
    x_tr, x_te, y_te = (t.clone() for t in tensors)
    return model.eval(), x_tr, x_te, y_te


def make_fragile(model: nn.Sequential) -> nn.Sequential:
    """A copy of the digits net with one layer that int8 breaks on its own.

    Channel 3 of ``/0/Conv`` is made dead (zero weights, bias -1, so its ReLU output is
    0 on every input) and ``/2/Conv`` reads that channel with weights 200x its largest
    weight. The float function only loses one channel, but an int8 weight scale set by
    the outlier rounds the real weights of ``/2/Conv`` to zero, per channel or per
    tensor: that layer alone breaks the net, while its input and output tensors keep
    their ranges.
    """
    fragile = copy.deepcopy(model)
    conv0, conv2 = fragile[0], fragile[2]
    assert isinstance(conv0, nn.Conv2d) and isinstance(conv2, nn.Conv2d)
    with torch.no_grad():
        conv0.weight[3] = 0.0
        conv0.bias[3] = -1.0  # type: ignore[index]
        conv2.weight[:, 3] = 200 * conv2.weight.abs().max()
    return fragile


def export_onnx(model: nn.Module, path: Path) -> Path:
    torch.onnx.export(
        model,
        (torch.zeros(1, 1, 8, 8),),
        str(path),
        dynamo=False,
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}},
    )
    return path


def calib_feeds(x: torch.Tensor, n: int = 128) -> list[dict[str, np.ndarray]]:
    return [{"x": x[i : i + 1].numpy()} for i in range(min(n, len(x)))]
