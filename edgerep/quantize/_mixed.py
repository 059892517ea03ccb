"""Automatic mixed precision on onnxruntime: keep the sensitive layers in float.

`mixed_precision` quantizes every layer with onnxruntime, then, while the task
metric drops more than the budget, keeps the next layer of the
`layer_sensitivity` ranking in float (onnxruntime's ``nodes_to_exclude``),
re-quantizes with the same calibration ranges and re-scores. Greedy by
ranking, one layer per step: at most one quantize-and-evaluate per layer.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgerep.errors import ConfigError, did_you_mean
from edgerep.quantize._ort import OrtQuantConfig, quantize_onnx
from edgerep.quantize._sensitivity import (
    SensitivityReport,
    _from_json,
    _metric,
    _module_name,
    _outputs,
    _prepare,
    _sqnr_db,
    _to_json,
    layer_sensitivity,
)

__all__ = ["MixedPrecisionReport", "MixedPrecisionStep", "mixed_precision"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MixedPrecisionStep:
    """One quantize-and-score round.

    Attributes:
        kept_float: layers kept in float in this round, most sensitive first.
        metric: the metric of this round's model.
        drop: float32 metric - `metric`.
        sqnr_db: output SQNR vs float32.
    """

    kept_float: tuple[str, ...]
    metric: float
    drop: float
    sqnr_db: float


@dataclass
class MixedPrecisionReport:
    """How many layers had to stay in float to meet the budget, step by step.

    Attributes:
        metric: ``top1`` or ``agreement``.
        fp32_metric: the float32 model's metric.
        max_drop: the budget.
        status: ``within budget`` or ``fp32 fallback`` (no step met the budget;
            the float32 model was written).
        reason: why it stopped, in words.
        kept_float: the layers kept in float in the written model.
        config: the config of the written model (for the fallback, the last
            one tried).
        steps: every round, all layers quantized first.
        modules: torch module name by ONNX node name, where known.
        version: schema version of `to_dict`.
    """

    metric: str
    fp32_metric: float
    max_drop: float
    status: str
    reason: str
    kept_float: tuple[str, ...]
    config: OrtQuantConfig
    steps: list[MixedPrecisionStep] = field(default_factory=list)
    modules: dict[str, str] = field(default_factory=dict)
    version: int = 1

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dictionary (an infinite SQNR is written as ``"inf"``)."""
        out = asdict(self)
        out["config"] = self.config.to_dict()
        out["kept_float"] = list(self.kept_float)
        for step in out["steps"]:
            step["kept_float"] = list(step["kept_float"])
            step["sqnr_db"] = _to_json(step["sqnr_db"])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MixedPrecisionReport:
        """The inverse of `to_dict`.

        Raises:
            ConfigError: another schema version.
        """
        if data.get("version") != 1:
            raise ConfigError(
                f"cannot read mixed-precision report version {data.get('version')!r}; this "
                "edgerep reads version 1"
            )
        steps = [
            MixedPrecisionStep(
                tuple(s["kept_float"]), s["metric"], s["drop"], _from_json(s["sqnr_db"])
            )
            for s in data["steps"]
        ]
        return cls(
            **{
                **data,
                "kept_float": tuple(data["kept_float"]),
                "config": OrtQuantConfig.from_dict(data["config"]),
                "steps": steps,
            }
        )

    def _rows(self) -> list[list[str]]:
        rows = []
        for i, s in enumerate(self.steps):
            added = s.kept_float[-1] if s.kept_float else "(all quantized)"
            module = self.modules.get(added)
            rows.append(
                [
                    str(i),
                    added + (f" ({module})" if module else ""),
                    f"{s.metric:.4f}",
                    f"{s.drop:+.4f}",
                    f"{s.sqnr_db:.1f}",
                    "yes" if s.drop <= self.max_drop + 1e-12 else "no",
                ]
            )
        return rows

    _HEADER = ("step", "layer added to float", "metric", "drop", "SQNR dB", "within budget")

    def _summary(self) -> str:
        return (
            f"{self.status}: {self.reason} ({self.metric}, fp32 {self.fp32_metric:.4f}, "
            f"budget {self.max_drop:.4f})"
        )

    def to_markdown(self) -> str:
        """A Markdown table of the steps."""
        lines = [
            f"Mixed precision: {self._summary()}",
            "",
            "| " + " | ".join(self._HEADER) + " |",
            "|" + "|".join("---" for _ in self._HEADER) + "|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in self._rows()]
        return "\n".join(lines) + "\n"

    def to_text(self) -> str:
        """A plain-text table for a terminal."""
        rows = [list(self._HEADER), *self._rows()]
        widths = [max(len(r[j]) for r in rows) for j in range(len(self._HEADER))]
        body = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        return "\n".join([self._summary(), *body]) + "\n"


def _still_quantized(path: Path) -> list[str]:
    """Op types that still read a dequantized tensor in a QDQ model."""
    import onnx

    nodes = onnx.load(str(path)).graph.node
    dq = {o for n in nodes if n.op_type == "DequantizeLinear" for o in n.output}
    return sorted(
        {
            n.op_type
            for n in nodes
            if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and dq & set(n.input)
        }
    )


def mixed_precision(
    onnx_path: str | Path,
    out_path: str | Path,
    *,
    calib: Iterable[Mapping[str, np.ndarray]],
    eval_feeds: Mapping[str, np.ndarray],
    labels: np.ndarray | None = None,
    config: OrtQuantConfig | None = None,
    max_drop: float = 0.01,
    sensitivity: SensitivityReport | None = None,
) -> tuple[Path, MixedPrecisionReport]:
    """Quantize, keeping the most sensitive layers in float until within budget.

    Quantizes every layer, then, while the metric drop versus float32 exceeds
    `max_drop`, adds the next layer of the sensitivity ranking to
    ``nodes_to_exclude``, re-quantizes (same calibration ranges) and re-scores.
    When every ranked layer is in float and the drop is still over budget
    (other ops onnxruntime quantizes cause it), the float32 model is written
    instead and the report says so.

    Args:
        onnx_path: the float32 model.
        out_path: the mixed-precision model; written to a temporary file in the
            same folder and renamed when complete.
        calib: calibration feeds (input name → array).
        eval_feeds: a batch of evaluation inputs (input name → array).
        labels: class labels of `eval_feeds`; without them the metric is arg-max
            agreement with float32.
        config: quantization settings; its own ``nodes_to_exclude`` stay in float.
        max_drop: largest allowed metric loss versus float32 (0.01: one point).
        sensitivity: a ranking from `layer_sensitivity` on the same model and
            evaluation data; computed when not given.

    Returns:
        The written model's path and the report.

    Raises:
        ConfigError: a budget out of [0, 1], out_path equal to the input, or a
            sensitivity report naming nodes the model does not have.
    """
    config = config or OrtQuantConfig()
    path, calib, labels = _prepare(onnx_path, calib, eval_feeds, labels)
    out_path = Path(out_path)
    if not 0 <= max_drop <= 1:
        raise ConfigError(f"max_drop must be in [0, 1] (0.01 is one point), got {max_drop}")
    if out_path.resolve() == path.resolve():
        raise ConfigError(f"out_path {str(out_path)!r} is the input model; write elsewhere")
    if sensitivity is None:
        sensitivity = layer_sensitivity(
            path, calib=calib, eval_feeds=eval_feeds, labels=labels, config=config
        )
    import onnx

    nodes = {n.name: n for n in onnx.load(str(path), load_external_data=False).graph.node}
    unknown = [name for name in sensitivity.ranking if name not in nodes]
    if unknown:
        raise ConfigError(
            f"the sensitivity report names nodes {unknown} that {path} does not have"
            f"{did_you_mean(unknown[0], nodes)} Compute it on this model."
        )
    modules = {n: m for n in sensitivity.ranking if (m := _module_name(nodes[n]))}
    ranking = [n for n in sensitivity.ranking if n not in config.nodes_to_exclude]
    ref = _outputs(path, eval_feeds)
    ref_pred = ref[0].argmax(axis=1)
    fp32_metric = _metric(ref, labels, ref_pred)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    steps: list[MixedPrecisionStep] = []
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        cache = Path(tmp) / "ranges.json"
        chosen: Path | None = None
        for k in range(len(ranking) + 1):
            step_config = replace(
                config, nodes_to_exclude=config.nodes_to_exclude + tuple(ranking[:k])
            )
            art = quantize_onnx(
                path,
                Path(tmp) / f"step{k}.onnx",
                step_config,
                calib=calib,
                calibration_cache=cache,
            )
            out = _outputs(art.path, eval_feeds)
            metric = _metric(out, labels, ref_pred)
            steps.append(
                MixedPrecisionStep(
                    tuple(ranking[:k]), metric, fp32_metric - metric, _sqnr_db(ref, out)
                )
            )
            logger.info(
                "mixed precision step %d: metric %.4f (drop %+.4f)", k, metric, steps[-1].drop
            )
            if fp32_metric - metric <= max_drop + 1e-12:
                chosen = art.path
                break
        last = steps[-1]
        if chosen is not None:
            status = "within budget"
            reason = (
                f"all {len(ranking)} layers quantized, drop {last.drop:+.4f} <= {max_drop}"
                if k == 0
                else f"kept {k} of {len(ranking)} layers in float, drop {last.drop:+.4f} <= "
                f"{max_drop}"
            )
        else:
            status = "fp32 fallback"
            still = _still_quantized(art.path)
            reason = f"every one of the {len(ranking)} ranked layers in float and the drop is " + (
                f"still {last.drop:+.4f} > {max_drop}; onnxruntime still quantizes {still} "
                "(restrict op_types_to_quantize or rank them with op_types=)"
                if still
                else f"still {last.drop:+.4f} > {max_drop} with no op quantized (should not "
                "happen: is the evaluation deterministic?)"
            )
            reason += "; wrote the float32 model"
            chosen = Path(tmp) / "fp32.onnx"
            shutil.copyfile(path, chosen)
            logger.warning("mixed precision of %s: %s", path, reason)
        chosen.replace(out_path)
    report = MixedPrecisionReport(
        metric="agreement" if labels is None else "top1",
        fp32_metric=fp32_metric,
        max_drop=max_drop,
        status=status,
        reason=reason,
        kept_float=last.kept_float if status == "within budget" else tuple(ranking),
        config=step_config,
        steps=steps,
        modules=modules,
    )
    logger.info("mixed precision of %s -> %s:\n%s", path, out_path, report.to_text())
    return out_path, report
