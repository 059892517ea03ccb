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

    def check(self, inputs: Sequence[Mapping[str, Any]], *, target: str = "the bundle") -> None:
        """Refuse samples that do not fit `inputs` (manifest-style input specs).

        Raises:
            ConfigError: a calibration or evaluation array has the wrong shape or
                dtype, or values that are not finite (see `edgerep.bench._data`).
        """
        from edgerep.bench._data import fit_inputs

        if not self.calib:
            raise ConfigError(f"calibration data {self.source!r} holds no calibration sample")
        calib = {k: np.concatenate([f[k] for f in self.calib]) for k in self.calib[0]}
        for part, arrays in (("calibration", calib), ("evaluation", self.eval_feeds)):
            fit_inputs(
                arrays,
                inputs,
                source=f"{self.source} ({part} part)",
                target=target,
                one_at_a_time=True,
            )

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
    input_names: Sequence[str] | None = None,
    inputs: Sequence[Mapping[str, Any]] | None = None,
    samples: int = 256,
    seed: int = 0,
    source: str = "arrays",
    min_eval: int = _MIN_EVAL,
    array_names: Mapping[str, str] | None = None,
    label_name: str = "y",
    classes: int | None = None,
) -> CalibrationData:
    """Split arrays into calibration feeds and an evaluation batch.

    Args:
        x: the inputs (first axis the sample) for a one-input model, or input
            name -> inputs.
        y: integer labels, one per sample, or None.
        input_names: the model's input names (or give `inputs`).
        inputs: the model's input specs as in a bundle manifest (``name``,
            ``shape``, ``dtype``, ``ranges``): the arrays are checked against them
            (shape, dtype, finite values) and cast to their dtypes before any run.
        samples: at most this many calibration samples.
        seed: seed of the shuffle.
        source: where the arrays came from (for reports and messages).
        min_eval: the evaluation part gets at least this many samples when there
            are enough for both parts.
        array_names: input name -> the array's name in `source` (for messages).
        label_name: the labels' name in `source` (for messages).
        classes: the model's number of classes, when known: labels must be below it.

    Raises:
        ConfigError: the arrays do not match the inputs, are empty or not finite,
            or the labels are not class indices; the message names the array.
    """
    from edgerep.bench._data import check_labels, fit_inputs, numeric_array

    if input_names is None and inputs is None:
        raise ConfigError("give the model's input_names or its input specs (inputs)")
    names = [str(i["name"]) for i in inputs] if inputs is not None else list(input_names or [])
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
    labels = dict(array_names or {})
    arrays = {n: numeric_array(arrays[n], source=source, array=labels.get(n, n)) for n in names}
    counts = {len(a) if a.ndim else 0 for a in arrays.values()}
    if len(counts) != 1 or 0 in counts:
        raise ConfigError(
            f"calibration data {source!r}: every input needs the same, nonzero number of "
            f"samples; got {dict((labels.get(n, n), a.shape) for n, a in arrays.items())}"
        )
    n = counts.pop()
    if y is not None and len(y) != n:
        raise ConfigError(f"calibration data {source!r}: {n} inputs but {len(y)} labels")
    if samples < 1:
        raise ConfigError(f"calibration samples must be >= 1, got {samples}")
    if inputs is not None:
        arrays = fit_inputs(
            arrays,
            inputs,
            source=source,
            target="the bundle's inputs",
            array_names=labels,
            one_at_a_time=True,
        )
    y = None if y is None else check_labels(y, n, source=source, array=label_name, classes=classes)
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
    eval_labels = None if y is None else y[eval_idx]
    return CalibrationData(calib, eval_feeds, eval_labels, source, note)


def load_calibration(
    source: str | Path,
    *,
    input_names: Sequence[str] | None = None,
    inputs: Sequence[Mapping[str, Any]] | None = None,
    samples: int = 256,
    seed: int = 0,
    dtype: str = "float32",
    x_key: str = "x",
    y_key: str = "y",
    classes: int | None = None,
    **folder_options: Any,
) -> CalibrationData:
    """Load calibration samples from an ``.npz``, an image folder or ``file.py:fn``.

    An ``.npz`` may hold one array per input name (multi-input models), or ``x_key``
    for a one-input model; labels (``y_key``) are optional. Folders and factories
    are read by `edgerep.bench.load_dataset` (`folder_options`: image_size,
    channels, mean, std). With `inputs` (the bundle's input specs) every array is
    checked against them before anything runs (see `calibration_from_arrays`).

    Raises:
        ConfigError: the source does not exist, is not what it claims to be, or
            does not match the inputs; the message names the file and the array.
    """
    from edgerep.bench._data import numeric_array, read_npz
    from edgerep.bench.accuracy import load_dataset

    if input_names is None and inputs is None:
        raise ConfigError("give the model's input_names or its input specs (inputs)")
    names = [str(i["name"]) for i in inputs] if inputs is not None else list(input_names or [])
    text = str(source)
    path = Path(text)
    common: dict[str, Any] = {
        "input_names": None if inputs is not None else names,
        "inputs": inputs,
        "samples": samples,
        "seed": seed,
        "source": text,
        "classes": classes,
    }
    if path.suffix == ".npz" and path.is_file():
        keys, arrays = read_npz(path, [*names, x_key, y_key])
        if all(n in keys for n in names):
            x: Any = {n: numeric_array(arrays[n], source=text, array=n, dtype=dtype) for n in names}
            array_names = {n: n for n in names}
        elif x_key in keys:
            x = numeric_array(arrays[x_key], source=text, array=x_key, dtype=dtype)
            array_names = {names[0]: x_key}
        else:
            raise ConfigError(
                f"{text!r} holds {', '.join(keys) or 'no array'}; expected an array {x_key!r} "
                f"or one per input ({', '.join(names)}); name it with --x-key"
            )
        return calibration_from_arrays(
            x, arrays.get(y_key), array_names=array_names, label_name=y_key, **common
        )
    # folders and factories: labels are optional for calibration, whatever y_key says
    data_set = load_dataset(text, x_key=x_key, dtype=dtype, **folder_options)
    return calibration_from_arrays(
        data_set.x,
        data_set.y,
        array_names={names[0]: data_set.x_name},
        label_name=data_set.y_name,
        **common,
    )
