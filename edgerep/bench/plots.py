"""The report's plots (matplotlib, Agg backend, imported only when a plot is drawn).

- `latency_figure`: the latency distribution per row, box p25..p75 and whiskers
  p1..p99, on a log axis when the whiskers span more than 3x (a linear axis lets
  one row's p99 tail squeeze every box to a line);
- `pareto_figure`: accuracy against p50 latency, points numbered and named in a
  legend (names never overlap), the Pareto front ringed and dashed (visible in the
  plot and the legend when it is a single point, i.e. every row equally accurate).

`plot_pngs` draws both as base64 PNGs for the HTML page.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import Any

from edgerep.bench.report import _accuracy_value, _label, pareto_front

__all__ = ["latency_figure", "pareto_figure", "plot_pngs"]


def plot_pngs(report: Mapping[str, Any]) -> dict[str, str]:
    """Base64 PNGs: ``latency`` (distribution per row) and ``pareto`` (when accuracy exists)."""
    import matplotlib

    matplotlib.use("Agg", force=False)  # set here, not at import: the caller's backend elsewhere
    import matplotlib.pyplot as plt

    out: dict[str, str] = {}
    for name, make in (("latency", latency_figure), ("pareto", pareto_figure)):
        fig = make(report)
        if fig is not None:
            out[name] = _png(fig)
            plt.close(fig)
    return out


#: a latency plot whose p1..p99 span more than this ratio gets a log axis
_LOG_AXIS_RATIO = 3.0


def latency_figure(report: Mapping[str, Any]) -> Any:
    """The latency distribution per row (box p25..p75, whiskers p1..p99), or None.

    The axis is logarithmic when the whiskers span more than `_LOG_AXIS_RATIO`: on a
    linear axis one row's p99 tail (or one slow runtime) squeezes every other box to a
    line. Ticks are plain milliseconds either way.
    """
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    rows = report["rows"]
    if not rows:
        return None
    labels = [_label(r) for r in rows]
    data = [
        np.asarray(r.get("samples_ms") or [r["latency"]["stats"]["p50_ms"]], dtype=np.float64)
        for r in rows
    ]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(rows) + 1.6))
    ax.boxplot(data, orientation="horizontal", whis=(1, 99), showfliers=False)
    ax.set_yticks(range(1, len(rows) + 1), labels)
    low = min(float(np.percentile(d, 1)) for d in data)
    high = max(float(np.percentile(d, 99)) for d in data)
    scale = "linear"
    if low > 0 and high / low > _LOG_AXIS_RATIO:
        scale = "log"
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, axis="x", which="major", alpha=0.3)
    ax.set_xlabel(
        f"latency per call (ms{', log scale' if scale == 'log' else ''}); "
        "box: p25..p75, line: p50, whiskers: p1..p99"
    )
    ax.set_title("Latency distribution")
    return fig


def pareto_figure(report: Mapping[str, Any]) -> Any:
    """Accuracy against p50 latency with the Pareto front, or None without accuracy.

    Points are numbered and named in a legend below the axes, so names never overlap
    however close the points lie; numbers of nearby points are moved apart. The front
    is drawn as a dashed line through ringed points, so it shows (in the plot and in
    its legend entry) even when it is a single point (every row equally accurate).
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    rows = report["rows"]
    points = [(r["latency"]["stats"]["p50_ms"], _accuracy_value(r)) for r in rows]
    have = [(i, (lat, acc)) for i, (lat, acc) in enumerate(points) if acc is not None]
    if not have:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.8 + 0.22 * len(have)))
    pts = [p for _, p in have]
    front = [pts[k] for k in pareto_front(pts)]
    ax.plot(
        [p[0] for p in front],
        [p[1] for p in front],
        "--o",
        color="gray",
        markersize=15,
        markerfacecolor="none",
        label=f"Pareto front ({len(front)} of {len(pts)} points)",
        zorder=1,
    )
    numbers = []
    for k, (i, (lat, acc)) in enumerate(have, start=1):
        ax.scatter(lat, acc, zorder=2, label=f"{k}: {_label(rows[i])}")
        numbers.append(
            ax.annotate(str(k), (lat, acc), fontsize=9, xytext=(6, 6), textcoords="offset points")
        )
    ax.set_xlabel("p50 latency (ms)")
    ax.set_ylabel("accuracy (top-1)")
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    ax.set_title("Accuracy vs latency")
    ax.margins(x=0.12, y=0.12)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=8, frameon=False)
    fig.tight_layout()
    _spread_labels(fig, numbers)
    return fig


def _spread_labels(fig: Any, texts: Sequence[Any]) -> None:
    """Move point numbers that would overlap to the first free offset around their point."""
    offsets = [(6, 6), (6, -14), (-14, 6), (-14, -14), (6, 18), (6, -26), (-26, 6), (18, 6)]
    offsets += [(6 + 12 * i, 6) for i in range(2, 12)]
    renderer = fig.canvas.get_renderer()
    placed: list[Any] = []
    for text in texts:
        for dx, dy in offsets:
            text.set_position((dx, dy))
            box = text.get_window_extent(renderer).expanded(1.1, 1.1)
            if not any(box.overlaps(other) for other in placed):
                break
        placed.append(text.get_window_extent(renderer))


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")
