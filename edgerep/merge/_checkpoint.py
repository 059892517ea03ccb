"""Merging checkpoints on disk, shard by shard: a PEFT adapter into a model, or several models.

A checkpoint is a Hugging Face model directory: ``config.json`` plus either one
``model.safetensors`` or shards listed by ``model.safetensors.index.json``. Both
verbs read the input memory-mapped, one shard at a time, and write a new checkpoint
with the same shard files, the same index and the other files copied (config,
tokenizer, ...), so that peak memory is about one output shard plus float64
scratch for one tensor, never the model:

* `merge_adapter_checkpoint`: each layer the adapter targets is rebuilt alone, in
  float64 (its base tensors from the shard, its adapter tensors from the adapter
  file), wrapped by PEFT with the adapter's own config, and merged exactly like
  `edgerep.merge` merges a layer in memory (`_engine._read`: the fast path,
  the LoRA rule or PEFT's own merge, gated by the verifier on random rows against the wrapped
  layer's forward, the probe as fallback); the result is rounded once to the
  stored dtype (bf16/fp16/fp32). The in-memory merge of the same model gives the
  same bits. VeRA's shared projections (``vera_A``, ``vera_B``) are given to each
  layer as the corner its forward slices; the trained copies of ``modules_to_save``
  replace the checkpoint's tensors of those modules (rounded once to their dtype).
* `merge_checkpoints`: model merging of full fine-tuned checkpoints (model soups,
  task arithmetic, TIES, DARE, ...): per tensor, the deltas ``θ_i - θ_base`` are
  combined by `edgerep.merge._combine` (the code adapter combinations use), in
  float64, and added to the base; the report has per-tensor statistics (sign
  conflicts, fraction of the delta kept). Large tensors go in chunks of whole rows
  (`CHUNK_ELEMENTS`), bit for bit what whole tensors give, so memory holds a few
  float64 copies of one chunk per model (plus one float32 copy of one delta's
  magnitudes for TIES/Breadcrumbs), never a whole tensor in float64. Each checkpoint
  may also be one ``.safetensors`` file or a ``torch.save`` state dict.

Everything is checked before anything is written (missing shards, an index that
names a missing file, adapter targets absent from the model or of another shape,
non-floating targets, mismatched keys, shapes or dtypes between models); the
output is written to a temporary directory and renamed when complete.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgerep.errors import ConfigError, SourceError, UnsupportedError, did_you_mean
from edgerep.fold import verify
from edgerep.fold.probe import round_to
from edgerep.merge.report import RouteSummary

logger = logging.getLogger(__name__)

__all__ = [
    "Checkpoint",
    "CheckpointMergeReport",
    "TensorRow",
    "is_checkpoint",
    "is_checkpoint_dir",
    "merge_adapter_checkpoint",
    "merge_checkpoints",
]

_F64 = torch.float64
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
REPORT = "edgerep_merge.json"


def _safetensors() -> Any:
    try:
        import safetensors
        import safetensors.torch
    except ImportError as e:  # pragma: no cover - the peft extra brings it
        from edgerep.errors import MissingDependencyError

        raise MissingDependencyError("safetensors", "peft", "merging checkpoints") from e
    return safetensors


# --- checkpoints --------------------------------------------------------------------------


STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin")
"""Suffixes of a state-dict file (``torch.save`` of a flat name -> tensor mapping)."""


def is_checkpoint_dir(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a directory holding a safetensors checkpoint (single or sharded)."""
    p = Path(path)
    return p.is_dir() and ((p / INDEX).is_file() or (p / SINGLE).is_file())


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is something a checkpoint merge reads: a checkpoint directory, one
    ``.safetensors`` file, or a state-dict file (``.pt``, ``.pth``, ``.bin``)."""
    p = Path(path)
    return is_checkpoint_dir(p) or (
        p.is_file() and p.suffix in (".safetensors", *STATE_DICT_SUFFIXES)
    )


def _load_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A flat ``str -> tensor`` state dict from `path`, unpickled with ``weights_only``
    (tensors and plain containers only, never arbitrary objects) and memory-mapped when
    the file is in torch's zip format."""
    import pickle

    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # the legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as e:
        raise SourceError(
            f"{what} {str(path)!r} cannot be read as a state dict with torch.load(weights_only="
            f"True) ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); give a "
            "file saved with torch.save(model.state_dict(), ...) or a safetensors checkpoint"
        ) from e
    if not isinstance(obj, Mapping):
        raise SourceError(
            f"{what} {str(path)!r} holds a {type(obj).__name__}, not a state dict (a mapping "
            "of tensor names to tensors); save model.state_dict()"
        )
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            hint = (
                f" (it looks like a training checkpoint: save its {k!r} entry alone)"
                if isinstance(v, Mapping)
                else ""
            )
            raise SourceError(
                f"{what} {str(path)!r} is not a flat state dict: entry {k!r} is a "
                f"{type(v).__name__}, not a tensor{hint}"
            )
    return dict(obj)


@dataclass
class Checkpoint:
    """A safetensors checkpoint directory: which file holds each tensor.

    Also one ``.safetensors`` file, or a state-dict file (``.pt``/``.pth``/``.bin``,
    read with ``torch.load(weights_only=True, mmap=True)``): one shard, written out as
    ``model.safetensors``.

    Attributes:
        path: the directory (the file's directory for a file).
        weight_map: tensor name -> shard file name, in the order the shards are read.
        shards: the shard file names, in index order.
        index: the index JSON as read (None for a single ``model.safetensors``).
        kind: 'dir', 'safetensors' (one file) or 'state_dict' (one ``torch.save`` file).
        state: the state dict's tensors (kind 'state_dict').
    """

    path: Path
    weight_map: dict[str, str]
    shards: list[str]
    index: dict[str, Any] | None = None
    kind: str = "dir"
    state: dict[str, torch.Tensor] | None = None

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, what: str = "checkpoint") -> Checkpoint:
        """Read the index (or the single file's header) and check every shard exists.

        Raises:
            SourceError: not a checkpoint directory, an unreadable index, a missing
                shard, or a shard whose tensors differ from what the index says.
        """
        st = _safetensors()
        root = Path(path).expanduser()
        if root.is_file() and root.suffix in STATE_DICT_SUFFIXES:
            state = _load_state_dict(root, what)
            for k, v in state.items():
                if v.dtype not in _NAMES:
                    raise UnsupportedError(
                        f"{what} {str(root)!r}: tensor {k!r} is {v.dtype}, which a merge does "
                        f"not write (allowed: {', '.join(str(d) for d in _NAMES)})"
                    )
            return cls(
                root.parent,
                dict.fromkeys(state, root.name),
                [root.name],
                kind="state_dict",
                state=state,
            )
        if root.is_file() and root.suffix == ".safetensors":
            ckpt = cls(root.parent, {}, [root.name], kind="safetensors")
            ckpt._check_headers(st, what)
            return ckpt
        if not root.is_dir():
            raise SourceError(
                f"{what} {str(root)!r} is neither a checkpoint directory nor a .safetensors, "
                f".pt, .pth or .bin file" + ("" if root.exists() else " (it does not exist)")
            )
        index_path = root / INDEX
        if index_path.is_file():
            try:
                index = json.loads(index_path.read_text())
                weight_map = dict(index["weight_map"])
            except (ValueError, KeyError, TypeError) as e:
                raise SourceError(
                    f"{what} index {str(index_path)!r} is not a safetensors index with a "
                    f"'weight_map' ({type(e).__name__}: {e})"
                ) from e
            shards = list(dict.fromkeys(weight_map.values()))
            missing = [s for s in shards if not (root / s).is_file()]
            if missing:
                raise SourceError(
                    f"{what} index {str(index_path)!r} names shard(s) that do not exist: "
                    f"{', '.join(missing)}; the checkpoint is incomplete (copy the missing files "
                    "or fix the index)"
                )
        elif (root / SINGLE).is_file():
            index, shards = None, [SINGLE]
            weight_map = {}
        else:
            raise SourceError(
                f"{what} {str(root)!r} holds neither {INDEX} nor {SINGLE}; give a Hugging Face "
                "model directory saved with safetensors"
            )
        ckpt = cls(root, weight_map, shards, index)
        ckpt._check_headers(st, what)
        return ckpt

    def _check_headers(self, st: Any, what: str) -> None:
        seen: dict[str, str] = {}
        for shard in self.shards:
            try:
                with st.safe_open(str(self.path / shard), framework="pt") as f:
                    keys = list(f.keys())
            except Exception as e:
                raise SourceError(
                    f"{what} shard {str(self.path / shard)!r} is not a readable safetensors file "
                    f"({type(e).__name__}: {e})"
                ) from e
            for k in keys:
                seen[k] = shard
        if self.index is None:
            self.weight_map = seen
            return
        wrong = [k for k, s in self.weight_map.items() if seen.get(k) != s]
        if wrong:
            k = wrong[0]
            raise SourceError(
                f"{what} index says {k!r} is in {self.weight_map[k]!r}, but "
                f"{'no shard holds it' if k not in seen else f'it is in {seen[k]!r}'} "
                f"({len(wrong)} such tensor(s)); the index does not match the shards"
            )

    def keys_of(self, shard: str) -> list[str]:
        return [k for k, s in self.weight_map.items() if s == shard]


class _Reader:
    """Open shards of one checkpoint lazily (memory-mapped) and read tensors by name."""

    def __init__(self, ckpt: Checkpoint, stack: ExitStack) -> None:
        self.ckpt = ckpt
        self._stack = stack
        self._open: dict[str, Any] = {}

    def _file(self, shard: str) -> Any:
        if shard not in self._open:
            st = _safetensors()
            self._open[shard] = self._stack.enter_context(
                st.safe_open(str(self.ckpt.path / shard), framework="pt")
            )
        return self._open[shard]

    def close_all(self) -> None:
        """Unmap every open shard (they reopen on the next read)."""
        for handle in self._open.values():
            handle.__exit__(None, None, None)
        self._open.clear()

    def get(self, key: str) -> torch.Tensor:
        if self.ckpt.state is not None:
            return self.ckpt.state[key]
        return self._file(self.ckpt.weight_map[key]).get_tensor(key)

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor (only those are read from the file)."""
        if self.ckpt.state is not None:
            return self.ckpt.state[key][start:stop]
        return self._file(self.ckpt.weight_map[key]).get_slice(key)[start:stop]

    def header(self, key: str) -> tuple[str, list[int]]:
        if self.ckpt.state is not None:
            t = self.ckpt.state[key]
            return _NAMES[t.dtype], list(t.shape)
        s = self._file(self.ckpt.weight_map[key]).get_slice(key)
        return str(s.get_dtype()), list(s.get_shape())

    def metadata(self, shard: str) -> dict[str, str] | None:
        if self.ckpt.state is not None:
            return {"format": "pt"}
        meta = self._file(shard).metadata()
        return dict(meta) if meta else None


# --- report -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorRow:
    """What happened to one merged tensor (or one merged layer).

    Attributes:
        key: the tensor name (a layer's module path for adapter merges).
        route: 'fast:<rule>' or 'probe' (adapter merges), the method (model merges).
        dtype: the stored dtype, rounded to once.
        max_rel_error: the verifier's float64 error (adapter merges).
        sign_conflicts: fraction of entries where the nonzero deltas disagree in sign.
        density_kept: fraction of entries the combined delta keeps nonzero.
        fallback: why a fast rule was not used ('' otherwise).
    """

    key: str
    route: str
    dtype: str
    max_rel_error: float | None = None
    sign_conflicts: float | None = None
    density_kept: float | None = None
    fallback: str = ""


@dataclass
class CheckpointMergeReport(RouteSummary):
    """The report of `merge_adapter_checkpoint` or `merge_checkpoints`."""

    kind: str  # 'adapter' or 'models'
    source: str
    out: str
    inputs: list[str] = field(default_factory=list)
    method: str = ""
    weights: list[float] = field(default_factory=list)
    density: float | None = None
    seed: int = 0
    shards: int = 0
    tensors: int = 0
    merged: list[TensorRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["routes"] = self.routes
        d["max_rel_error"] = self.max_error
        return d

    def to_text(self) -> str:
        head = f"merge (checkpoint, {self.kind}): {self.source} + {', '.join(self.inputs)} -> {self.out}"
        lines = [head]
        if self.kind == "models":
            lines.append(
                f"method {self.method}, weights {self.weights}"
                + (f", density {self.density:g}" if self.density is not None else "")
                + (f", seed {self.seed}" if self.method.startswith(("dare", "della")) else "")
            )
        routes = ", ".join(f"{k} {v}" for k, v in sorted(self.routes.items()))
        lines.append(
            f"{self.shards} shard(s), {self.tensors} tensor(s); merged {len(self.merged)} ({routes}); "
            f"time {self.seconds:.2f} s"
        )
        if self.kind == "adapter":
            lines.append(f"max rel error (float64, verifier): {self.max_error:.2e}")
        else:
            conflicts = [r.sign_conflicts for r in self.merged if r.sign_conflicts is not None]
            kept = [r.density_kept for r in self.merged if r.density_kept is not None]
            if conflicts:
                lines.append(
                    f"sign conflicts: mean {sum(conflicts) / len(conflicts):.3f}, max "
                    f"{max(conflicts):.3f}; delta kept: mean {sum(kept) / len(kept):.3f}"
                )
        for note in self.notes:
            lines.append(f"note: {note}")
        for r in self.merged:
            if r.fallback:
                lines.append(f"  {r.key}: via {r.route} ({r.fallback})")
        return "\n".join(lines)


# --- writing ------------------------------------------------------------------------------

Produce = Callable[[str, list[str]], Iterator[tuple[str, torch.Tensor | Iterator[torch.Tensor]]]]

_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


_NAMES = {v: k for k, v in _DTYPES.items()}


def _torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise UnsupportedError(f"safetensors dtype {name} is not one a merge writes")
    return _DTYPES[name]


def _write_shard(
    path: Path,
    entries: list[tuple[str, str, list[int]]],
    metadata: dict[str, str] | None,
    tensors: Iterator[tuple[str, torch.Tensor | Iterator[torch.Tensor]]],
) -> None:
    """Write one safetensors file tensor by tensor, so memory holds one tensor at a time.

    The header (names, dtypes, shapes, offsets) is known before any tensor is made,
    since a merge keeps every tensor's dtype and shape; the tensors must come in the
    order of `entries` with those dtypes and shapes.
    """
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key, dtype, shape in entries:
        size = _torch_dtype(dtype).itemsize
        for n in shape:
            size *= n
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        done = 0
        for (key, dtype, shape), (got, value) in zip(entries, tensors, strict=True):
            # a tensor, or its rows in order (chunks of a large tensor made one at a time)
            parts = [value] if isinstance(value, torch.Tensor) else value
            start = done
            for t in parts:
                whole = isinstance(value, torch.Tensor)
                if (
                    got != key
                    or t.dtype != _torch_dtype(dtype)
                    or (list(t.shape) != shape if whole else list(t.shape[1:]) != shape[1:])
                ):
                    raise RuntimeError(  # a bug in the merge, never the user's input
                        f"shard writer expected {key} {dtype} {shape}, got {got} {t.dtype} "
                        f"{list(t.shape)}"
                    )
                data = t.detach().contiguous().reshape(-1).view(torch.uint8)
                f.write(data.numpy().data)
                done += data.numel()
            expected = header[key]["data_offsets"]
            if [start, done] != expected:
                raise RuntimeError(f"shard writer wrote {key} at {[start, done]}, not {expected}")
        if done != offset:
            raise RuntimeError(f"shard writer wrote {done} bytes of {offset}")


def _write(
    ckpt: Checkpoint,
    reader: _Reader,
    out: Path,
    produce: Produce,
    report: CheckpointMergeReport,
    *,
    overwrite: bool,
) -> None:
    """Write every shard of `ckpt` as `produce(shard, keys)` yields its tensors, then the
    index and the other files, into a temporary directory renamed to `out` when complete.

    Every input shard is closed (unmapped) after each output shard, so the mapped
    pages of earlier shards do not accumulate.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for shard in ckpt.shards:
            keys = ckpt.keys_of(shard)
            entries = [(k, *reader.header(k)) for k in keys]
            name = shard if ckpt.kind == "dir" else SINGLE  # a file source: OUT/model.safetensors
            _write_shard(tmp / name, entries, reader.metadata(shard), produce(shard, keys))
            reader.close_all()
        if ckpt.index is not None:
            (tmp / INDEX).write_text(json.dumps(ckpt.index, indent=2) + "\n")
        for p in sorted(ckpt.path.iterdir()) if ckpt.kind == "dir" else []:
            if p.is_file() and p.name not in (INDEX, REPORT) and p.name not in ckpt.shards:
                shutil.copy2(p, tmp / p.name)
        report.shards = len(ckpt.shards)
        report.tensors = len(ckpt.weight_map)
        (tmp / REPORT).write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
        if out.exists():
            if not overwrite:
                raise ConfigError(f"output directory {str(out)!r} appeared while merging")
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_out(out: str | os.PathLike[str], sources: Sequence[Path], overwrite: bool) -> Path:
    from edgerep.bundle import check_output_dir

    target = check_output_dir(Path(out), overwrite=overwrite)
    for s in sources:
        if target == s.resolve() or target in s.resolve().parents:
            raise ConfigError(
                f"output directory {str(target)!r} is an input or holds one ({str(s)!r}); write the "
                "merge somewhere else"
            )
    return target


# --- an adapter into a checkpoint ---------------------------------------------------------


@dataclass
class _Target:
    """One layer the adapter changes: its module path and the tensors involved."""

    path: str
    weight: str  # the base checkpoint's key of the layer's weight
    bias: str | None
    adapter_keys: list[str]
    layer: str  # 'linear', 'conv1d-linear', 'embedding', 'conv'


_SAVED_PREFIX = "base_model.model."


def _adapter(adapter_dir: str | os.PathLike[str]) -> tuple[Any, dict[str, torch.Tensor], Path]:
    """The adapter's PEFT config and its tensors (small: read whole)."""
    st = _safetensors()
    root = Path(adapter_dir).expanduser()
    if not (root / ADAPTER_CONFIG).is_file():
        raise SourceError(
            f"adapter {str(root)!r} has no {ADAPTER_CONFIG}; give a PEFT adapter directory "
            "(saved with save_pretrained)"
        )
    if not (root / ADAPTER_WEIGHTS).is_file():
        raise SourceError(
            f"adapter {str(root)!r} has no {ADAPTER_WEIGHTS}; streaming merges read safetensors "
            "adapters only (re-save it with safe_serialization=True)"
        )
    from peft import PeftConfig

    try:
        config = PeftConfig.from_pretrained(str(root))
    except Exception as e:
        raise SourceError(
            f"adapter config {str(root / ADAPTER_CONFIG)!r} cannot be read by PEFT "
            f"({type(e).__name__}: {e})"
        ) from e
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tensors = st.torch.load_file(str(root / ADAPTER_WEIGHTS))
    return config, tensors, root


def _prefix(config: Any) -> str:
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    if config.is_prompt_learning:
        raise UnsupportedError(
            f"adapter type {config.peft_type} is prompt learning: it has no layer to merge into "
            "the checkpoint"
        )
    tuner = PEFT_TYPE_TO_TUNER_MAPPING.get(config.peft_type)
    prefix = getattr(tuner, "prefix", None)
    if not prefix:
        raise UnsupportedError(f"adapter type {config.peft_type} is not known to this PEFT")
    return str(prefix)


# VeRA's projections, shared by every layer (each layer uses their top-left corner)
_VERA_SHARED = ("base_model.vera_A", "base_model.vera_B")


def _is_saved_module(config: Any, name: str) -> bool:
    """Whether the checkpoint key `name` is a tensor of one of the config's modules_to_save."""
    module = name.rpartition(".")[0]
    return any(
        module == m or module.endswith(f".{m}")
        for m in getattr(config, "modules_to_save", None) or ()
    )


#: tensors that `tie_word_embeddings` ties: input embeddings and output heads
_EMBEDDING_OR_HEAD = re.compile(
    r"(^|\.)(embed_tokens|word_embeddings|wte|embed_in|lm_head|embed_out)\.weight$"
)


def _ties_embeddings(root: Path) -> bool:
    """Whether the checkpoint's config ties input embeddings and output head (a config
    without the key takes transformers' default, True)."""
    try:
        config = json.loads((root / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(config.get("tie_word_embeddings", True)) if isinstance(config, dict) else False


def _saved_modules(
    config: Any, tensors: Mapping[str, torch.Tensor], keys: list[str], reader: _Reader
) -> dict[str, str]:
    """Checkpoint key -> adapter key of the trained copies of ``modules_to_save``, checked.

    Raises:
        UnsupportedError: a trained copy of the input embeddings or the output head of a
            checkpoint that ties the two (``tie_word_embeddings``): replacing the one
            stored tensor would change both, where PEFT trains only one.
        ConfigError: a copy the checkpoint has no tensor for, or of another shape/kind.
    """
    out: dict[str, str] = {}
    tied = _ties_embeddings(reader.ckpt.path)
    for key in keys:
        own = key.removeprefix(_SAVED_PREFIX)
        if tied and _EMBEDDING_OR_HEAD.search(own):
            raise UnsupportedError(
                f"the adapter trains its own copy of {own!r} (modules_to_save), but the "
                "checkpoint ties its input embeddings and output head (tie_word_embeddings "
                "in config.json): a streamed swap would change both. Merge in memory instead "
                "(edgerep merge SRC --task ... with the adapter), which keeps them apart"
            )
        if own not in reader.ckpt.weight_map:
            raise ConfigError(
                f"the adapter's trained copy {key!r} (modules_to_save) has no tensor {own!r} in "
                "the checkpoint to replace; it was trained for another base model"
            )
        dtype, shape = reader.header(own)
        if list(tensors[key].shape) != shape:
            raise ConfigError(
                f"the adapter's trained copy {key!r} has shape {list(tensors[key].shape)}, the "
                f"checkpoint's {own!r} {shape}: it was trained for another base model"
            )
        if tensors[key].is_floating_point() != _float_dtype(dtype):
            raise ConfigError(
                f"the adapter's trained copy {key!r} is {tensors[key].dtype}, the checkpoint "
                f"stores {own!r} as {dtype}: one is floating and the other is not"
            )
        out[own] = key
    return out


def _targets(
    config: Any, tensors: Mapping[str, torch.Tensor], reader: _Reader
) -> tuple[list[_Target], dict[str, str]]:
    """The layers the adapter changes and the ``modules_to_save`` tensors it replaces
    (checkpoint key -> adapter key), checked against the checkpoint's headers."""
    prefix = _prefix(config)
    vera = str(config.peft_type) in ("VERA", "PeftType.VERA")
    modules: dict[str, list[str]] = {}
    saved: list[str] = []
    other: list[str] = []
    for key in tensors:
        name = key.removeprefix(_SAVED_PREFIX)
        marker = f".{prefix}"
        if marker in name:
            modules.setdefault(name[: name.index(marker)], []).append(key)
        elif ".base_layer." in name:
            # PEFT saves a targeted embedding's own weights too (save_embedding_layers);
            # loading the adapter puts them in the base layer, and so does this merge
            modules.setdefault(name[: name.index(".base_layer.")], []).append(key)
        elif vera and key in _VERA_SHARED:
            continue  # read by each VeRA layer (`_wrapped_layer`)
        elif key.startswith(_SAVED_PREFIX) and _is_saved_module(config, name):
            saved.append(key)
        else:
            other.append(key)
    if other:
        raise UnsupportedError(
            f"the adapter holds tensors that are not {prefix}* layer factors or modules_to_save, "
            f"e.g. {other[0]!r} ({len(other)} in all: trainable tokens or other shared weights); "
            "merge it in memory instead (edgerep merge on a model source)"
        )
    if vera and modules and not all(k in tensors for k in _VERA_SHARED):
        raise UnsupportedError(
            "the VeRA adapter was saved without its projections (save_projection=False): they "
            "would have to be regenerated from projection_prng_key at the shapes of the whole "
            "model; merge it in memory instead (edgerep merge on a model source)"
        )
    if not modules and not saved:
        raise ConfigError("the adapter holds no tensors; nothing to merge")
    replaced = _saved_modules(config, tensors, saved, reader)
    keys = reader.ckpt.weight_map
    out: list[_Target] = []
    absent: list[str] = []
    for path, akeys in modules.items():
        weight = f"{path}.weight"
        if weight not in keys:
            absent.append(path)
            continue
        dtype, shape = reader.header(weight)
        if not dtype.startswith(("F", "BF")):
            raise ConfigError(
                f"{weight!r} is stored as {dtype}, not a floating type: an adapter cannot be merged "
                "into a quantized or integer tensor; merge into the floating-point checkpoint"
            )
        for k in akeys:
            if ".base_layer." in k:
                own = f"{path}.{k.rsplit('.', 1)[1]}"
                if own not in keys or list(tensors[k].shape) != reader.header(own)[1]:
                    raise ConfigError(
                        f"the adapter carries base weights {k!r} of shape "
                        f"{list(tensors[k].shape)} that do not fit the checkpoint's {own!r}: it "
                        "was trained for another base model (or with a resized vocabulary)"
                    )
        bias = f"{path}.bias" if f"{path}.bias" in keys else None
        if any(".lora_embedding_" in k for k in akeys):
            layer = "embedding"
        elif len(shape) == 2:
            layer = "conv1d-linear" if getattr(config, "fan_in_fan_out", False) else "linear"
        elif len(shape) in (3, 4):
            layer = "conv"
        else:
            raise UnsupportedError(f"{weight!r} has shape {shape}: not a Linear, conv or Embedding")
        out.append(_Target(path, weight, bias, sorted(akeys), layer))
    if absent:
        hint = did_you_mean(absent[0], [k.removesuffix(".weight") for k in keys])
        raise ConfigError(
            f"the adapter targets {len(absent)} layer(s) the checkpoint does not have, e.g. "
            f"{absent[0]!r};{hint} it was trained for another base model (or another naming of "
            "the same one)"
        )
    return out, replaced


def _base_layer(t: _Target, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A float64 plain layer holding the checkpoint's tensors (for PEFT to wrap)."""
    from torch.nn.utils import skip_init

    w = weight.to(_F64)
    b = None if bias is None else bias.to(_F64)
    layer: Any
    if t.layer == "embedding":
        layer = skip_init(nn.Embedding, w.shape[0], w.shape[1], dtype=_F64)
    elif t.layer == "conv1d-linear":
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(w.shape[1], w.shape[0]).to(_F64)  # weight stored (in, out)
        if b is None:
            b = torch.zeros(w.shape[1], dtype=_F64)
    elif t.layer == "conv":
        conv = {3: nn.Conv1d, 4: nn.Conv2d}[w.ndim]
        layer = skip_init(
            conv, w.shape[1], w.shape[0], tuple(w.shape[2:]), bias=b is not None, dtype=_F64
        )
    else:
        layer = skip_init(nn.Linear, w.shape[1], w.shape[0], bias=b is not None, dtype=_F64)
    layer.weight = nn.Parameter(w, requires_grad=False)
    if b is not None:
        layer.bias = nn.Parameter(b, requires_grad=False)
    return layer


def _nest(path: str, leaf: nn.Module) -> nn.Module:
    """A container model holding `leaf` at `path`, so PEFT's target patterns match it."""
    root = nn.Module()
    node = root
    parts = path.split(".")
    for part in parts[:-1]:
        child = nn.Module()
        node.add_module(part, child)
        node = child
    node.add_module(parts[-1], leaf)
    return root


def _wrapped_layer(
    t: _Target, config: Any, tensors: Mapping[str, torch.Tensor], reader: _Reader
) -> nn.Module:
    """The layer `t` alone, in float64, wrapped by PEFT with the adapter loaded."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    weight = reader.get(t.weight)
    bias = None if t.bias is None else reader.get(t.bias)
    model = _nest(t.path, _base_layer(t, weight, bias))
    shared = {k: v for k, v in tensors.items() if k in _VERA_SHARED}
    peft_model: Any = None
    if shared:
        # this one-layer model gets its own projections, filled below with the corner of
        # the saved ones that the layer's forward slices (vera_A[:, :in], vera_B[:out])
        config = copy.copy(config)
        config.save_projection = False
        tensors = {k: v for k, v in tensors.items() if k not in shared}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if shared:  # PEFT keeps VeRA's projections on the tuner: a PeftModel is needed
            from peft import get_peft_model

            peft_model = get_peft_model(model, config, adapter_name="default")
            model = peft_model
        else:
            model = inject_adapter_in_model(config, model, adapter_name="default")
        stored = _torch_dtype(reader.header(t.weight)[0])
        # base weights carried by the adapter go into the base layer as PEFT would load
        # them into this checkpoint's model: in its dtype
        state = {
            k: (v.to(stored) if ".base_layer." in k else v).to(_F64) if v.is_floating_point() else v
            for k, v in tensors.items()
        }
        try:
            result = set_peft_model_state_dict(model, state, adapter_name="default")
        except RuntimeError as e:
            raise ConfigError(
                f"the adapter's tensors for {t.path!r} do not fit the checkpoint's "
                f"{t.weight!r} of shape {list(weight.shape)} ({e}); it was trained for another "
                "base model"
            ) from e
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if k]
    if unexpected:
        raise ConfigError(
            f"the adapter's tensors {unexpected[:3]} for {t.path!r} were not used by PEFT's "
            f"{config.peft_type} layer; the adapter does not match the checkpoint"
        )
    inner: Any = peft_model.base_model.model if shared else model
    layer: Any = inner.get_submodule(t.path).eval()
    if shared:
        a, b = shared[_VERA_SHARED[0]], shared[_VERA_SHARED[1]]
        n_in, n_out = layer.in_features, layer.out_features
        if a.shape[1] < n_in or b.shape[0] < n_out:
            raise ConfigError(
                f"the VeRA projections {list(a.shape)}/{list(b.shape)} are smaller than "
                f"{t.path!r} ({n_out}x{n_in}); the adapter does not match the checkpoint"
            )
        layer.vera_A["default"] = a[:, :n_in].to(_F64).contiguous()
        layer.vera_B["default"] = b[:n_out, :].to(_F64).contiguous()
    return layer


def merge_adapter_checkpoint(
    source: str | os.PathLike[str],
    adapter: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    rtol: float = verify.DEFAULT_RTOL,
    fast: bool = True,
    overwrite: bool = False,
) -> CheckpointMergeReport:
    """Merge a PEFT adapter into a safetensors checkpoint directory, shard by shard.

    Args:
        source: the base model's directory (``config.json`` and safetensors).
        adapter: the PEFT adapter directory (``adapter_config.json`` and
            ``adapter_model.safetensors``).
        out: the directory to write (same shard files, index and other files).
        rtol: the verifier's relative tolerance (float64).
        fast: try the fast path first (PEFT's own merge in float64); False probes.
        overwrite: replace `out` if it exists.

    Returns:
        The report (also written to ``OUT/edgerep_merge.json``).

    Raises:
        SourceError: a missing shard or adapter file, an index pointing at a
            missing file, an unreadable config.
        ConfigError: adapter targets the checkpoint does not have or of another
            shape, non-floating targets, `out` exists.
        UnsupportedError: an adapter type or tensor a checkpoint merge cannot take.
        VerificationError: a layer the verifier rejects (nothing is written).
    """
    from edgerep.errors import VerificationError
    from edgerep.merge import _engine
    from edgerep.merge._layers import KINDS

    start = time.perf_counter()
    src = Path(source).expanduser()
    target = _check_out(out, [src, Path(adapter).expanduser()], overwrite)
    ckpt = Checkpoint.open(src, what="model checkpoint")
    config, tensors, adapter_root = _adapter(adapter)
    report = CheckpointMergeReport("adapter", str(src), str(target), inputs=[str(adapter_root)])
    with ExitStack() as stack:
        reader = _Reader(ckpt, stack)
        targets, replaced = _targets(config, tensors, reader)
        by_key = {t.weight: t for t in targets} | {t.bias: t for t in targets if t.bias}
        pending: dict[str, torch.Tensor] = {}
        kind_name = {
            "linear": "torch.nn.modules.linear.Linear",
            "conv1d-linear": "transformers.pytorch_utils.Conv1D",
            "embedding": "torch.nn.modules.sparse.Embedding",
        }

        def merge_layer(t: _Target) -> None:
            mine = {k: tensors[k] for k in (*t.adapter_keys, *_VERA_SHARED) if k in tensors}
            first: list[nn.Module] = [_wrapped_layer(t, config, mine, reader)]
            stored = reader.header(t.weight)[0]
            base: Any = first[0].get_base_layer()  # type: ignore[operator]
            kind = KINDS[
                kind_name.get(t.layer, f"torch.nn.modules.conv.Conv{base.weight.ndim - 2}d")
            ]
            base_path = _base_path(first[0], base)
            del base

            def fresh() -> nn.Module:  # the first copy once, then new ones (fast rules write)
                return first.pop() if first else _wrapped_layer(t, config, mine, reader)

            plan = _engine._Plan("active", rtol=rtol, fast=fast)
            result = _engine._read(kind, fresh, base_path, plan)
            if isinstance(result, str):
                raise VerificationError(f"layer {t.path!r} of the checkpoint: {result}")
            weight, bias, checks, routes = result
            dtype = _torch_dtype(stored)
            w = weight.T if t.layer == "conv1d-linear" else weight
            pending[t.weight] = round_to(w, dtype).contiguous()
            del result, weight, w
            if t.bias is not None:
                bias_dtype = _torch_dtype(reader.header(t.bias)[0])
                pending[t.bias] = round_to(bias, bias_dtype).contiguous()
            elif bias.any():
                raise VerificationError(
                    f"layer {t.path!r}: the merged layer has a bias but the checkpoint stores none"
                )
            report.merged.append(
                TensorRow(
                    t.path,
                    routes[0].route,
                    stored,
                    max_rel_error=max(c.max_rel_error for c in checks),
                    fallback=routes[0].fallback,
                )
            )

        def produce(shard: str, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
            for key in keys:
                if key in replaced:  # a modules_to_save tensor: the adapter's trained copy
                    stored = reader.header(key)[0]
                    value = tensors[replaced[key]]
                    if value.is_floating_point():
                        value = round_to(value, _torch_dtype(stored))
                    report.merged.append(TensorRow(key, "swap", stored, max_rel_error=0.0))
                    yield key, value.contiguous()
                    continue
                t = by_key.get(key)
                if t is None:
                    yield key, reader.get(key)
                    continue
                if key not in pending:
                    merge_layer(t)
                yield key, pending.pop(key)

        _write(ckpt, reader, target, produce, report, overwrite=overwrite)
    report.seconds = time.perf_counter() - start
    return report


def _base_path(wrapper: nn.Module, base: nn.Module) -> str:
    return next(n for n, m in wrapper.named_modules() if m is base)


# --- several full checkpoints -------------------------------------------------------------


def _float_dtype(dtype: str) -> bool:
    return dtype.startswith(("F", "BF"))


def merge_checkpoints(
    base: str | os.PathLike[str],
    models: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    method: str = "linear",
    weights: Sequence[float] | None = None,
    density: float | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> CheckpointMergeReport:
    """Merge fine-tuned checkpoints of one base model, tensor by tensor, streaming.

    ``θ = θ_base + combine(θ_1 - θ_base, ..., θ_n - θ_base)`` per floating tensor,
    with `method` from `edgerep.merge._combine` (the code adapter combinations use):
    ``linear``/``task_arithmetic`` (``Σ w_i Δ_i``; with the default weights ``1/n``
    this is the uniform model soup, the average of the models), ``ties``,
    ``dare_linear``, ``dare_ties``, ... in float64, rounded once to the stored dtype.
    Non-floating tensors (integer buffers) must be equal in every model and are
    copied from the base.

    Args:
        base: the base checkpoint: a directory (its shards and index shape the output),
            one ``.safetensors`` file or a state-dict file (``.pt``/``.pth``/``.bin``),
            written out as ``model.safetensors``.
        models: the fine-tuned checkpoints (directories of any sharding, or files).
        out: the directory to write.
        method: the combination method.
        weights: one weight per model (default ``1/n`` each).
        density: TIES/DARE density.
        seed: seed of DARE's masks; tensors are visited in the base's shard order.
        overwrite: replace `out` if it exists.

    Raises:
        SourceError: a missing shard or an index naming a missing file; a file that is
            not a flat state dict (or needs more than ``weights_only`` unpickling).
        ConfigError: a bad method, weights or density; keys, shapes or dtypes that
            differ between the checkpoints; `out` exists.
    """
    from edgerep.merge import _combine

    start = time.perf_counter()
    if not models:
        raise ConfigError("give at least one fine-tuned checkpoint to merge into the base")
    _combine.check_method(method, density)
    if weights is None:
        weights = [1.0 / len(models)] * len(models)
    weights = [float(w) for w in weights]
    if len(weights) != len(models):
        raise ConfigError(
            f"{len(weights)} weight(s) {weights} for {len(models)} model(s); give one weight per "
            "model, e.g. --weights 0.5,0.3,0.2"
        )
    paths = [Path(base).expanduser(), *(Path(m).expanduser() for m in models)]
    target = _check_out(out, paths, overwrite)
    ckpts = [
        Checkpoint.open(p, what="base checkpoint" if i == 0 else f"model {i} checkpoint")
        for i, p in enumerate(paths)
    ]
    report = CheckpointMergeReport(
        "models",
        str(paths[0]),
        str(target),
        inputs=[str(p) for p in paths[1:]],
        method=method,
        weights=list(weights),
        density=density,
        seed=seed,
    )
    generator = torch.Generator().manual_seed(seed)
    with ExitStack() as stack:
        readers = [_Reader(c, stack) for c in ckpts]
        _check_models(readers)

        def produce(
            shard: str, keys: list[str]
        ) -> Iterator[tuple[str, torch.Tensor | Iterator[torch.Tensor]]]:
            for key in keys:
                dtype, shape = readers[0].header(key)
                if not _float_dtype(dtype):
                    yield key, readers[0].get(key)
                    continue
                yield (
                    key,
                    _merge_tensor(key, shape, readers, method, weights, density, generator, report),
                )
                for r in readers:  # unmap as we go: the pages read leave this process
                    r.close_all()

        _write(ckpts[0], readers[0], target, produce, report, overwrite=overwrite)
    report.seconds = time.perf_counter() - start
    return report


CHUNK_ELEMENTS = 1 << 18
"""Entries per row chunk of a large tensor in a checkpoint merge (2 MiB per float64 copy)."""


def _row_chunks(shape: Sequence[int]) -> list[tuple[int, int]]:
    """Row ranges ``[start, stop)`` of a tensor: whole rows of about `CHUNK_ELEMENTS`
    entries; a 0-d or 1-d tensor or one of at most two chunks is one range."""
    numel = 1
    for n in shape:
        numel *= n
    if len(shape) < 2 or numel <= 2 * CHUNK_ELEMENTS:
        return [(0, shape[0] if shape else 1)]
    step = max(1, CHUNK_ELEMENTS // (numel // shape[0]))
    return [(i, min(i + step, shape[0])) for i in range(0, shape[0], step)]


def _unmap(readers: Sequence[_Reader], chunks: int) -> None:
    """Between the chunks of a large tensor, unmap every input shard: the pages of the
    rows read so far leave this process (they reopen, memory-mapped, on the next read)."""
    if chunks > 1:
        for r in readers:
            r.close_all()


def _skip(generator: torch.Generator, draws: int) -> None:
    """Advance `generator` past `draws` float64 uniform draws (CPU draws are serial, so
    drawing in pieces consumes exactly what one draw of them all would)."""
    while draws > 0:
        n = min(draws, CHUNK_ELEMENTS)
        torch.rand(n, generator=generator, dtype=_F64)
        draws -= n


def _merge_tensor(
    key: str,
    shape: list[int],
    readers: Sequence[_Reader],
    method: str,
    weights: Sequence[float],
    density: float | None,
    generator: torch.Generator,
    report: CheckpointMergeReport,
) -> Iterator[torch.Tensor]:
    """The merged rows of one floating tensor, chunk by chunk; its report row at the end.

    ``θ_base + combine(θ_i - θ_base)`` in float64, rounded once to the stored dtype,
    computed by `_combine`'s stream of `method` on row chunks: the magnitude trims
    first, one delta at a time (`_combine.top_k_chunked`: two passes over its rows), then
    each chunk of rows of every model. Each delta's random draws come from a copy of
    `generator` moved to where that delta's draws start when the whole tensor is drawn
    at once (delta after delta), so the chunks give the bits the whole tensor gives;
    `generator` ends where the whole-tensor draws end. Memory: about the chunk in
    float64 times a few per model, plus, for a trimming method, one float32 copy of
    one delta's magnitudes (`_combine.top_k_chunked`).
    """
    from edgerep.merge import _combine

    stream = _combine.STREAMS.get(method)
    # a method registered as a whole-tensor function only gets the tensor in one piece
    chunks = _row_chunks(shape) if stream is not None else [(0, shape[0] if shape else 1)]
    n_models = len(readers) - 1
    numel = 1
    for n in shape:
        numel *= n
    dens = 1.0 if density is None else density

    def rows(r: _Reader, start: int, stop: int) -> torch.Tensor:
        return r.get(key) if len(chunks) == 1 else r.rows(key, start, stop)

    tops: list[list[_combine.TopK]] = [[] for _ in range(n_models)]
    gens = [generator] * n_models
    if stream is not None and stream.trims(numel, dens):
        for i, r in enumerate(readers[1:]):

            def magnitudes(r: _Reader = r) -> Iterator[torch.Tensor]:
                for start, stop in chunks:
                    d = rows(r, start, stop).to(_F64) - rows(readers[0], start, stop).to(_F64)
                    yield d.abs_()
                    del d
                    _unmap(readers, len(chunks))

            tops[i] = _combine.top_k_chunked(magnitudes, numel, stream.trims(numel, dens))
    if stream is not None and stream.random and len(chunks) > 1:
        cursor = torch.Generator().manual_seed(0)
        cursor.set_state(generator.get_state())
        gens = []
        for i in range(n_models):
            g = torch.Generator().manual_seed(0)
            g.set_state(cursor.get_state())
            gens.append(g)
            if i < n_models - 1:
                _skip(cursor, numel)
    conflicts = kept = 0
    stored = None
    for start, stop in chunks:
        theta0 = rows(readers[0], start, stop)
        stored = theta0.dtype
        base64 = theta0.to(_F64)
        del theta0
        deltas = [rows(r, start, stop).to(_F64) - base64 for r in readers[1:]]
        if stream is None:
            combined = _combine.combine(
                method, deltas, weights, density=density, generator=generator
            )
        else:
            combined = _combine.combine_rows(stream, deltas, weights, dens, tops, gens)
        c, k = _counts(deltas, combined)
        conflicts, kept = conflicts + c, kept + k
        del deltas
        merged = round_to(base64 + combined, stored).contiguous()
        del base64, combined
        yield merged
        del merged
        _unmap(readers, len(chunks))
    if stream is not None and stream.random and len(chunks) > 1:
        generator.set_state(gens[-1].get_state())
    report.merged.append(
        TensorRow(
            key,
            method,
            str(stored).removeprefix("torch."),
            sign_conflicts=conflicts / numel if numel else 0.0,
            density_kept=kept / numel if numel else 0.0,
        )
    )


def _check_models(readers: Sequence[_Reader]) -> None:
    """Same keys, shapes and dtypes in every checkpoint (from the headers); integer
    tensors equal. Every problem is listed at once."""
    base = readers[0]
    keys = set(base.ckpt.weight_map)
    problems: list[str] = []
    for i, r in enumerate(readers[1:], start=1):
        other = set(r.ckpt.weight_map)
        if other != keys:
            missing, extra = sorted(keys - other), sorted(other - keys)
            problems.append(
                f"model {i} ({r.ckpt.path}) "
                + (
                    f"lacks {len(missing)} tensor(s) of the base, e.g. {missing[0]!r}"
                    if missing
                    else ""
                )
                + ("; " if missing and extra else "")
                + (f"has {len(extra)} the base lacks, e.g. {extra[0]!r}" if extra else "")
            )
            continue
        for key in base.ckpt.weight_map:
            d0, s0 = base.header(key)
            d, s = r.header(key)
            if s != s0:
                problems.append(f"model {i}: {key!r} has shape {s}, the base {s0}")
            elif d != d0:
                problems.append(
                    f"model {i}: {key!r} is stored as {d}, the base as {d0} (cast the checkpoints "
                    "to one dtype first)"
                )
            elif not _float_dtype(d0) and not torch.equal(base.get(key), r.get(key)):
                problems.append(f"model {i}: integer tensor {key!r} differs from the base's")
    if problems:
        shown = "; ".join(problems[:5]) + (
            f"; ... ({len(problems)} in all)" if len(problems) > 5 else ""
        )
        raise ConfigError(f"the checkpoints do not fit one another: {shown}")


def _counts(deltas: Sequence[torch.Tensor], combined: torch.Tensor) -> tuple[int, int]:
    """(entries where nonzero deltas disagree in sign, entries the combination keeps nonzero)."""
    if combined.numel() == 0:
        return 0, 0
    signs = torch.stack([d.sign() for d in deltas])
    conflict = (signs.max(dim=0).values > 0) & (signs.min(dim=0).values < 0)
    return int(conflict.sum()), int((combined != 0).sum())
