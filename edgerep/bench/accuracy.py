"""Accuracy beside latency: agreement with reference outputs, and task metrics on a dataset.

Two questions, kept apart:

- **Does the artifact compute what the reference computes?** `compare_to_reference`
  gives, per output, the max absolute error, the max relative error (divided by
  ``max |reference|``, the output's scale, as `edgerep.parity` does: element-wise
  ratios are meaningless near zeros), the cosine similarity, NaN/Inf counts, and for
  logits (N, C) the top-1 and top-k agreement of the two argmax rankings.
- **How good is it at the task?** `evaluate` runs a predictor (any callable batch ->
  logits: a bundle artifact's session through `session_predictor`, a PyTorch model
  through `torch_predictor`) over a `Dataset` and applies metrics from a registry
  (``top1``, ``top5`` built in; `register_metric` adds more).

Datasets (`load_dataset`): an ``.npz`` with ``x``/``y`` (or named arrays), an image
folder with one subfolder per class (decoded with Pillow, resized, scaled to [0, 1]
and normalized), or a Python factory ``file.py:fn`` returning ``(x, y)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgerep.errors import ConfigError, MissingDependencyError, SourceError, did_you_mean

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "Dataset",
    "available_metrics",
    "compare_to_reference",
    "evaluate",
    "get_metric",
    "load_dataset",
    "register_metric",
    "score",
    "session_predictor",
    "torch_predictor",
]

Metric = Callable[["np.ndarray", "np.ndarray"], float]
_IMAGE_SUFFIXES = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
)


# --- reference outputs ---------------------------------------------------------------------


def _topk(logits: np.ndarray, k: int) -> np.ndarray:
    import numpy as np

    k = min(k, logits.shape[1])
    return np.argsort(-logits, axis=1, kind="stable")[:, :k]


def compare_to_reference(
    outputs: Sequence[np.ndarray],
    references: Sequence[np.ndarray],
    *,
    names: Sequence[str] | None = None,
    k: int = 5,
) -> dict[str, dict[str, Any]]:
    """Per-output error and agreement of `outputs` against `references`.

    Args:
        outputs: the outputs to judge.
        references: the reference outputs, same order and shapes.
        names: output names (default ``output_0``, ...).
        k: the k of top-k agreement.

    Returns:
        Per output name: ``max_abs_error``, ``max_rel_error``, ``cosine``,
        ``nan``, ``inf`` (counts in the output), ``reference_nonfinite``, and for
        2-D outputs (N, C) ``top1_agreement`` (share of rows with the same argmax)
        and ``topk_agreement`` (share of rows whose reference argmax is in the
        output's top k). Errors are over finite entries; NaN when none is.

    Raises:
        ConfigError: counts or shapes differ.
    """
    import numpy as np

    if len(outputs) != len(references):
        raise ConfigError(f"{len(outputs)} outputs but {len(references)} references")
    names = list(names) if names is not None else [f"output_{i}" for i in range(len(outputs))]
    result: dict[str, dict[str, Any]] = {}
    for name, out, ref in zip(names, outputs, references):
        a = np.asarray(out, dtype=np.float64)
        r = np.asarray(ref, dtype=np.float64)
        if a.shape != r.shape:
            raise ConfigError(f"output {name!r} has shape {a.shape}, its reference {r.shape}")
        finite = np.isfinite(a) & np.isfinite(r)
        row: dict[str, Any] = {
            "nan": int(np.isnan(a).sum()),
            "inf": int(np.isinf(a).sum()),
            "reference_nonfinite": int((~np.isfinite(r)).sum()),
        }
        if finite.any():
            diff = np.abs(a[finite] - r[finite])
            scale = max(float(np.abs(r[finite]).max()), 1e-12)
            fa, fr = a[finite], r[finite]
            na, nr = float(np.linalg.norm(fa)), float(np.linalg.norm(fr))
            cosine = 1.0 if na == nr == 0.0 else float(fa @ fr / (na * nr)) if na and nr else 0.0
            row.update(
                max_abs_error=float(diff.max()),
                max_rel_error=float(diff.max()) / scale,
                cosine=cosine,
            )
        else:
            row.update(max_abs_error=float("nan"), max_rel_error=float("nan"), cosine=float("nan"))
        if a.ndim == 2 and a.shape[0] > 0 and a.shape[1] > 1:
            ref_top = r.argmax(axis=1)
            row["top1_agreement"] = float((a.argmax(axis=1) == ref_top).mean())
            row["topk_agreement"] = float((_topk(a, k) == ref_top[:, None]).any(axis=1).mean())
            row["k"] = min(k, a.shape[1])
        result[name] = row
    return result


# --- metrics -------------------------------------------------------------------------------

_METRICS: dict[str, Metric] = {}


def register_metric(name: str, metric: Metric, *, replace: bool = False) -> None:
    """Register ``metric(logits, labels) -> float`` under `name`.

    Raises:
        ConfigError: the name is taken and `replace` is False.
    """
    if name in _METRICS and not replace:
        raise ConfigError(
            f"a metric named {name!r} is already registered; pass replace=True or choose "
            "another name"
        )
    _METRICS[name] = metric


def get_metric(name: str) -> Metric:
    """The metric registered as `name`.

    Raises:
        ConfigError: unknown name (with a did-you-mean).
    """
    if name not in _METRICS:
        raise ConfigError(
            f"unknown metric {name!r};{did_you_mean(name, _METRICS)} known: "
            f"{', '.join(sorted(_METRICS))}"
        )
    return _METRICS[name]


def available_metrics() -> list[str]:
    """Registered metric names, sorted."""
    return sorted(_METRICS)


def _topk_accuracy(k: int) -> Metric:
    def metric(logits: np.ndarray, labels: np.ndarray) -> float:
        import numpy as np

        logits = np.asarray(logits)
        if logits.ndim != 2:
            raise ConfigError(
                f"top{k} needs logits of shape (N, classes); got shape {logits.shape}"
            )
        labels = np.asarray(labels).reshape(-1)
        return float((_topk(logits, k) == labels[:, None]).any(axis=1).mean())

    metric.__name__ = f"top{k}"
    return metric


register_metric("top1", _topk_accuracy(1))
register_metric("top5", _topk_accuracy(5))


# --- datasets ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    """Inputs, and labels when the source has them.

    Attributes:
        x: inputs, first dimension the sample.
        y: integer labels, one per sample, or None (unlabelled data: agreement
            with a reference only, no task metric).
        source: where it came from (for reports).
        classes: class names by label, when the source has them (image folders).
        x_name, y_name: the arrays' names in the source (for messages).
    """

    x: np.ndarray
    y: np.ndarray | None
    source: str
    classes: tuple[str, ...] = ()
    x_name: str = "x"
    y_name: str = "y"

    def __post_init__(self) -> None:
        if self.y is not None and len(self.x) != len(self.y):
            raise ConfigError(
                f"dataset {self.source!r} has {len(self.x)} inputs ({self.x_name!r}) but "
                f"{len(self.y)} labels ({self.y_name!r})"
            )
        if len(self.x) == 0:
            raise ConfigError(f"dataset {self.source!r} is empty (array {self.x_name!r})")

    @property
    def labelled(self) -> bool:
        """Whether the dataset has labels."""
        return self.y is not None

    def __len__(self) -> int:
        return len(self.x)


def load_dataset(
    source: str | Path,
    *,
    x_key: str = "x",
    y_key: str | None = None,
    image_size: int | tuple[int, int] | None = None,
    channels: int = 3,
    mean: float | Sequence[float] = 0.0,
    std: float | Sequence[float] = 1.0,
    dtype: str = "float32",
) -> Dataset:
    """Load a dataset from an ``.npz``, an image folder or ``file.py:fn``.

    Args:
        source: the ``.npz`` file, the folder (one subfolder per class, sorted by
            name: label 0 is the first), or ``path/to/file.py:fn`` where ``fn()``
            returns ``(x, y)`` arrays (or tensors; ``y`` may be None).
        x_key: the inputs array of an ``.npz``.
        y_key: the labels array of an ``.npz``; None (default): ``"y"`` when the
            file has it, else the data is unlabelled. A named `y_key` must exist.
        image_size: folder images are resized to this (height, width); required
            for folders whose images differ in size.
        channels: 1 (grayscale) or 3 (RGB) for folder images.
        mean, std: folder images, after scaling to [0, 1], become ``(v - mean) / std``
            (per channel when sequences).
        dtype: dtype of the inputs.

    Raises:
        ConfigError: the source does not exist or is malformed (not an ``.npz``
            archive, arrays missing, not numeric, labels not class indices); the
            message names the file and the array.
        SourceError: the factory cannot be imported or fails.
        MissingDependencyError: Pillow is missing for an image folder.
    """
    from edgerep.bench._data import check_labels, numeric_array, read_npz

    text = str(source)
    from edgerep.source import parse_source

    path, fn = parse_source(text)
    if fn is not None and path.suffix == ".py":
        x, y = _from_factory(path, fn)
        what = f"{path.name}:{fn}()"
        x = numeric_array(x, source=text, array=f"{what}[0]", dtype=dtype)
        labels = None if y is None else check_labels(y, len(x), source=text, array=f"{what}[1]")
        return Dataset(x, labels, text, x_name=f"{what}[0]", y_name=f"{what}[1]")
    if path.is_dir():
        return _from_folder(path, image_size, channels, mean, std, dtype)
    if path.suffix == ".npz" and path.is_file():
        wanted_y = y_key or "y"
        keys, arrays = read_npz(path, [x_key, wanted_y])
        missing = [k for k in (x_key, y_key) if k is not None and k not in keys]
        if missing:
            raise ConfigError(
                f"{text!r} has no array {missing[0]!r}; it holds {', '.join(keys) or 'none'}; "
                "name the arrays with x_key/y_key (CLI: --x-key K --y-key K)"
            )
        x = numeric_array(arrays[x_key], source=text, array=x_key, dtype=dtype)
        y = arrays.get(wanted_y)
        labels = None if y is None else check_labels(y, len(x), source=text, array=wanted_y)
        return Dataset(x, labels, text, x_name=x_key, y_name=wanted_y)
    raise ConfigError(
        f"dataset {text!r} does not exist or is not understood; give an .npz with an x array "
        "(and y labels), an image folder with one subfolder per class, or path/to/file.py:fn "
        "returning (x, y)"
    )


def _from_factory(path: Path, fn: str) -> tuple[Any, Any]:
    from edgerep.source import _import_file

    if not path.is_file():
        raise ConfigError(f"dataset factory file {str(path)!r} does not exist")
    module = _import_file(path.resolve())
    factory = getattr(module, fn, None)
    if not callable(factory):
        raise SourceError(f"{str(path)!r} has no callable {fn!r}")
    try:
        got = factory()
    except Exception as e:
        raise SourceError(f"dataset factory {path}:{fn} failed: {type(e).__name__}: {e}") from e
    if isinstance(got, Mapping):
        got = (got.get("x"), got.get("y"))
    if not (isinstance(got, tuple | list) and len(got) == 2):
        raise SourceError(
            f"dataset factory {path}:{fn} must return (x, y) or {{'x': ..., 'y': ...}}; "
            f"got {type(got).__name__}"
        )
    # tensors (even ones that require grad or live on a GPU) become numpy arrays
    return tuple(  # type: ignore[return-value]
        v.detach().cpu().numpy() if hasattr(v, "detach") else v for v in got
    )


def _from_folder(
    root: Path,
    image_size: int | tuple[int, int] | None,
    channels: int,
    mean: float | Sequence[float],
    std: float | Sequence[float],
    dtype: str,
) -> Dataset:
    import numpy as np

    try:
        from PIL import Image
    except ImportError as e:
        raise MissingDependencyError("pillow", "report", "image-folder datasets") from e
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3; got {channels}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ConfigError(f"image folder {str(root)!r} has no class subfolders")
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    images, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as opened:
                    im = opened.convert("L" if channels == 1 else "RGB")
                    if size is not None:
                        im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                    arr = np.asarray(im, dtype=np.float32) / 255.0
            except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
                raise ConfigError(
                    f"image folder {str(root)!r}: {str(f)!r} is not a readable image "
                    f"({type(e).__name__}: {e}); remove or replace it"
                ) from e
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            images.append(arr)
            labels.append(label)
    if not images:
        raise ConfigError(
            f"image folder {str(root)!r} holds no images ({', '.join(_IMAGE_SUFFIXES)})"
        )
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise ConfigError(
            f"images in {str(root)!r} differ in size ({sorted(shapes)[:3]} ...); pass image_size "
            "(CLI: --image-size) to resize them"
        )
    x = np.stack(images)
    m = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
    x = ((x - m) / s).astype(dtype)
    return Dataset(
        x,
        np.asarray(labels, dtype=np.int64),
        str(root),
        tuple(classes),
        x_name="images",
        y_name="class folders",
    )


# --- predictors and evaluation -------------------------------------------------------------


def session_predictor(session: Any, input_name: str | None = None) -> Callable[[Any], Any]:
    """``batch -> first output`` for a `edgerep.runtimes.Session` (or an edgerep Predictor)."""
    name = input_name or session.input_names[0]

    def predict(batch: Any) -> Any:
        return session.run({name: batch})[0]

    return predict


def torch_predictor(model: Any) -> Callable[[Any], Any]:
    """``batch -> logits`` (numpy) for a PyTorch module, under ``torch.no_grad``."""
    import torch

    def predict(batch: Any) -> Any:
        with torch.no_grad():
            out = model(torch.from_numpy(batch))
        return out.detach().cpu().float().numpy()

    return predict


def evaluate(
    predict: Callable[[Any], Any],
    dataset: Dataset,
    *,
    metrics: Sequence[str] = ("top1",),
    batch_size: int = 64,
) -> dict[str, float]:
    """Run `predict` over `dataset` in batches and apply `metrics` to all the logits.

    Args:
        predict: batch of inputs -> logits (N, classes), numpy.
        dataset: inputs and labels.
        metrics: registered metric names.
        batch_size: samples per call (1 for artifacts with a fixed batch of 1).

    Returns:
        ``{metric: value}`` plus ``samples``.

    Raises:
        ConfigError: unknown metric or bad batch size.
    """
    import numpy as np

    fns = {m: get_metric(m) for m in metrics}  # unknown names fail before any work
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1; got {batch_size}")
    if dataset.y is None:
        raise ConfigError(
            f"dataset {dataset.source!r} has no labels, so task metrics ({', '.join(metrics)}) "
            "cannot be computed; add labels (an .npz 'y' array) or compare with a reference"
        )
    parts = [
        np.asarray(predict(np.ascontiguousarray(dataset.x[i : i + batch_size])))
        for i in range(0, len(dataset), batch_size)
    ]
    return score(np.concatenate(parts), dataset.y, metrics=list(fns))


def score(logits: np.ndarray, labels: np.ndarray, *, metrics: Sequence[str]) -> dict[str, float]:
    """Apply registered `metrics` to `logits` (N, classes) and `labels` (N,).

    Returns:
        ``{metric: value}`` plus ``samples``.

    Raises:
        ConfigError: unknown metric.
    """
    fns = {m: get_metric(m) for m in metrics}
    out = {name: float(fn(logits, labels)) for name, fn in fns.items()}
    out["samples"] = float(len(labels))
    return out
