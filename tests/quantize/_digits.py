"""A small conv net trained on scikit-learn's digits, exported to ONNX (shared fixture)."""

from __future__ import annotations

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


def trained_digits(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(trained model, x_train, x_test, y_test) on 8x8 digits."""
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
    return model, x_tr, x_te, y_te


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
