"""TensorRT: an engine built from the ONNX artifact, or the exact plan to build one.

Steps: (1) export ONNX into the format's folder (`edgerep.exporters.onnx.OnnxExporter`);
(2) offline checks that need neither TensorRT nor a GPU: every ONNX op is one the
TensorRT ONNX parser supports (`TRT_ONNX_OPS`, from the operator matrix of
onnx-tensorrt for TensorRT 10), int8 is asked only of a graph with Q/DQ nodes,
and every symbolic dim has a min/opt/max for the optimization profile (from the
spec's ranges: ``N[1..8..64]`` gives min 1, opt 8, max 64; an unbounded symbol
gets `edgerep.spec.bounded_max`, with a note); (3) write ``build_engine.sh`` (the
exact ``trtexec`` command: ``--minShapes/--optShapes/--maxShapes``, ``--fp16`` /
``--int8``, ``--memPoolSize``, ``--saveEngine``, ``--timingCacheFile``) and
``build_plan.json``; (4) where tensorrt and a CUDA GPU are present, build the
engine with the TensorRT Python API (``trt.Builder`` → ``create_network`` →
``OnnxParser`` → ``create_builder_config`` with the workspace limit, precision
flags, one optimization profile and a timing cache → ``build_serialized_network``)
and write ``model.engine``, ``timing.cache`` and ``model.engine.json`` (the
TensorRT version, GPU name and compute capability the engine is tied to).
Without them the artifact is *not built here*: its ``path`` is the build plan.

tensorrt is imported inside the functions that need it.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import shlex
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgerep.errors import ConfigError, ExportError, MissingDependencyError
from edgerep.exporters._base import Artifact, Problem, package_versions
from edgerep.exporters._ops import check_arity, short_error, unsupported_op_problem

if TYPE_CHECKING:
    import onnx
    import torch

    from edgerep.spec import InputSpec, ShapeProfile

__all__ = [
    "ENGINE_INFO_SUFFIX",
    "TRT_ONNX_OPS",
    "TensorRTExporter",
    "gpu_description",
    "trtexec_command",
]

logger = logging.getLogger(__name__)

_ONNX = "model.onnx"
_ENGINE = "model.engine"
_CACHE = "timing.cache"
_SCRIPT = "build_engine.sh"
_PLAN = "build_plan.json"
#: sidecar recording what an engine is tied to: ``model.engine`` -> ``model.engine.json``
ENGINE_INFO_SUFFIX = ".json"
_PRECISIONS = ("fp32", "fp16", "int8")

#: ONNX ops (default domain) the TensorRT 10 ONNX parser supports, from the operator
#: support matrix of onnx-tensorrt (docs/operators.md, TensorRT 10.x). Restrictions on
#: attributes (e.g. Resize modes) are checked by the parser at build time.
TRT_ONNX_OPS = frozenset(
    [
        "Abs",
        "Acos",
        "Acosh",
        "Add",
        "And",
        "ArgMax",
        "ArgMin",
        "Asin",
        "Asinh",
        "Atan",
        "Atanh",
        "Attention",
        "AveragePool",
        "BatchNormalization",
        "BlackmanWindow",
        "Cast",
        "CastLike",
        "Ceil",
        "Celu",
        "Clip",
        "Concat",
        "Constant",
        "ConstantOfShape",
        "Conv",
        "ConvTranspose",
        "Cos",
        "Cosh",
        "CumSum",
        "DeformConv",
        "DepthToSpace",
        "DequantizeLinear",
        "Div",
        "Dropout",
        "Einsum",
        "Elu",
        "Equal",
        "Erf",
        "Exp",
        "Expand",
        "EyeLike",
        "Flatten",
        "Floor",
        "Gather",
        "GatherElements",
        "GatherND",
        "Gelu",
        "Gemm",
        "GlobalAveragePool",
        "GlobalLpPool",
        "GlobalMaxPool",
        "Greater",
        "GreaterOrEqual",
        "GridSample",
        "GroupNormalization",
        "GRU",
        "HammingWindow",
        "HannWindow",
        "HardSigmoid",
        "HardSwish",
        "Hardmax",
        "Identity",
        "If",
        "ImageScaler",
        "InstanceNormalization",
        "IsInf",
        "IsNaN",
        "LayerNormalization",
        "LeakyRelu",
        "Less",
        "LessOrEqual",
        "Log",
        "LogSoftmax",
        "Loop",
        "LRN",
        "LSTM",
        "LpNormalization",
        "LpPool",
        "MatMul",
        "Max",
        "MaxPool",
        "Mean",
        "MeanVarianceNormalization",
        "Min",
        "Mish",
        "Mod",
        "Mul",
        "Neg",
        "NonMaxSuppression",
        "NonZero",
        "Not",
        "OneHot",
        "Or",
        "Pad",
        "ParametricSoftplus",
        "Pow",
        "PRelu",
        "QuantizeLinear",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Range",
        "Reciprocal",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceMax",
        "ReduceMean",
        "ReduceMin",
        "ReduceProd",
        "ReduceSum",
        "ReduceSumSquare",
        "Relu",
        "Reshape",
        "Resize",
        "ReverseSequence",
        "RMSNormalization",
        "RNN",
        "RoiAlign",
        "RotaryEmbedding",
        "Round",
        "STFT",
        "ScaledTanh",
        "Scan",
        "Scatter",
        "ScatterElements",
        "ScatterND",
        "Selu",
        "Shape",
        "Shrink",
        "Sigmoid",
        "Sign",
        "Sin",
        "Sinh",
        "Size",
        "Slice",
        "Softmax",
        "Softplus",
        "Softsign",
        "SpaceToDepth",
        "Split",
        "Sqrt",
        "Squeeze",
        "Sub",
        "Sum",
        "Tan",
        "Tanh",
        "TensorScatter",
        "ThresholdedRelu",
        "Tile",
        "TopK",
        "Transpose",
        "Trilu",
        "Unsqueeze",
        "Upsample",
        "Where",
        "Xor",
    ]
)


def _tensorrt_installed() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def gpu_description() -> dict[str, Any] | None:
    """Name and compute capability (``"8.9"``) of CUDA device 0, or None without one."""
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def trtexec_command(
    profiles: Sequence[ShapeProfile],
    *,
    precision: str = "fp32",
    workspace_mib: int = 1024,
    onnx_file: str = _ONNX,
    engine_file: str = _ENGINE,
    timing_cache_file: str = _CACHE,
    builder_optimization_level: int | None = None,
) -> list[str]:
    """The ``trtexec`` argv that builds the engine (run in the folder holding `onnx_file`).

    Shapes are given for inputs with symbolic dims only (static inputs need none).
    """
    argv = [
        "trtexec",
        f"--onnx={onnx_file}",
        f"--saveEngine={engine_file}",
        f"--timingCacheFile={timing_cache_file}",
        f"--memPoolSize=workspace:{int(workspace_mib)}M",
    ]
    dynamic = [p for p in profiles if p.min != p.max]
    if dynamic:
        for flag, attr in (("--minShapes", "min"), ("--optShapes", "opt"), ("--maxShapes", "max")):
            argv.append(
                f"{flag}=" + ",".join(f"{p.name}:{_shape_text(getattr(p, attr))}" for p in dynamic)
            )
    if precision == "fp32":
        argv.append("--noTF32")  # TF32 is on by default on Ampere+; fp32 parity needs it off
    if precision in ("fp16", "int8"):
        argv.append("--fp16")
    if precision == "int8":
        argv.append("--int8")
    if builder_optimization_level is not None:
        argv.append(f"--builderOptimizationLevel={int(builder_optimization_level)}")
    argv.append("--skipInference")
    return argv


def _node_module(node: Any) -> str:
    """The module path the dynamo ONNX exporter recorded for a node, else its name."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                break
            if isinstance(scopes, list) and len(scopes) >= 2:
                return str(scopes[-2]) or "<root>"
    return node.name or node.op_type


def _trt_problems(proto: onnx.ModelProto, precision: str) -> list[Problem]:
    """Ops the TensorRT parser lacks (with module paths) and int8 without Q/DQ nodes."""
    places: dict[str, list[str]] = {}
    ops: Counter[str] = Counter()
    for node in proto.graph.node:
        ops[node.op_type] += 1
        domain = node.domain or "ai.onnx"
        if domain == "ai.onnx" and node.op_type in TRT_ONNX_OPS:
            continue
        key = node.op_type if domain == "ai.onnx" else f"{domain}::{node.op_type}"
        places.setdefault(key, []).append(_node_module(node))
    problems = [
        unsupported_op_problem(
            "tensorrt",
            f"ONNX {op}",
            where,
            message="is not supported by the TensorRT 10 ONNX parser",
            fix=(
                "replace the torch op that produces it, or write a TensorRT plugin for it "
                "(see the onnx-tensorrt operator matrix)"
            ),
        )
        for op, where in sorted(places.items())
    ]
    if precision == "int8" and not (ops["QuantizeLinear"] and ops["DequantizeLinear"]):
        problems.append(
            Problem(
                "tensorrt",
                "needs-quantization",
                "<model>",
                "int8 engines need an explicitly quantized graph (QuantizeLinear/"
                "DequantizeLinear nodes); this graph has none",
                "quantize the model first (Q/DQ), or build with precision fp16",
            )
        )
    return problems


@dataclass(frozen=True)
class TensorRTExporter:
    """Builds a TensorRT engine from the ONNX export, or writes the plan to build it.

    Attributes:
        precision: ``"fp32"``, ``"fp16"`` (FP16 builder flag) or ``"int8"`` (INT8 and
            FP16 flags; needs a Q/DQ graph).
        workspace_mib: the builder's workspace memory pool limit, MiB.
        timing_cache: an existing timing cache to start from (e.g. from an earlier
            build on the same GPU); the updated cache is written as ``timing.cache``.
        builder_optimization_level: TensorRT's 0-5 builder optimization level (None:
            TensorRT's default, 3).
    """

    precision: str = "fp32"
    workspace_mib: int = 1024
    timing_cache: str | None = None
    builder_optimization_level: int | None = None

    format = "tensorrt"
    extra = "tensorrt"
    # what it needs to export; tensorrt itself only to build (offline checks otherwise)
    requires = ("onnx", "onnxscript", "onnxslim")
    runtime = "tensorrt"

    def __post_init__(self) -> None:
        if self.precision not in _PRECISIONS:
            raise ConfigError(
                f"TensorRT precision {self.precision!r} is not supported; choose one of "
                f"{', '.join(_PRECISIONS)}"
            )
        if int(self.workspace_mib) <= 0:
            raise ConfigError(f"workspace_mib must be positive, got {self.workspace_mib!r}")
        level = self.builder_optimization_level
        if level is not None and not 0 <= int(level) <= 5:
            raise ConfigError(f"builder_optimization_level must be 0..5, got {level!r}")

    # --- check ----------------------------------------------------------------------------

    def check(
        self,
        model: torch.nn.Module,
        example_inputs: Sequence[torch.Tensor],
        specs: Sequence[InputSpec],
    ) -> list[Problem]:
        """ONNX coverage, then the TensorRT parser's coverage of the ONNX graph (in memory).

        The ONNX graph is made in memory with the torch.export-based exporter; if
        that fails nothing more is reported here (`export` falls back to the
        TorchScript exporter and re-checks the file it writes).
        """
        from edgerep.exporters.onnx import OnnxExporter
        from edgerep.runtimes.torch_eager import output_names_for

        check_arity(example_inputs, specs)
        onnx_exporter = OnnxExporter()
        problems = [
            Problem("tensorrt", p.kind, p.where, p.message, p.fix)
            for p in onnx_exporter.check(model, example_inputs, specs)
        ]
        if problems:
            return problems
        from edgerep.exporters._ops import example_outputs

        names = output_names_for(len(example_outputs(model, example_inputs)))
        try:
            proto = onnx_exporter._export_dynamo(
                model, example_inputs, specs, [s.name for s in specs], names
            )
        except Exception as e:
            logger.info("in-memory ONNX export for the TensorRT check failed: %s", short_error(e))
            return []
        return _trt_problems(proto, self.precision)

    # --- export ---------------------------------------------------------------------------

    def export(
        self,
        model: torch.nn.Module,
        example_inputs: Sequence[torch.Tensor],
        specs: Sequence[InputSpec],
        out_dir: Path,
    ) -> Artifact:
        """Export ONNX, write the build plan, and build the engine where TensorRT can.

        Raises:
            MissingDependencyError: onnx is not installed.
            ExportError: the ONNX export failed, the graph fails the offline checks, or
                the TensorRT build failed.
        """
        import onnx

        from edgerep.exporters.onnx import OnnxExporter
        from edgerep.spec import shape_profiles

        check_arity(example_inputs, specs)
        out_dir = Path(out_dir)
        onnx_art = OnnxExporter().export(model, example_inputs, specs, out_dir)
        notes = [f"onnx: {n}" for n in onnx_art.notes]
        proto = onnx.load(str(onnx_art.path), load_external_data=False)
        problems = _trt_problems(proto, self.precision)
        if problems:
            raise ExportError(
                "the ONNX graph fails TensorRT's offline checks:\n"
                + "\n".join(f"  - {p}" for p in problems)
            )
        profiles = shape_profiles(specs)
        for p in profiles:
            for sym in p.defaulted:
                notes.append(
                    f"symbol {sym} has no upper bound; the optimization profile uses max "
                    f"{p.max} for input {p.name!r} (give e.g. {sym}[1..8..64])"
                )
        argv = trtexec_command(
            profiles,
            precision=self.precision,
            workspace_mib=self.workspace_mib,
            builder_optimization_level=self.builder_optimization_level,
        )
        command = shlex.join(argv)
        script = out_dir / _SCRIPT
        script.write_text(
            "#!/bin/sh\n"
            "# Builds the TensorRT engine from model.onnx on the target machine (TensorRT 10+);\n"
            "# an engine is tied to the TensorRT version and GPU it was built with.\n"
            'cd "$(dirname "$0")" || exit 1\n'
            f"exec {command}\n"
        )
        script.chmod(0o755)
        plan = {
            "onnx": _ONNX,
            "engine": _ENGINE,
            "timing_cache": _CACHE,
            "precision": self.precision,
            "workspace_mib": int(self.workspace_mib),
            "builder_optimization_level": self.builder_optimization_level,
            "profiles": [
                {"input": p.name, "min": list(p.min), "opt": list(p.opt), "max": list(p.max)}
                for p in profiles
            ],
            "trtexec": argv,
            "checks": {
                "onnx_checker": "passed",
                "ops_supported_by_tensorrt_10_parser": "passed",
                "op_types": dict(onnx_art.metadata.get("op_types", {})),
            },
        }
        files = [*onnx_art.files, _SCRIPT, _PLAN]
        versions = {**dict(onnx_art.tool_versions), **package_versions("tensorrt")}
        metadata: dict[str, Any] = {
            "exporter": f"onnx ({onnx_art.metadata.get('exporter')}) -> tensorrt",
            "opset": onnx_art.metadata.get("opset"),
            "op_types": dict(onnx_art.metadata.get("op_types", {})),
            "trtexec": command,
            "profiles": plan["profiles"],
        }
        why = self._why_not_here()
        if why:
            plan["status"] = f"not built here: {why}"
            (out_dir / _PLAN).write_text(json.dumps(plan, indent=2) + "\n")
            return Artifact(
                format=self.format,
                path=out_dir / _PLAN,
                precision=self.precision,
                files=tuple(files),
                inputs=onnx_art.inputs,
                outputs=onnx_art.outputs,
                tool_versions=versions,
                notes=(*notes, f"engine not built here ({why}); run {_SCRIPT} on the target"),
                metadata={**metadata, "built": False},
                built=False,
                not_built_reason=f"{why}; build on the target with {_SCRIPT}: {command}",
            )
        engine_info = self._build(onnx_art.path, profiles, out_dir)
        plan["status"] = "built"
        plan["built_with"] = engine_info
        (out_dir / _PLAN).write_text(json.dumps(plan, indent=2) + "\n")
        files += [_ENGINE, _ENGINE + ENGINE_INFO_SUFFIX, _CACHE]
        return Artifact(
            format=self.format,
            path=out_dir / _ENGINE,
            precision=self.precision,
            files=tuple(files),
            inputs=onnx_art.inputs,
            outputs=onnx_art.outputs,
            tool_versions=versions,
            notes=tuple(notes),
            metadata={**metadata, "built": True, "built_with": engine_info},
        )

    def _why_not_here(self) -> str:
        if not _tensorrt_installed():
            return "tensorrt is not installed (pip install 'edgerep[tensorrt]' on a machine with an NVIDIA GPU)"
        if gpu_description() is None:
            return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
        return ""

    def _build(
        self, onnx_path: Path, profiles: Sequence[ShapeProfile], out_dir: Path
    ) -> dict[str, Any]:
        """Build and write the engine, its timing cache and its info sidecar."""
        try:
            import tensorrt as trt
        except ImportError as e:
            raise MissingDependencyError("tensorrt", "tensorrt", "building TensorRT engines") from e
        logger_ = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger_)
        network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
        parser = trt.OnnxParser(network, logger_)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ExportError(f"the TensorRT ONNX parser rejects {onnx_path.name}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(self.workspace_mib) << 20)
        if self.precision == "fp32":
            config.clear_flag(trt.BuilderFlag.TF32)  # fp32 parity: no TF32 matmuls/convs
        if self.precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if self.precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
        if self.builder_optimization_level is not None:
            config.builder_optimization_level = int(self.builder_optimization_level)
        dynamic = [p for p in profiles if p.min != p.max]
        if dynamic:
            profile = builder.create_optimization_profile()
            for p in dynamic:
                profile.set_shape(p.name, p.min, p.opt, p.max)
            config.add_optimization_profile(profile)
        seed = b""
        if self.timing_cache:
            cache_path = Path(self.timing_cache)
            if not cache_path.is_file():
                raise ConfigError(f"timing cache {str(cache_path)!r} does not exist")
            seed = cache_path.read_bytes()
        cache = config.create_timing_cache(seed)
        config.set_timing_cache(cache, ignore_mismatch=False)
        try:
            serialized = builder.build_serialized_network(network, config)
        except Exception as e:
            raise ExportError(f"TensorRT engine build failed: {short_error(e)}") from e
        if serialized is None:
            raise ExportError(
                "TensorRT engine build failed (build_serialized_network returned None; the "
                "builder's log above says why); try a larger workspace_mib"
            )
        (out_dir / _ENGINE).write_bytes(bytes(serialized))
        (out_dir / _CACHE).write_bytes(bytes(config.get_timing_cache().serialize()))
        gpu = gpu_description() or {}
        info = {
            "tensorrt": trt.__version__,
            "gpu": gpu.get("name"),
            "compute_capability": gpu.get("compute_capability"),
            "precision": self.precision,
        }
        (out_dir / (_ENGINE + ENGINE_INFO_SUFFIX)).write_text(json.dumps(info, indent=2) + "\n")
        return info
