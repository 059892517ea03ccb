"""Demo data (scikit-learn's bundled digits, no network) and a tiny training loop."""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from edgerep.errors import ConfigError, MissingDependencyError

__all__ = ["accuracy", "load_digits_tensors", "train_classifier"]

log = logging.getLogger(__name__)


def load_digits_tensors(
    size: int = 32, *, seed: int = 0, test_fraction: float = 0.25
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 8x8 digits of `sklearn.datasets.load_digits`, as image tensors.

    Images are scaled to [0, 1], upsampled bilinearly to ``sizexsize``, then
    normalized with the mean and standard deviation of the training split. The
    split is stratified by class and deterministic in `seed`.

    Args:
        size: output height and width.
        seed: seed of the train/test split.
        test_fraction: share of the 1797 samples held out for testing, in (0, 1).

    Returns:
        ``(x_train, y_train, x_test, y_test)``: x float32 (N, 1, size, size), y int64.

    Raises:
        MissingDependencyError: if scikit-learn is not installed.
        ConfigError: if `size` or `test_fraction` is out of range.
    """
    if size < 1:
        raise ConfigError(f"size must be a positive number of pixels; got {size}")
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must lie strictly between 0 and 1; got {test_fraction}")
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise MissingDependencyError("scikit-learn", "demo", "the digits demo data") from e

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(),
        test_size=test_fraction,
        random_state=seed,
        stratify=labels.numpy(),
    )
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    x_train, x_test = images[train_idx], images[test_idx]
    mean, std = x_train.mean(), x_train.std()
    x_train = ((x_train - mean) / std).contiguous()
    x_test = ((x_test - mean) / std).contiguous()
    return x_train, labels[train_idx], x_test, labels[test_idx]


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    max_seconds: float | None = None,
) -> nn.Module:
    """Train `model` in place with Adam and cross-entropy; return it in eval mode.

    Batches are drawn from a permutation seeded by `seed` (the global RNG is not
    touched); a final batch of one sample is skipped because BatchNorm cannot
    train on it.

    Args:
        model: a classifier mapping ``x`` to logits (N, classes).
        x: inputs, first dimension the sample.
        y: int64 class labels, one per sample.
        epochs: passes over the data.
        lr: Adam learning rate.
        batch_size: samples per step.
        seed: seed of the shuffling.
        max_seconds: stop after the step that exceeds this wall time.

    Returns:
        `model`, trained, in eval mode.
    """
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ConfigError(
            f"train_classifier needs epochs >= 1, batch_size >= 1 and lr > 0; got "
            f"epochs={epochs}, batch_size={batch_size}, lr={lr}"
        )
    if len(x) != len(y):
        raise ConfigError(f"x has {len(x)} samples but y has {len(y)}")
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.perf_counter()
    model.train()
    out_of_time = False
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        total, steps = 0.0, 0
        for i in range(0, len(x), batch_size):
            idx = order[i : i + batch_size]
            if len(idx) < 2:
                continue
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, steps = total + loss.item(), steps + 1
            if max_seconds is not None and time.perf_counter() - start > max_seconds:
                out_of_time = True
                break
        log.debug("epoch %d: mean loss %.4f over %d steps", epoch, total / max(steps, 1), steps)
        if out_of_time:
            log.info("train_classifier stopped after %.1f s (max_seconds)", max_seconds)
            break
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 512) -> float:
    """Top-1 accuracy of `model` on ``(x, y)``, in [0, 1]; the model's mode is left as is."""
    if len(x) == 0:
        raise ConfigError("accuracy needs at least one sample")
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(dim=1) == y[i : i + batch_size]).sum())
    return correct / len(x)
