"""Per-layer quantization sensitivity and automatic mixed precision on onnxruntime.

`layer_sensitivity` quantizes one layer at a time with onnxruntime's own
``nodes_to_quantize`` (calibrated once: the tensor ranges are computed on the
first call and read back from onnxruntime's calibration cache after that).
Quantizing a layer means what onnxruntime does to that node: its weight, its
input activation and, in QDQ, its output tensor. Against the float32 model on
the user's evaluation batch it measures:

- the SQNR of the model outputs, ``10·log10(Σ ref² / Σ (ref - out)²)`` pooled
  over every output, in dB;
- the task metric: top-1 with labels, else arg-max agreement with float32;
- the layer's share of float32 latency, from onnxruntime's profiler (CPU, one
  thread, extended graph optimizations, under which a fused Conv+ReLU keeps the
  Conv's name): the interquartile mean of each node's kernel time over the
  profiled runs, divided by the sum of those over every profiled node.

Layers are ranked by metric drop, then by SQNR (lowest first). A negative drop
(the quantized layer happened to score better) ranks as zero: on a finite
evaluation set it is noise, not robustness. ONNX node names
are mapped back to the torch module that produced them where the exporter kept
it (``/layer1/conv/Conv`` → ``layer1.conv``; the dynamo exporter's
``pkg.torch.onnx.name_scopes`` metadata).

`edgerep.quantize._mixed.mixed_precision` uses the ranking.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgerep.errors import ConfigError, MissingDependencyError
from edgerep.quantize._metrics import sqnr_db
from edgerep.quantize._ort import OrtQuantConfig, quantize_onnx

__all__ = [
    "DEFAULT_OP_TYPES",
    "LayerSensitivity",
    "SensitivityReport",
    "layer_sensitivity",
]

logger = logging.getLogger(__name__)

DEFAULT_OP_TYPES: tuple[str, ...] = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_WARMUP_RUNS = 3


def _ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise MissingDependencyError("onnxruntime", "onnx", "quantization sensitivity") from e
    return ort


def _to_json(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)  # JSON has no Infinity: "inf" / "-inf"


def _from_json(x: float | str) -> float:
    return float(x)


# ---------------------------------------------------------------- graph, metric, profile


def _module_name(node: Any) -> str | None:
    """The torch module path that produced an ONNX node, if the exporter kept it."""
    for prop in node.metadata_props:  # dynamo exporter: "['', 'layer1', 'layer1.0', 'conv2d']"
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                break
            if not isinstance(scopes, list):
                break
            modules = [s for s in scopes[:-1] if isinstance(s, str) and s]
            return modules[-1] if modules else None
    # TorchScript exporter: "/layer1/layer1.0/Conv" (newer) or "/layer1/0/Conv" (older)
    parts = [p for p in node.name.split("/") if p][:-1] if node.name.startswith("/") else []
    if not parts:
        return None
    path = parts[0]
    for part in parts[1:]:
        path = part if part.startswith(path + ".") else f"{path}.{part}"
    return path


def _layers(onnx_path: Path, config: OrtQuantConfig, op_types: Sequence[str]) -> list[Any]:
    import onnx

    nodes = list(onnx.load(str(onnx_path), load_external_data=False).graph.node)
    wanted = set(op_types) & (set(config.op_types_to_quantize) or set(op_types))
    layers = [
        n
        for n in nodes
        if n.op_type in wanted
        and n.name not in config.nodes_to_exclude
        and (not config.nodes_to_quantize or n.name in config.nodes_to_quantize)
    ]
    if not layers:
        raise ConfigError(
            f"{onnx_path} has no node of op types {sorted(wanted)} left to quantize "
            f"(op types present: {sorted({n.op_type for n in nodes})}); pass op_types= "
            "with the layers to measure"
        )
    unnamed = [n.op_type for n in layers if not n.name]
    if unnamed:
        raise ConfigError(
            f"{len(unnamed)} {sorted(set(unnamed))} node(s) of {onnx_path} have no name, so "
            "onnxruntime cannot select them; name the nodes (e.g. re-export with torch.onnx)"
        )
    return layers


def _session(path: Path, **options: Any) -> Any:
    ort = _ort()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    for key, value in options.items():
        setattr(opts, key, value)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _outputs(path: Path, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(o, dtype=np.float64) for o in _session(path).run(None, dict(feeds))]


def _sqnr_db(ref: list[np.ndarray], out: list[np.ndarray]) -> float:
    """SQNR pooled over every output of the model."""
    flat = [np.concatenate([a.ravel() for a in arrays]) for arrays in (ref, out)]
    return sqnr_db(flat[0], flat[1])


def _profile_ms(path: Path, feeds: Mapping[str, np.ndarray], runs: int) -> dict[str, float]:
    """Kernel time per node (ms per run) from onnxruntime's profiler."""
    ort = _ort()
    with tempfile.TemporaryDirectory() as tmp:
        sess = _session(
            path,
            enable_profiling=True,
            profile_file_prefix=str(Path(tmp) / "profile"),
            graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        )
        for _ in range(runs + _WARMUP_RUNS):
            sess.run(None, dict(feeds))
        events = json.loads(Path(sess.end_profiling()).read_text())
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    per_run: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        run = int(np.searchsorted(starts, e["ts"], side="right")) - 1
        if run < _WARMUP_RUNS:
            continue
        times = per_run.setdefault(e["name"][: -len("_kernel_time")], [0.0] * runs)
        times[run - _WARMUP_RUNS] += e["dur"] / 1000.0
    # interquartile mean: robust to a run disturbed by other work, finer than the
    # profiler's 1 us resolution that a median keeps
    return {name: _iq_mean(t) for name, t in per_run.items()}


def _iq_mean(values: Sequence[float]) -> float:
    ordered = sorted(values)
    cut = len(ordered) // 4
    return float(np.mean(ordered[cut : len(ordered) - cut]))


def _metric(outputs: list[np.ndarray], labels: np.ndarray | None, ref_pred: np.ndarray) -> float:
    pred = outputs[0].argmax(axis=1)
    return float((pred == (ref_pred if labels is None else labels)).mean())


# ---------------------------------------------------------------- sensitivity


@dataclass(frozen=True)
class LayerSensitivity:
    """What quantizing one layer alone does to the model.

    Attributes:
        node: ONNX node name.
        op_type: ONNX op type.
        module: the torch module that produced it, where the exporter kept it.
        sqnr_db: SQNR of the model outputs vs float32 (``inf``: identical).
        metric: top-1 or agreement with only this layer quantized.
        drop: float32 metric - `metric`.
        latency_share: the node's share of float32 kernel time (None: not seen
            in the profile, e.g. removed by a graph optimization).
    """

    node: str
    op_type: str
    module: str | None
    sqnr_db: float
    metric: float
    drop: float
    latency_share: float | None


@dataclass
class SensitivityReport:
    """Layers ranked by how much quantizing each alone costs, most sensitive first.

    Attributes:
        metric: ``top1`` or ``agreement``.
        fp32_metric: the float32 model's metric.
        quantized_metric: the metric with every listed layer quantized.
        quantized_sqnr_db: output SQNR with every listed layer quantized.
        config: the quantization settings.
        layers: one row per layer, ranked.
        other_latency_share: share of profiled time in nodes not listed
            (activations not fused, reshapes, layout reorders).
        profiled_ms: summed kernel time of one float32 run at batch 1.
        version: schema version of `to_dict`.
    """

    metric: str
    fp32_metric: float
    quantized_metric: float
    quantized_sqnr_db: float
    config: OrtQuantConfig
    layers: list[LayerSensitivity] = field(default_factory=list)
    other_latency_share: float = 0.0
    profiled_ms: float = 0.0
    version: int = 1

    @property
    def ranking(self) -> list[str]:
        """Node names, most sensitive first."""
        return [layer.node for layer in self.layers]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dictionary (an infinite SQNR is written as ``"inf"``)."""
        out = asdict(self)
        out["config"] = self.config.to_dict()
        out["quantized_sqnr_db"] = _to_json(self.quantized_sqnr_db)
        for row in out["layers"]:
            row["sqnr_db"] = _to_json(row["sqnr_db"])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SensitivityReport:
        """The inverse of `to_dict`.

        Raises:
            ConfigError: another schema version.
        """
        if data.get("version") != 1:
            raise ConfigError(
                f"cannot read sensitivity report version {data.get('version')!r}; this "
                "edgerep reads version 1"
            )
        layers = [
            LayerSensitivity(**{**row, "sqnr_db": _from_json(row["sqnr_db"])})
            for row in data["layers"]
        ]
        return cls(
            **{
                **data,
                "config": OrtQuantConfig.from_dict(data["config"]),
                "quantized_sqnr_db": _from_json(data["quantized_sqnr_db"]),
                "layers": layers,
            }
        )

    def _rows(self) -> list[list[str]]:
        return [
            [
                str(i),
                r.node,
                r.module or "-",
                r.op_type,
                f"{r.sqnr_db:.1f}",
                f"{r.metric:.4f}",
                f"{r.drop:+.4f}",
                "-" if r.latency_share is None else f"{100 * r.latency_share:.1f}%",
            ]
            for i, r in enumerate(self.layers, 1)
        ]

    _HEADER = ("rank", "node", "module", "op", "SQNR dB", "metric", "drop", "latency")

    def _summary(self) -> str:
        return (
            f"{self.config.name}, {self.metric}: fp32 {self.fp32_metric:.4f}, all "
            f"{len(self.layers)} layers quantized {self.quantized_metric:.4f} (SQNR "
            f"{self.quantized_sqnr_db:.1f} dB); other nodes "
            f"{100 * self.other_latency_share:.1f}% of {self.profiled_ms:.3f} ms"
        )

    def to_markdown(self) -> str:
        """A Markdown table, most sensitive layer first."""
        lines = [
            f"Per-layer sensitivity ({self._summary()})",
            "",
            "| " + " | ".join(self._HEADER) + " |",
            "|" + "|".join("---" for _ in self._HEADER) + "|",
        ]
        lines += [
            "| " + " | ".join(f"`{c}`" if j == 1 else c for j, c in enumerate(row)) + " |"
            for row in self._rows()
        ]
        return "\n".join(lines) + "\n"

    def to_text(self) -> str:
        """A plain-text table for a terminal."""
        rows = [list(self._HEADER), *self._rows()]
        widths = [max(len(r[j]) for r in rows) for j in range(len(self._HEADER))]
        body = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        return "\n".join([self._summary(), *body]) + "\n"


def _prepare(
    onnx_path: str | Path,
    calib: Iterable[Mapping[str, np.ndarray]],
    eval_feeds: Mapping[str, np.ndarray],
    labels: np.ndarray | None,
) -> tuple[Path, list[Mapping[str, np.ndarray]], np.ndarray | None]:
    path = Path(onnx_path)
    if not path.is_file():
        raise ConfigError(f"ONNX model {str(path)!r} does not exist; export one first")
    sizes = {k: len(v) for k, v in eval_feeds.items()}
    if not sizes or len(set(sizes.values())) != 1 or 0 in sizes.values():
        raise ConfigError(
            f"eval_feeds must map each input name to a non-empty batch of one size, got {sizes}"
        )
    if labels is not None:
        labels = np.asarray(labels)
        if len(labels) != next(iter(sizes.values())):
            raise ConfigError(f"{len(labels)} labels for {sizes} evaluation samples")
    return path, list(calib), labels


def layer_sensitivity(
    onnx_path: str | Path,
    *,
    calib: Iterable[Mapping[str, np.ndarray]],
    eval_feeds: Mapping[str, np.ndarray],
    labels: np.ndarray | None = None,
    config: OrtQuantConfig | None = None,
    op_types: Sequence[str] = DEFAULT_OP_TYPES,
    profile_runs: int = 20,
) -> SensitivityReport:
    """Quantize each layer alone and rank the layers by what it costs.

    Args:
        onnx_path: the float32 model.
        calib: calibration feeds (input name → array), as for `quantize_onnx`.
        eval_feeds: a batch of evaluation inputs (input name → array, first axis
            the sample); its first sample is the profiled input.
        labels: class labels of `eval_feeds`; without them the metric is arg-max
            agreement with float32 (of the first output).
        config: the quantization settings; its node and op-type selection limits
            which layers are measured. Default static int8 U8S8 per-channel.
        op_types: op types measured as layers.
        profile_runs: profiled float32 runs (after 3 warm-up runs).

    Returns:
        The ranked report.

    Raises:
        ConfigError: no layer to measure, inconsistent feeds or labels, or a
            config naming nodes the model does not have.
    """
    config = config or OrtQuantConfig()
    if profile_runs < 1:
        raise ConfigError(f"profile_runs must be >= 1, got {profile_runs}")
    path, calib, labels = _prepare(onnx_path, calib, eval_feeds, labels)
    layers = _layers(path, config, op_types)
    ref = _outputs(path, eval_feeds)
    ref_pred = ref[0].argmax(axis=1)
    fp32_metric = _metric(ref, labels, ref_pred)
    times = _profile_ms(path, {k: v[:1] for k, v in eval_feeds.items()}, profile_runs)
    total_ms = sum(times.values())
    if not times:
        logger.warning("onnxruntime's profile of %s has no node events; no latency shares", path)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "ranges.json"
        # the first call calibrates and fills the cache; the others read it
        full = quantize_onnx(
            path, Path(tmp) / "all.onnx", config, calib=calib, calibration_cache=cache
        )
        out = _outputs(full.path, eval_feeds)
        full_metric, full_sqnr = _metric(out, labels, ref_pred), _sqnr_db(ref, out)
        for i, node in enumerate(layers):
            one = replace(config, nodes_to_quantize=(node.name,))
            art = quantize_onnx(
                path, Path(tmp) / f"{i}.onnx", one, calib=calib, calibration_cache=cache
            )
            out = _outputs(art.path, eval_feeds)
            metric = _metric(out, labels, ref_pred)
            share = times[node.name] / total_ms if node.name in times and total_ms > 0 else None
            rows.append(
                (
                    i,
                    LayerSensitivity(
                        node.name,
                        node.op_type,
                        _module_name(node),
                        _sqnr_db(ref, out),
                        metric,
                        fp32_metric - metric,
                        share,
                    ),
                )
            )
    rows.sort(key=lambda r: (-max(r[1].drop, 0.0), r[1].sqnr_db, r[0]))
    listed = {node.name for node in layers}
    other = sum(ms for name, ms in times.items() if name not in listed)
    report = SensitivityReport(
        metric="agreement" if labels is None else "top1",
        fp32_metric=fp32_metric,
        quantized_metric=full_metric,
        quantized_sqnr_db=full_sqnr,
        config=config,
        layers=[r for _, r in rows],
        other_latency_share=other / total_ms if total_ms > 0 else 0.0,
        profiled_ms=total_ms,
    )
    logger.info("layer sensitivity of %s:\n%s", path, report.to_text())
    return report
