"""TensorRT: runs serialized engines on a CUDA GPU (buffers are torch CUDA tensors).

An engine runs only with the TensorRT version and on the GPU architecture
(compute capability) it was built with. The exporter records both in
``model.engine.json``; `TensorRTRuntime.load` compares them with this machine
*before* deserializing and names both sides and the fix when they differ. No
options.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgerep.errors import ConfigError, MissingDependencyError, UnsupportedError
from edgerep.runtimes._base import SessionBase, check_feeds

if TYPE_CHECKING:
    import numpy as np

__all__ = ["TensorRTRuntime", "TensorRTSession", "engine_mismatch"]

_INFO_SUFFIX = ".json"
_REBUILD = (
    "rebuild the engine here: run build_engine.sh next to it (trtexec), or "
    "`edgerep convert ... --to tensorrt` on this machine"
)


def engine_mismatch(built_with: Mapping[str, Any], here: Mapping[str, Any]) -> str:
    """Why an engine built with `built_with` cannot run `here` (``""`` when it can).

    Both map ``tensorrt`` (version) and ``compute_capability`` (e.g. ``"8.9"``); a key
    missing on either side is not compared.
    """
    problems = []
    want, have = built_with.get("tensorrt"), here.get("tensorrt")
    if want and have and str(want) != str(have):
        problems.append(f"it was built with TensorRT {want} but this machine has TensorRT {have}")
    want_cc, have_cc = built_with.get("compute_capability"), here.get("compute_capability")
    if want_cc and have_cc and str(want_cc) != str(have_cc):
        gpu = f" ({built_with['gpu']})" if built_with.get("gpu") else ""
        this = f" ({here['gpu']})" if here.get("gpu") else ""
        problems.append(
            f"it was built for a GPU of compute capability {want_cc}{gpu} but this GPU has "
            f"{have_cc}{this}"
        )
    return "; ".join(problems)


def _import_trt() -> Any:
    try:
        import tensorrt
    except ImportError as e:
        raise MissingDependencyError("tensorrt", "tensorrt", "running TensorRT engines") from e
    return tensorrt


def _here(device_index: int) -> dict[str, Any]:
    import torch

    trt = _import_trt()
    major, minor = torch.cuda.get_device_capability(device_index)
    return {
        "tensorrt": trt.__version__,
        "gpu": torch.cuda.get_device_name(device_index),
        "compute_capability": f"{major}.{minor}",
    }


def _torch_dtype(trt: Any, dtype: Any) -> Any:
    import torch

    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT8: torch.int8,
        trt.DataType.BOOL: torch.bool,
    }
    for name, t in (("INT64", torch.int64), ("BF16", torch.bfloat16), ("UINT8", torch.uint8)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = t
    if dtype not in table:
        raise UnsupportedError(f"TensorRT tensor type {dtype} has no torch equivalent here")
    return table[dtype]


class TensorRTSession(SessionBase):
    """An engine and one execution context behind the `Session` protocol."""

    def __init__(self, engine: Any, path: Path, device_index: int, info: Mapping[str, Any]) -> None:
        trt = _import_trt()
        self._trt = trt
        self._engine: Any = engine
        self._context: Any = engine.create_execution_context()
        self._path = path
        self._device_index = device_index
        self._info = dict(info)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._input_names = [
            n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT
        ]
        self._output_names = [
            n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT
        ]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run once on the GPU; inputs are copied in and outputs copied back.

        Raises:
            ConfigError: the feeds do not match the inputs, or the session is closed.
            UnsupportedError: a shape outside the engine's optimization profile, or
                the execution failed.
        """
        import numpy as np
        import torch

        if self._context is None:
            raise ConfigError(f"the TensorRT session for {str(self._path)!r} is closed")
        check_feeds(feeds, self._input_names, "tensorrt")
        device = torch.device("cuda", self._device_index)
        keep = []
        for name in self._input_names:
            want = _torch_dtype(self._trt, self._engine.get_tensor_dtype(name))
            t = torch.from_numpy(np.ascontiguousarray(feeds[name])).to(device=device, dtype=want)
            if not self._context.set_input_shape(name, tuple(t.shape)):
                raise UnsupportedError(
                    f"input {name!r} shape {tuple(t.shape)} is outside the engine's optimization "
                    f"profile {self._engine.get_tensor_profile_shape(name, 0)} (min, opt, max)"
                )
            self._context.set_tensor_address(name, t.data_ptr())
            keep.append(t)
        outs = []
        for name in self._output_names:
            shape = tuple(self._context.get_tensor_shape(name))
            dtype = _torch_dtype(self._trt, self._engine.get_tensor_dtype(name))
            o = torch.empty(shape, dtype=dtype, device=device)
            self._context.set_tensor_address(name, o.data_ptr())
            outs.append(o)
        stream = torch.cuda.current_stream(device)
        if not self._context.execute_async_v3(stream.cuda_stream):
            raise UnsupportedError(f"TensorRT failed to execute {self._path.name}")
        stream.synchronize()
        return [
            o.float().cpu().numpy() if o.dtype == torch.bfloat16 else o.cpu().numpy() for o in outs
        ]

    def device_memory_bytes(self) -> int | None:
        """The engine's activation memory plus what torch allocated for the buffers, at peak."""
        if self._engine is None:
            return None
        import torch

        engine = self._engine
        # TensorRT 10 names it device_memory_size_v2; 8.x device_memory_size
        size: Any = getattr(engine, "device_memory_size_v2", None)
        if size is None:
            size = getattr(engine, "device_memory_size", 0)
        return int(size) + int(torch.cuda.max_memory_allocated(self._device_index))

    def close(self) -> None:
        """Drop the context and the engine; idempotent."""
        self._context = None
        self._engine = None

    def describe(self) -> dict[str, Any]:
        """Runtime, version, GPU and what the engine was built with."""
        import torch

        return {
            "runtime": "tensorrt",
            "version": self._trt.__version__,
            "device": f"cuda:{self._device_index}",
            "gpu": torch.cuda.get_device_name(self._device_index),
            "built_with": self._info,
        }


@dataclass(frozen=True)
class TensorRTRuntime:
    """TensorRT on the CUDA GPUs torch sees."""

    name = "tensorrt"
    formats = ("tensorrt",)

    def is_available(self) -> bool:
        """Whether tensorrt is installed."""
        return importlib.util.find_spec("tensorrt") is not None

    def unavailable_reason(self) -> str:
        """What is missing to run engines here: tensorrt, torch with CUDA, or a GPU."""
        if not self.is_available():
            return (
                "tensorrt is not installed (pip install 'edgerep[tensorrt]' on a machine with an "
                "NVIDIA GPU)"
            )
        if importlib.util.find_spec("torch") is None:
            return "torch is needed for the GPU buffers (pip install 'edgerep[torch]')"
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
        return ""

    def devices(self) -> list[str]:
        """``["cuda:0", ...]`` when TensorRT can run here, else ``[]``."""
        if self.unavailable_reason():
            return []
        import torch

        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]

    def capabilities(self, device: str) -> dict[str, Any]:
        """TensorRT version, GPU name and compute capability of `device`."""
        index = self._index(device)
        return {
            "runtime": self.name,
            "device": device,
            **_here(index),
            "formats": list(self.formats),
        }

    def _index(self, device: str) -> int:
        why = self.unavailable_reason()
        if why:
            raise UnsupportedError(f"TensorRT cannot run here: {why}")
        kind, _, index = device.partition(":")
        if kind not in ("cuda", "gpu") or (index and not index.isdigit()):
            raise UnsupportedError(
                f"TensorRT runs on CUDA devices, not {device!r}; available: {', '.join(self.devices())}"
            )
        i = int(index or 0)
        if f"cuda:{i}" not in self.devices():
            raise UnsupportedError(
                f"no CUDA device {i} here; available: {', '.join(self.devices())}"
            )
        return i

    def load(
        self,
        artifact_path: str | Path,
        *,
        device: str = "cuda:0",
        options: Mapping[str, Any] | None = None,
    ) -> TensorRTSession:
        """Deserialize an engine, after checking it was built for this TensorRT and GPU.

        Raises:
            MissingDependencyError: tensorrt is not installed.
            ConfigError: options were given, or the file does not exist.
            UnsupportedError: no CUDA GPU, or the engine was built with another
                TensorRT version or for another GPU architecture (both named).
        """
        if options:
            raise ConfigError(f"the tensorrt runtime takes no options, got {sorted(options)}")
        path = Path(artifact_path)
        if not path.is_file():
            raise ConfigError(f"TensorRT engine {str(path)!r} does not exist")
        index = self._index(device)
        trt = _import_trt()
        info = _read_info(path)
        here = _here(index)
        mismatch = engine_mismatch(info, here)
        if mismatch:
            raise UnsupportedError(
                f"cannot load the TensorRT engine {str(path)!r}: {mismatch}; {_REBUILD}"
            )
        import torch

        with torch.cuda.device(index):
            runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            built = (
                f"built with TensorRT {info.get('tensorrt')} for compute capability "
                f"{info.get('compute_capability')}"
                if info
                else "of unknown origin (no model.engine.json next to it)"
            )
            raise UnsupportedError(
                f"TensorRT {here['tensorrt']} on {here['gpu']} (compute capability "
                f"{here['compute_capability']}) cannot deserialize {str(path)!r}, {built}; {_REBUILD}"
            )
        return TensorRTSession(engine, path, index, info)


def _read_info(path: Path) -> dict[str, Any]:
    side = path.with_name(path.name + _INFO_SUFFIX)
    if not side.is_file():
        return {}
    try:
        data = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{str(side)!r} is not valid JSON ({e})") from e
    return data if isinstance(data, dict) else {}
