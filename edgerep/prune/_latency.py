"""Latency tables: each prunable group timed at candidate widths on the backend.

A group's cost at width ``w`` is the summed measured latency of the layers it
touches (Conv/Linear producers with ``w`` output channels, consumers with ``w``
input channels, depthwise convs with both), each timed alone as a one-node ONNX
model at the input shape it sees in the deployed model, on the chosen backend's
runtime, with the one latency method (`edgerep.bench.benchmark_latency`). Layers
with the same signature (type, geometry, input size, channels) share one
measurement, so the 14 identical blocks of a RepVGG stage cost one row each.

Measurements are cached in a JSON file per machine, backend and model hash under
``cache_dir`` (default ``~/.cache/edgerep/prune``). The channel step of the backend is
measured first (`measure_step`: the costliest group timed at every width of a
41-wide window; `detect_step` finds the coarsest step 32/16/8/4/2/1 that no
in-between width beats); the widths tried are multiples of that step (doubled for
wide groups: at most 12 widths) plus the full width, and `pareto` drops any width
measured no faster than a wider one, so allocation never picks it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgerep.bench.latency import LatencyConfig, benchmark_latency
from edgerep.errors import ConfigError, did_you_mean
from edgerep.prune._groups import Group

__all__ = [
    "BACKENDS",
    "LatencyTables",
    "LayerShape",
    "PruneBackend",
    "build_tables",
    "candidate_widths",
    "detect_step",
    "measure_step",
    "probe_widths",
    "get_backend",
    "layer_shapes",
    "pareto",
]

logger = logging.getLogger(__name__)

#: how each layer is timed: short runs, many of them (the end-to-end check uses more)
TABLE_LATENCY = LatencyConfig(
    warmup_iters=3, warmup_seconds=0.01, min_iters=10, min_seconds=0.03, repeats=3
)


@dataclass(frozen=True)
class PruneBackend:
    """A backend pruning can measure on.

    Attributes:
        name: ``onnxruntime``, ``openvino`` or ``executorch``.
        runtime: the `edgerep.runtimes` name.
        options: threads -> runtime load options.
        prepare: ``(onnx_path) -> path the runtime loads`` (OpenVINO reads ONNX and
            is given its IR).
        export: ``(torch model, inputs, out_dir) -> path the runtime loads`` for a
            backend that does not read ONNX (ExecuTorch: edgerep's ExecuTorch exporter,
            XNNPACK delegate); its layers and whole models are exported from torch,
            inputs named ``input_0, input_1, ...``. None: ONNX + `prepare`.
    """

    name: str
    runtime: str
    options: Callable[[int], dict[str, Any]]
    prepare: Callable[[Path], Path]
    export: Callable[[nn.Module, Sequence[torch.Tensor], Path], Path] | None = None


def _ov_prepare(path: Path) -> Path:
    """The ONNX file converted to an fp32 IR next to it (same stem)."""
    import openvino as ov

    from edgerep.quantize._nncf import save_ir

    return save_ir(ov, ov.Core().read_model(str(path)), path.with_suffix(".xml"), fp16=False)


def _et_export(model: nn.Module, inputs: Sequence[torch.Tensor], out_dir: Path) -> Path:
    """`model` as an ExecuTorch program (XNNPACK delegate) through edgerep's exporter."""
    import copy

    from edgerep.exporters.executorch import ExecuTorchExporter
    from edgerep.spec import InputSpec

    out_dir.mkdir(parents=True, exist_ok=True)
    # integer inputs (token ids) stay integers, as the model reads them
    feeds = [t.float() if t.is_floating_point() else t for t in inputs]
    specs = [
        InputSpec(f"input_{i}", tuple(t.shape), str(t.dtype).removeprefix("torch."))
        for i, t in enumerate(feeds)
    ]
    model = copy.deepcopy(model).float().eval()
    artifact = ExecuTorchExporter().export(model, feeds, specs, out_dir)
    return Path(artifact.path)


BACKENDS: dict[str, PruneBackend] = {
    "onnxruntime": PruneBackend(
        "onnxruntime",
        "onnxruntime",
        lambda threads: {"threads": threads, "inter_op_threads": 1},
        lambda p: p,
    ),
    "openvino": PruneBackend(
        "openvino",
        "openvino",
        lambda threads: {
            "threads": threads,
            "inference_precision": "f32",
            "performance_hint": "LATENCY",
        },
        _ov_prepare,
    ),
    # the ExecuTorch bindings take no load options: XNNPACK runs its own thread pool,
    # so `threads` only names the cache (as it does for `edgerep bench`)
    "executorch": PruneBackend(
        "executorch", "executorch", lambda threads: {}, lambda p: p, export=_et_export
    ),
}


def get_backend(name: str) -> PruneBackend:
    """The pruning backend `name`.

    Raises:
        ConfigError: unknown backend.
    """
    if name not in BACKENDS:
        raise ConfigError(
            f"unknown pruning backend {name!r};{did_you_mean(name, BACKENDS)} pruning measures "
            f"on: {', '.join(BACKENDS)}"
        )
    return BACKENDS[name]


@dataclass(frozen=True)
class LayerShape:
    """What a Conv/Linear layer's cost depends on, with its channel counts."""

    kind: str
    in_shape: tuple[int, ...]  # the input without the channel dim (batch, spatial / rows)
    cin: int
    cout: int
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    depthwise: bool = False
    bias: bool = True

    def with_channels(self, cin: int, cout: int) -> LayerShape:
        if self.depthwise:
            cin = cout = min(cin, cout)
        return LayerShape(
            self.kind,
            self.in_shape,
            cin,
            cout,
            self.kernel,
            self.stride,
            self.padding,
            self.dilation,
            self.depthwise,
            self.bias,
        )

    def key(self) -> str:
        return json.dumps(
            [
                self.kind,
                self.in_shape,
                self.cin,
                self.cout,
                self.kernel,
                self.stride,
                self.padding,
                self.dilation,
                self.depthwise,
                self.bias,
            ]
        )

    def macs(self) -> int:
        if self.kind == "Linear":
            return int(np.prod(self.in_shape)) * self.cin * self.cout
        out = [
            (s + 2 * p - d * (k - 1) - 1) // st + 1
            for s, p, d, k, st in zip(
                self.in_shape[1:], self.padding, self.dilation, self.kernel, self.stride
            )
        ]
        per_out = (1 if self.depthwise else self.cin) * int(np.prod(self.kernel))
        return self.in_shape[0] * self.cout * int(np.prod(out)) * per_out

    def params(self) -> int:
        per_out = (1 if self.depthwise else self.cin) * int(np.prod(self.kernel or (1,)))
        return self.cout * per_out + (self.cout if self.bias else 0)


def _padding(conv: nn.Conv2d) -> tuple[int, ...]:
    if isinstance(conv.padding, str):  # "same" (stride 1) or "valid"
        if conv.padding == "valid":
            return (0,) * len(conv.kernel_size)
        return tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))
    return tuple(conv.padding)


def layer_shapes(model: nn.Module, inputs: Sequence[torch.Tensor]) -> dict[str, LayerShape]:
    """The `LayerShape` of every Conv2d/Linear that runs on `inputs`."""
    shapes: dict[str, LayerShape] = {}
    names = {id(m): n for n, m in model.named_modules()}

    def hook(m: Any, args: tuple[Any, ...]) -> None:
        x = args[0]
        name = names[id(m)]
        if isinstance(m, nn.Conv2d):
            shapes[name] = LayerShape(
                "Conv2d",
                (1, *x.shape[2:]),
                m.in_channels,
                m.out_channels,
                tuple(m.kernel_size),
                tuple(m.stride),
                _padding(m),
                tuple(m.dilation),
                depthwise=m.groups > 1,
                bias=m.bias is not None,
            )
        else:
            rows = int(np.prod(x.shape[1:-1])) if x.dim() > 2 else 1
            shapes[name] = LayerShape(
                "Linear", (rows,), m.in_features, m.out_features, bias=m.bias is not None
            )

    hooks = [
        m.register_forward_pre_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    try:
        with torch.no_grad():
            model(*[t[:1] for t in inputs])
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _one_layer_onnx(shape: LayerShape, path: Path) -> list[int]:
    """Write a one-node ONNX model of `shape` (random weights) to `path`; return its input shape."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = []
    if shape.kind == "Conv2d":
        group = shape.cin if shape.depthwise else 1
        w = rng.standard_normal((shape.cout, shape.cin // group, *shape.kernel)).astype(np.float32)
        in_shape = [1, shape.cin, *shape.in_shape[1:]]
        inits.append(numpy_helper.from_array(w, "w"))
        names = ["x", "w"]
        if shape.bias:
            inits.append(numpy_helper.from_array(np.zeros(shape.cout, np.float32), "b"))
            names.append("b")
        pads = list(shape.padding) * 2
        node = helper.make_node(
            "Conv",
            names,
            ["y"],
            kernel_shape=list(shape.kernel),
            strides=list(shape.stride),
            pads=pads,
            dilations=list(shape.dilation),
            group=group,
        )
    else:
        w = rng.standard_normal((shape.cin, shape.cout)).astype(np.float32)
        in_shape = [shape.in_shape[0], shape.cin]
        inits.append(numpy_helper.from_array(w, "w"))
        inits.append(numpy_helper.from_array(np.zeros(shape.cout, np.float32), "b"))
        node = helper.make_node("Gemm", ["x", "w", "b"], ["y"])
    graph = helper.make_graph(
        [node],
        "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    onnx.save(model, str(path))
    return in_shape


def _one_layer_module(shape: LayerShape) -> tuple[nn.Module, list[int]]:
    """A torch layer of `shape` (random weights) and its input shape."""
    gen = torch.Generator().manual_seed(0)
    layer: nn.Module
    if shape.kind == "Conv2d":
        conv: Any = nn.Conv2d
        layer = conv(
            shape.cin,
            shape.cout,
            shape.kernel,
            stride=shape.stride,
            padding=shape.padding,
            dilation=shape.dilation,
            groups=shape.cin if shape.depthwise else 1,
            bias=shape.bias,
        )
        in_shape = [1, shape.cin, *shape.in_shape[1:]]
    else:
        layer = nn.Linear(shape.cin, shape.cout, bias=shape.bias)
        in_shape = [shape.in_shape[0], shape.cin]
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return layer.eval(), in_shape


def machine_key(backend: PruneBackend, threads: int) -> str:
    """A short name for this machine + backend + threads (CPU model, cores, runtime version)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    version = ""
    try:
        import importlib.metadata as md

        version = md.version("onnxruntime" if backend.name == "onnxruntime" else backend.name)
    except Exception:  # pragma: no cover - version lookup is best effort for the key
        version = "?"
    text = f"{platform.node()}|{cpu}|{os.cpu_count()}|{backend.name}|{version}|t{threads}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class LatencyTables:
    """Measured layer latencies (ms) on one backend, cached on disk."""

    def __init__(
        self,
        backend: PruneBackend,
        *,
        threads: int = 1,
        model_hash: str = "",
        cache_dir: str | Path | None = None,
        config: LatencyConfig = TABLE_LATENCY,
    ) -> None:
        self.backend = backend
        self.threads = threads
        self.config = config
        root = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache/edgerep/prune"
        self.path = root / f"{machine_key(backend, threads)}-{model_hash[:16] or 'any'}.json"
        self.cache: dict[str, float] = {}
        self.measured = 0
        self.from_cache = 0
        if self.path.is_file():
            try:
                self.cache = {k: float(v) for k, v in json.loads(self.path.read_text()).items()}
            except (OSError, ValueError):
                logger.warning("ignoring unreadable latency cache %s", self.path)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.cache, indent=0, sort_keys=True))
        tmp.replace(self.path)

    def ms(self, shapes: Sequence[LayerShape]) -> list[float]:
        """Latency of each layer shape (measured once, then cached)."""
        todo = [s for s in dict.fromkeys(shapes) if s.key() not in self.cache]
        self.from_cache += len(set(shapes)) - len(todo)
        if todo:
            from edgerep.runtimes import get_runtime

            runtime = get_runtime(self.backend.runtime)
            with tempfile.TemporaryDirectory() as tmp:
                for i, s in enumerate(todo):
                    if self.backend.export is None:
                        path = Path(tmp) / f"l{i}.onnx"
                        in_shape = _one_layer_onnx(s, path)
                        path, name = self.backend.prepare(path), "x"
                    else:
                        layer, in_shape = _one_layer_module(s)
                        example = torch.zeros(in_shape)
                        path, name = (
                            self.backend.export(layer, [example], Path(tmp) / f"l{i}"),
                            "input_0",
                        )
                    session = runtime.load(path, options=self.backend.options(self.threads))
                    feeds = {
                        name: np.random.default_rng(0).standard_normal(in_shape).astype(np.float32)
                    }
                    try:
                        result = benchmark_latency(session.run, feeds, config=self.config)
                    finally:
                        session.close()
                    self.cache[s.key()] = float(np.median([r.p50_ms for r in result.runs]))
                    self.measured += 1
            self.save()
        return [self.cache[s.key()] for s in shapes]


def candidate_widths(size: int, *, min_width: int = 1, step: int = 8) -> list[int]:
    """Widths tried for a group of `size` channels, widest first.

    Multiples of a granule, plus `size` itself: the granule is `step` (the backend's
    measured channel step, `detect_step`; 8 for counted MACs/params), doubled until
    the group has at most 12 widths.
    """
    granule = max(1, step)
    while size / granule > 12:
        granule *= 2
    widths = {size}
    widths.update(w for w in range(granule, size, granule) if w >= min_width)
    if size < granule:
        widths.update(range(max(1, min_width), size))
    return sorted(widths, reverse=True)


#: channel steps `detect_step` tells apart, coarsest first
STEPS = (32, 16, 8, 4, 2, 1)


def probe_widths(size: int, *, min_width: int = 1) -> list[int]:
    """Every width (step 1) of a window where a step of up to 32 channels shows.

    The window spans 41 widths, from 8 above the multiple of 32 nearest three
    quarters of the group (where pruning lands) down to 32 below it (two multiples
    of 32 are in it), inside ``[min_width, size]``; widest first.
    """
    center = max(32, round(0.75 * size / 32) * 32)
    hi = min(size, center + 8)
    lo = max(min_width, 1, hi - 40)
    return list(range(hi, lo - 1, -1))


def detect_step(costs: Mapping[int, float], *, tol: float = 0.03, allowed: float = 0.1) -> int:
    """The backend's channel step, read off a group's measured cost at consecutive widths.

    The step is the coarsest ``p`` in `STEPS` such that a width that is not a multiple
    of ``p`` is (almost) never faster than the next wider multiple of ``p``: at most
    `allowed` of them beat it by more than `tol` (relative), which absorbs timing
    noise. A staircase of 16 (a kernel that blocks channels by 16) gives 16; a smooth
    cost gives a small step (4 or less at ``tol=0.03``), and noise only ever makes the
    step finer, never coarser than what was measured.
    """
    widths = sorted(costs)
    for p in STEPS:
        mults = [w for w in widths if w % p == 0]
        compared = beats = 0
        for w in widths:
            wider = [m for m in mults if m > w]
            if w % p == 0 or not wider:
                continue
            compared += 1
            beats += costs[w] < costs[min(wider)] * (1 - tol)
        if len(mults) >= 2 and compared and beats <= allowed * compared:
            return p
    return 1


def group_layer_shapes(
    group: Group, width: int, shapes: Mapping[str, LayerShape]
) -> list[LayerShape]:
    """The layers a group touches, with the group's channels scaled to `width`."""
    out = []
    frac = width / group.size
    for m in group.members:
        s = shapes.get(m.name)
        if s is None:
            continue
        if s.depthwise or m.dim == "out":
            new = max(1, round(s.cout * frac)) if s.cout != group.size else width
            cin = new if s.depthwise else s.cin
            out.append(s.with_channels(cin, new))
        else:
            new = max(1, round(s.cin * frac)) if s.cin != group.size else width
            out.append(s.with_channels(new, s.cout))
    return out


def build_tables(
    groups: Sequence[Group],
    shapes: Mapping[str, LayerShape],
    cost: Callable[[Sequence[LayerShape]], list[float]],
    *,
    min_ratio: float,
    step: int = 8,
) -> dict[str, dict[int, float]]:
    """group -> {width: cost of the layers it touches at that width} (`candidate_widths`)."""
    tables: dict[str, dict[int, float]] = {}
    for g in groups:
        widths = candidate_widths(
            g.size, min_width=max(1, math.ceil(g.size * min_ratio)), step=step
        )
        tables[g.name] = group_costs(g, widths, shapes, cost)
    return tables


def group_costs(
    group: Group,
    widths: Sequence[int],
    shapes: Mapping[str, LayerShape],
    cost: Callable[[Sequence[LayerShape]], list[float]],
) -> dict[int, float]:
    """{width: summed cost of the layers `group` touches at that width}."""
    per_width = {w: group_layer_shapes(group, w, shapes) for w in widths}
    values = iter(cost([s for w in widths for s in per_width[w]]))
    return {w: float(sum(next(values) for _ in per_width[w])) for w in widths}


def measure_step(
    groups: Sequence[Group],
    shapes: Mapping[str, LayerShape],
    cost: Callable[[Sequence[LayerShape]], list[float]],
    *,
    min_ratio: float,
) -> tuple[int, dict[str, Any]]:
    """The backend's channel step (`detect_step`), measured on the costliest group.

    The group with the most MACs is timed at every width of `probe_widths`; returns
    the step and what was measured (for the report).
    """

    def macs(g: Group) -> int:
        return sum(s.macs() for s in group_layer_shapes(g, g.size, shapes))

    group = max(groups, key=macs)
    widths = probe_widths(group.size, min_width=max(1, math.ceil(group.size * min_ratio)))
    if len(widths) < 3:
        return 8, {"group": group.name, "widths": widths, "step": 8, "note": "too narrow"}
    costs = group_costs(group, widths, shapes, cost)
    step = detect_step(costs)
    probe = {"group": group.name, "step": step, "ms": {str(w): round(costs[w], 5) for w in widths}}
    return step, probe


def pareto(table: Mapping[int, float]) -> dict[int, float]:
    """Only the widths strictly faster than every wider width (the full width always stays)."""
    out: dict[int, float] = {}
    best = math.inf
    for w in sorted(table, reverse=True):
        if table[w] < best:
            out[w] = table[w]
            best = table[w]
    return out
