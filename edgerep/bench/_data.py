"""Data files checked against a model's inputs before anything runs.

Every path that feeds user data to an artifact (``edgerep bench --data``,
``edgerep quantize --calib``, ``convert --quantize``) reads it here or through
`edgerep.bench.load_dataset`, then calls `fit_inputs`: a file that is not what it
claims to be, an array whose shape, dtype or values do not fit the bundle's input
specs, or labels that are not class indices is refused with a `ConfigError` that
names the file, the array, what was expected and what was found, instead of a
runtime's own error in the middle of a run (or a quantizer's "scale issue" on
all-NaN data).

The first axis of every data array is the sample axis: it stands for the input's
first (batch) dimension, which the runner fills with one sample or a batch of
samples; every other dimension must fit the input spec (an int exactly, a symbol
within its range).
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgerep.errors import ConfigError

__all__ = ["check_labels", "classes_of", "fit_inputs", "numeric_array", "read_npz"]

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a member, or an empty archive
_NPY_MAGIC = b"\x93NUMPY"
_KINDS = {"b": "bool", "i": "integer", "u": "integer", "f": "float"}


def read_npz(path: str | Path, names: Iterable[str]) -> tuple[list[str], dict[str, np.ndarray]]:
    """The array names of the ``.npz`` at `path` and the arrays among `names` it holds.

    Never unpickles: object arrays are refused.

    Raises:
        ConfigError: the file cannot be read, is not an ``.npz`` archive (a text
            file, a ``.npy`` array, a truncated or corrupt zip), or a requested
            array cannot be read; the message names the file and the array.
    """
    text = str(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise ConfigError(f"cannot read data file {text!r}: {e.strerror or e}") from e
    if not magic.startswith(_ZIP_MAGIC):
        hint = (
            "it is a single .npy array; save it with numpy.savez(path, x=array)"
            if magic.startswith(_NPY_MAGIC)
            else "write one with numpy.savez(path, x=inputs, y=labels)"
        )
        what = "it is empty" if not magic else f"it starts with {magic!r}"
        raise ConfigError(
            f"data file {text!r} is not an .npz archive (a zip of .npy arrays; {what}); {hint}"
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = list(data.files)
            arrays = {}
            for name in dict.fromkeys(names):
                if name in keys:
                    arrays[name] = _read_member(data, name, text)
    except ConfigError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise ConfigError(
            f"data file {text!r} is not a readable .npz archive ({type(e).__name__}: {e}); "
            "rewrite it with numpy.savez"
        ) from e
    return keys, arrays


def _read_member(data: Any, name: str, source: str) -> np.ndarray:
    try:
        return np.asarray(data[name])
    except ValueError as e:
        if "allow_pickle" in str(e) or "pickled" in str(e):
            raise ConfigError(
                f"data file {source!r}, array {name!r}: holds Python objects (a pickled "
                "object array), which edgerep never loads; store numbers (e.g. "
                "numpy.asarray(values, dtype=numpy.float32))"
            ) from e
        raise ConfigError(
            f"data file {source!r}, array {name!r} cannot be read ({e}); rewrite it with "
            "numpy.savez"
        ) from e
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise ConfigError(
            f"data file {source!r}, array {name!r} cannot be read ({type(e).__name__}: {e}); "
            "the file is truncated or corrupt; rewrite it with numpy.savez"
        ) from e


def numeric_array(value: Any, *, source: str, array: str, dtype: str | None = None) -> np.ndarray:
    """`value` as a numeric numpy array (cast to `dtype` when given).

    Raises:
        ConfigError: `value` is not numbers (strings, objects, ragged lists).
    """
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"data {source!r}, array {array!r}: not a rectangular array of numbers ({e})"
        ) from e
    if arr.dtype.kind not in _KINDS:
        raise ConfigError(
            f"data {source!r}, array {array!r}: dtype {arr.dtype} is not numeric; expected "
            "numbers (bool, integer or float)"
        )
    if dtype is None:
        return arr
    with np.errstate(over="ignore"):  # reported below, with the array's name
        out = arr.astype(dtype, copy=False)
    if (
        out.dtype.kind == "f"
        and arr.dtype.kind in "iuf"
        and out.dtype.itemsize < arr.dtype.itemsize
    ):
        # finite values beyond the target's range become Inf: say so, not "Inf in the data"
        grown = int(np.isinf(out).sum()) - int(np.isinf(arr).sum())
        if grown:
            raise ConfigError(
                f"data {source!r}, array {array!r}: {grown} finite {arr.dtype} values are "
                f"beyond the range of {out.dtype} (max {np.finfo(out.dtype).max:.3g}); scale "
                "the data"
            )
    return out


def classes_of(outputs: Sequence[Mapping[str, Any]]) -> int | None:
    """The number of classes of a classifier's first output (N, C), when C is fixed."""
    if not outputs:
        return None
    shape = list(outputs[0].get("shape") or [])
    if len(shape) == 2 and isinstance(shape[1], int) and shape[1] > 1:
        return int(shape[1])
    return None


def check_labels(
    labels: Any,
    samples: int,
    *,
    source: str,
    array: str = "y",
    classes: int | None = None,
) -> np.ndarray:
    """`labels` as int64 class indices, one per sample.

    Raises:
        ConfigError: not one integer per sample, negative, NaN, fractional, or (when
            `classes` is known) not below the number of classes.
    """
    y = numeric_array(labels, source=source, array=array)
    where = f"data {source!r}, labels {array!r}"
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ConfigError(
            f"{where}: shape {tuple(y.shape)}, expected ({samples},): one class index per "
            "sample (one-hot labels: numpy.argmax(y, axis=1))"
        )
    if len(y) != samples:
        raise ConfigError(f"{where}: {len(y)} labels for {samples} samples; give one per sample")
    if y.dtype.kind == "f":
        bad = ~np.isfinite(y) | (y != np.round(y))
        if bad.any():
            i = int(np.argmax(bad))
            raise ConfigError(
                f"{where}: {int(bad.sum())} of {len(y)} labels are not whole numbers (first: "
                f"{y[i]!r} at sample {i}); labels are class indices 0..C-1"
            )
    y = y.astype(np.int64)
    problems = []
    if len(y) and y.min() < 0:
        problems.append(f"negative label {int(y.min())}")
    if classes is not None and len(y) and y.max() >= classes:
        problems.append(
            f"label {int(y.max())} but the model has {classes} classes (0..{classes - 1})"
        )
    if problems:
        raise ConfigError(f"{where}: {'; '.join(problems)}; labels are class indices 0..C-1")
    return y


def _range(spec: Mapping[str, Any], symbol: str) -> tuple[int, int | None]:
    r = (spec.get("ranges") or {}).get(symbol) or {}
    lo = r.get("min", 1)
    hi = r.get("max")
    return int(lo), None if hi is None else int(hi)


def _shape_text(spec: Mapping[str, Any]) -> str:
    parts = []
    for d in spec["shape"]:
        if isinstance(d, str):
            lo, hi = _range(spec, d)
            parts.append(d if (lo, hi) == (1, None) else f"{d}[{lo}..{'' if hi is None else hi}]")
        else:
            parts.append(str(d))
    return "(" + ", ".join(parts) + ")"


def _problems(
    arr: np.ndarray, spec: Mapping[str, Any], batch: int | None, one_at_a_time: bool
) -> list[str]:
    """What is wrong with `arr` (samples first) as data for input `spec`."""
    shape = list(spec["shape"])
    got = tuple(arr.shape)
    expected = _shape_text(spec)
    if arr.dtype.kind not in _KINDS:
        return [f"dtype {arr.dtype} is not numeric; input {spec['name']!r} takes {spec['dtype']}"]
    if arr.ndim != len(shape):
        return [
            f"shape {got} has {arr.ndim} dims, expected {len(shape)} {expected} (samples first, "
            f"standing for dim 0)"
        ]
    out = []
    n = got[0] if got else 0
    if n == 0:
        out.append(f"shape {got} holds no samples")
    for i, (want, have) in enumerate(zip(shape[1:], got[1:]), start=1):
        if isinstance(want, int):
            if have != want:
                out.append(f"shape {got}, expected {expected}: dim {i} is {have}, not {want}")
        else:
            lo, hi = _range(spec, want)
            if have < lo or (hi is not None and have > hi):
                out.append(
                    f"shape {got}, expected {expected}: dim {i} is {have}, outside {want}'s "
                    f"range {lo}..{'' if hi is None else hi}"
                )
    lead = shape[0] if shape else None
    if isinstance(lead, int) and n:
        if one_at_a_time and lead != 1:
            out.append(
                f"input {spec['name']!r} has a fixed batch of {lead} but calibration feeds one "
                "sample at a time; export it with a dynamic batch (e.g. N as dim 0)"
            )
        elif not one_at_a_time and n % lead:
            out.append(
                f"{n} samples do not fill whole batches of {lead} (input {spec['name']!r} has a "
                f"fixed batch of {lead}); give a multiple of {lead}"
            )
    elif isinstance(lead, str) and n and one_at_a_time:
        lo, _ = _range(spec, lead)
        if lo > 1:
            out.append(
                f"input {spec['name']!r} takes at least {lo} samples per call ({lead}[{lo}..]) "
                "but calibration feeds one sample at a time; export it with a minimum of 1"
            )
    elif isinstance(lead, str) and n:
        lo, _ = _range(spec, lead)
        size = batch or n
        rest = n % size
        if n < lo or (rest and rest < lo):
            out.append(
                f"{n} samples leave a batch of {rest or n}, below {lead}'s minimum of {lo}; "
                f"give a multiple of {size}"
            )
    if spec.get("dtype", "float32").startswith(("int", "uint")) and arr.dtype.kind == "f":
        frac = ~np.isfinite(arr) | (arr != np.round(arr))
        if frac.any():
            out.append(
                f"{int(frac.sum())} values are not whole numbers but input {spec['name']!r} is "
                f"{spec['dtype']}"
            )
    elif arr.dtype.kind == "f":
        nan, inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
        if nan or inf:
            first = int(np.argmax(~np.isfinite(arr).reshape(n, -1).all(axis=1))) if n else 0
            out.append(
                f"{nan} NaN and {inf} Inf values of {arr.size} (first in sample {first}); "
                "data must be finite"
            )
    return out


def fit_inputs(
    arrays: Mapping[str, Any],
    inputs: Sequence[Mapping[str, Any]],
    *,
    source: str,
    target: str = "the model",
    array_names: Mapping[str, str] | None = None,
    batch: int | None = None,
    one_at_a_time: bool = False,
) -> dict[str, np.ndarray]:
    """Check data arrays against input specs and cast them to the inputs' dtypes.

    Args:
        arrays: input name -> its data (first axis the sample), for every input.
        inputs: the input specs, as in a bundle manifest (``name``, ``shape``,
            ``dtype``, optional ``ranges``).
        source: the data file or folder (for messages).
        target: what the data is for (for messages), e.g. ``bundle 'tiny'``.
        array_names: input name -> the array's name in the source (default the
            input name).
        batch: samples per call of the runner (checked against the ranges).
        one_at_a_time: the runner feeds one sample per call (calibration).

    Returns:
        input name -> the array cast to the input's dtype.

    Raises:
        ConfigError: every problem at once, each naming the array, expected and got.
    """
    names = dict(array_names or {})
    problems = []
    missing = [s["name"] for s in inputs if s["name"] not in arrays]
    if missing:
        problems.append(
            f"no array for input(s) {', '.join(map(repr, missing))} (it holds "
            f"{', '.join(map(repr, arrays)) or 'none'})"
        )
    counts = {}
    out = {}
    for spec in inputs:
        name = spec["name"]
        if name not in arrays:
            continue
        arr = np.asarray(arrays[name])
        label = names.get(name, name)
        found = _problems(arr, spec, batch, one_at_a_time)
        problems += [f"array {label!r} (input {name!r}): {p}" for p in found]
        if not found:
            counts[label] = len(arr)
            out[name] = arr.astype(spec.get("dtype", "float32"), copy=False)
    if len(set(counts.values())) > 1:
        problems.append(f"arrays hold different numbers of samples: {counts}")
    if problems:
        raise ConfigError(f"data {source!r} does not fit {target}: " + "; ".join(problems))
    return out
