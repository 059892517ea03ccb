"""Calibration and evaluation samples for quantization, from the user's data.

Sources are the ones `edgerep.bench.load_dataset` reads (an ``.npz``, an image
folder, ``file.py:fn``), plus an ``.npz`` without labels: calibration needs inputs
only. The samples are shuffled with a seed and split in two disjoint parts:
``calib`` (what the backend's calibrator sees) and ``eval`` (what the accuracy
budget is judged on), so that a variant is never scored on the data it was
calibrated with. With fewer than ``2 * min_eval`` samples both parts are the same
samples and `CalibrationData.note` says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgerep.errors import ConfigError

__all__ = ["CalibrationData", "calibration_from_arrays", "load_calibration"]

_MIN_EVAL = 32


@dataclass(frozen=True)
class CalibrationData:
    """Inputs for calibration and for judging a quantized variant.

    Attributes:
        calib: one feed (input name -> array with a leading batch of 1) per sample.
        eval_feeds: input name -> a batch of evaluation samples.
        labels: labels of `eval_feeds`, or None (then variants are judged by
            arg-max agreement with the float model).
        source: where the samples came from.
        note: how the split was made (empty when calib and eval are disjoint).
    """

    calib: list[dict[str, np.ndarray]]
    eval_feeds: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str
    note: str = ""

    def describe(self) -> dict[str, Any]:
        """A JSON-serializable summary for reports."""
        n_eval = len(next(iter(self.eval_feeds.values())))
        return {
            "source": self.source,
            "calib_samples": len(self.calib),
            "eval_samples": n_eval,
            "labels": self.labels is not None,
            "note": self.note,
        }


def calibration_from_arrays(
    x: np.ndarray | Mapping[str, np.ndarray],
    y: np.ndarray | None,
    *,
    input_names: Sequence[str],
    samples: int = 256,
    seed: int = 0,
    source: str = "arrays",
    min_eval: int = _MIN_EVAL,
) -> CalibrationData:
    """Split arrays into calibration feeds and an evaluation batch.

    Args:
        x: the inputs (first axis the sample) for a one-input model, or input
            name -> inputs.
        y: integer labels, one per sample, or None.
        input_names: the model's input names.
        samples: at most this many calibration samples.
        seed: seed of the shuffle.
        source: where the arrays came from (for reports).
        min_eval: the evaluation part gets at least this many samples when there
            are enough for both parts.

    Raises:
        ConfigError: the arrays do not match the inputs, or are empty.
    """
    names = list(input_names)
    arrays = dict(x) if isinstance(x, Mapping) else {names[0]: x} if len(names) == 1 else None
    if arrays is None:
        raise ConfigError(
            f"the model takes {len(names)} inputs ({', '.join(names)}); give an .npz with one "
            "array per input name, not a single array"
        )
    missing = [n for n in names if n not in arrays]
    if missing:
        raise ConfigError(
            f"calibration data {source!r} lacks input(s) {missing}; it holds {sorted(arrays)}"
        )
    arrays = {n: np.asarray(arrays[n]) for n in names}
    counts = {len(a) for a in arrays.values()}
    if len(counts) != 1 or 0 in counts:
        raise ConfigError(
            f"calibration data {source!r}: every input needs the same, nonzero number of "
            f"samples; got {dict((n, len(a)) for n, a in arrays.items())}"
        )
    n = counts.pop()
    if y is not None and len(y) != n:
        raise ConfigError(f"calibration data {source!r}: {n} inputs but {len(y)} labels")
    if samples < 1:
        raise ConfigError(f"calibration samples must be >= 1, got {samples}")
    order = np.random.default_rng(seed).permutation(n)
    note = ""
    if n >= 2 * min_eval:
        n_calib = min(samples, n - min_eval)
        calib_idx, eval_idx = order[:n_calib], order[n_calib:]
    else:
        calib_idx = eval_idx = order[:samples]
        note = (
            f"only {n} samples: calibration and evaluation use the same ones "
            f"(give at least {2 * min_eval} for disjoint parts)"
        )
    calib = [{k: a[i : i + 1] for k, a in arrays.items()} for i in calib_idx]
    eval_feeds = {k: a[eval_idx] for k, a in arrays.items()}
    labels = None if y is None else np.asarray(y)[eval_idx].astype(np.int64)
    return CalibrationData(calib, eval_feeds, labels, source, note)


def load_calibration(
    source: str | Path,
    *,
    input_names: Sequence[str],
    samples: int = 256,
    seed: int = 0,
    dtype: str = "float32",
    x_key: str = "x",
    y_key: str = "y",
    **folder_options: Any,
) -> CalibrationData:
    """Load calibration samples from an ``.npz``, an image folder or ``file.py:fn``.

    An ``.npz`` may hold one array per input name (multi-input models), or ``x_key``
    for a one-input model; labels (``y_key``) are optional. Folders and factories
    are read by `edgerep.bench.load_dataset` (`folder_options`: image_size,
    channels, mean, std).

    Raises:
        ConfigError: the source does not exist or does not match the inputs.
    """
    from edgerep.bench.accuracy import load_dataset

    text = str(source)
    path = Path(text)
    if path.suffix == ".npz" and path.is_file():
        with np.load(path, allow_pickle=False) as data:
            keys = list(data.keys())
            names = list(input_names)
            if all(n in keys for n in names):
                x: Any = {n: data[n].astype(dtype) for n in names}
            elif x_key in keys:
                x = data[x_key].astype(dtype)
            else:
                raise ConfigError(
                    f"{text!r} holds {', '.join(keys)}; expected an array {x_key!r} or one per "
                    f"input ({', '.join(names)}); name it with --x-key"
                )
            y = data[y_key] if y_key in keys else None
        return calibration_from_arrays(
            x, y, input_names=input_names, samples=samples, seed=seed, source=text
        )
    data_set = load_dataset(text, x_key=x_key, y_key=y_key, dtype=dtype, **folder_options)
    return calibration_from_arrays(
        data_set.x, data_set.y, input_names=input_names, samples=samples, seed=seed, source=text
    )
