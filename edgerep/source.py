"""Load models from the sources the CLI accepts.

Two forms:

- ``path/to/file.py:factory``: the file is imported by path and ``factory()`` is
  called with no arguments; it must return an ``nn.Module``. Weights, if given,
  are a state dict loaded with ``torch.load(..., weights_only=True)`` and
  ``load_state_dict(strict=True)``: edgerep never unpickles arbitrary objects.
  The file may define ``EDGEREP_INPUTS = ["x:1x3x224x224", ...]`` (input specs in
  the `edgerep.spec` text form) so that ``--input`` can be left out.
- ``model.pt2``: a program saved by ``torch.export.save``; its input shapes are
  read from the program.

Nothing read from a source is evaluated as code beyond importing the file the user
named.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from edgerep.bundle import sha256_file
from edgerep.errors import ConfigError, SourceError, did_you_mean

if TYPE_CHECKING:
    import torch

__all__ = ["INPUTS_ATTRIBUTE", "load_model", "parse_source"]

logger = logging.getLogger(__name__)

#: module attribute a factory file may define to name its inputs
INPUTS_ATTRIBUTE = "EDGEREP_INPUTS"

_FORMS = "path/to/file.py:factory (with optional --weights ckpt.pt) or model.pt2"
_MAX_LISTED = 10
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")


def parse_source(source: str) -> tuple[Path, str | None]:
    """Split a source into (path, factory name or None).

    ``file.py:factory`` gives the factory; a bare path (``model.pt2``) gives None.
    A colon not followed by an identifier is taken as part of the path (Windows
    drive letters).
    """
    head, sep, tail = source.rpartition(":")
    if sep and head and tail.isidentifier():
        return Path(head), tail
    return Path(source), None


def load_model(
    source: str, *, weights: str | None = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a model from a CLI source.

    Args:
        source: ``file.py:factory`` or ``model.pt2``.
        weights: a state-dict file for a ``file.py:factory`` source.

    Returns:
        The model (in eval mode for factory sources; an exported program's module
        keeps the mode it was exported in) and a JSON-serializable description:
        ``kind``, ``path``, ``class``, ``parameters``, ``factory``/``weights``/
        ``weights_sha256`` where they apply, and ``inputs`` (input spec texts) when
        the source names its inputs.

    Raises:
        SourceError: the file is missing, fails to import, has no such factory, the
            factory does not build an nn.Module, or the weights do not fit.
        ConfigError: the source string has none of the accepted forms.
    """
    if not isinstance(source, str) or not source:
        raise ConfigError(f"model source {source!r} is empty; give {_FORMS}")
    path, factory = parse_source(source)
    if factory is None and path.suffix == ".pt2":
        if weights is not None:
            raise ConfigError(
                f"--weights {weights!r} was given with {source!r}, but a .pt2 program carries "
                "its own weights; drop --weights"
            )
        return _load_exported(path)
    if path.suffix != ".py":
        hint = ""
        if path.suffix in _CHECKPOINT_SUFFIXES:
            hint = (
                f"; a checkpoint alone does not define the model: give the code that builds "
                f"it and pass the checkpoint as weights, e.g. model.py:build --weights {path}"
            )
        raise ConfigError(f"model source {source!r} has none of the accepted forms {_FORMS}{hint}")
    path = path.expanduser().resolve()
    if not path.is_file():
        raise SourceError(f"model file {str(path)!r} does not exist; check the path in {source!r}")
    module = _import_file(path)
    if factory is None:
        raise SourceError(
            f"{source!r} names no factory; append ':NAME' of a function or class in the file "
            f"that builds the model; callables in the file: {_list_or_none(_callables(module))}"
        )
    model = _call_factory(module, factory, path)
    description: dict[str, Any] = {
        "kind": "python-factory",
        "path": str(path),
        "factory": factory,
    }
    if weights is not None:
        description.update(_load_weights(model, Path(weights), source))
    model.eval()
    description["class"] = type(model).__name__
    description["parameters"] = sum(p.numel() for p in model.parameters())
    inputs = _declared_inputs(module, path)
    if inputs:
        description["inputs"] = inputs
    return model, description


# --- python factories -------------------------------------------------------------------


@contextlib.contextmanager
def _sys_path(directory: Path) -> Iterator[None]:
    """Let the file import its neighbours while it is imported and its factory runs."""
    entry = str(directory)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)


def _import_file(path: Path) -> ModuleType:
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    name = f"_edgerep_source_{path.stem.replace('-', '_')}_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SourceError(f"cannot import {str(path)!r} as a Python module; is it a .py file?")
    module = importlib.util.module_from_spec(spec)
    # registered while it runs so that dataclasses, pickling and typing can find it
    sys.modules[name] = module
    try:
        with _sys_path(path.parent):
            spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:
        sys.modules.pop(name, None)
        raise SourceError(
            f"importing {str(path)!r} failed: {type(e).__name__}: {e}; fix the error in the "
            "file (run `python FILE` to see the full traceback)"
        ) from e
    return module


def _callables(module: ModuleType) -> list[str]:
    """Public callables defined in the module itself (not imported into it)."""
    return sorted(
        n
        for n, v in vars(module).items()
        if callable(v)
        and not n.startswith("_")
        and getattr(v, "__module__", None) == module.__name__
    )


def _list_or_none(names: list[str]) -> str:
    return ", ".join(names) if names else "(none)"


def _call_factory(module: ModuleType, factory: str, path: Path) -> torch.nn.Module:
    import torch

    names = _callables(module)
    obj = vars(module).get(factory)
    if obj is None:
        raise SourceError(
            f"{str(path)!r} has no {factory!r};{did_you_mean(factory, names)} callables in the "
            f"file: {_list_or_none(names)}"
        )
    if not callable(obj):
        raise SourceError(
            f"{factory!r} in {str(path)!r} is a {type(obj).__name__}, not a callable; name a "
            f"function or class that builds the model: {_list_or_none(names)}"
        )
    try:
        with _sys_path(path.parent):
            model = obj()
    except Exception as e:
        raise SourceError(
            f"calling {factory}() from {str(path)!r} failed: {type(e).__name__}: {e}; the factory "
            "must build the model with no arguments (wrap it in a function that supplies them)"
        ) from e
    if not isinstance(model, torch.nn.Module):
        raise SourceError(
            f"{factory}() in {str(path)!r} returned a {type(model).__name__}, not a "
            "torch.nn.Module; the factory must return the model itself"
        )
    return model


def _declared_inputs(module: ModuleType, path: Path) -> list[str]:
    from edgerep.spec import parse_input_spec

    declared = vars(module).get(INPUTS_ATTRIBUTE)
    if declared is None:
        return []
    items = [declared] if isinstance(declared, str) else declared
    if not isinstance(items, list | tuple) or not all(isinstance(s, str) for s in items):
        raise SourceError(
            f"{INPUTS_ATTRIBUTE} in {str(path)!r} must be a list of input spec strings such as "
            f"['x:1x3x224x224'], got {declared!r}"
        )
    out = []
    for text in items:
        try:
            out.append(parse_input_spec(text).to_text())
        except ConfigError as e:
            raise SourceError(f"{INPUTS_ATTRIBUTE} in {str(path)!r}: {e}") from e
    return out


# --- weights ------------------------------------------------------------------------------


def _is_state_dict(obj: Any) -> bool:
    import torch

    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _load_weights(model: torch.nn.Module, path: Path, source: str) -> dict[str, Any]:
    import torch

    if not path.is_file():
        raise SourceError(f"weights file {str(path)!r} does not exist; check --weights")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SourceError(
            f"cannot load weights {str(path)!r} with weights_only=True ({type(e).__name__}: "
            f"{first}); edgerep loads only plain state dicts, never arbitrary pickles: re-save "
            "them with torch.save(model.state_dict(), PATH)"
        ) from e
    info: dict[str, Any] = {"weights": str(path.resolve()), "weights_sha256": sha256_file(path)}
    state = obj
    if not _is_state_dict(obj) and isinstance(obj, Mapping):
        # common checkpoint layouts keep the state dict under one of these keys
        for key in ("state_dict", "model_state_dict", "model"):
            if _is_state_dict(obj.get(key)):
                state = obj[key]
                info["weights_key"] = key
                logger.info("using the state dict under key %r of %s", key, path)
                break
    if not _is_state_dict(state):
        raise SourceError(_not_a_state_dict(obj, path))
    _check_keys_and_shapes(model, state, path, source)
    try:
        model.load_state_dict(state, strict=True)
    except Exception as e:
        raise SourceError(f"loading weights {str(path)!r} into the model failed: {e}") from e
    return info


def _not_a_state_dict(obj: Any, path: Path) -> str:
    import torch

    what = type(obj).__name__
    if isinstance(obj, Mapping):
        bad = [
            f"{k!r} holds {type(v).__name__}"
            for k, v in obj.items()
            if not isinstance(v, torch.Tensor)
        ][:5]
        what = f"a dict whose entries are not all tensors ({'; '.join(bad) or 'it is empty'})"
    return (
        f"weights file {str(path)!r} is not a state dict: it holds {what}; save the weights with "
        "torch.save(model.state_dict(), PATH) (a checkpoint dict with the state dict under "
        "'state_dict', 'model_state_dict' or 'model' also works)"
    )


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return shown + more


def _common_prefix_hint(file_keys: list[str], model_keys: list[str]) -> str:
    for prefix in ("module.", "model.", "_orig_mod."):
        if all(k.startswith(prefix) for k in file_keys) and not any(
            k.startswith(prefix) for k in model_keys
        ):
            return (
                f"; every key in the file starts with {prefix!r} (saved from a wrapper such as "
                "DataParallel or torch.compile?): strip the prefix and re-save"
            )
        if all(k.startswith(prefix) for k in model_keys) and not any(
            k.startswith(prefix) for k in file_keys
        ):
            return f"; every key of the model starts with {prefix!r} but none in the file does"
    return ""


def _check_keys_and_shapes(
    model: torch.nn.Module, state: Mapping[str, Any], path: Path, source: str
) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = [f"weights {str(path)!r} do not match the model from {source!r}"]
        if missing:
            parts.append(
                f"{len(missing)} missing key(s) (in the model, not in the file): {_listing(missing)}"
            )
        if unexpected:
            parts.append(
                f"{len(unexpected)} unexpected key(s) (in the file, not in the model): "
                f"{_listing(unexpected)}"
            )
        hint = _common_prefix_hint(sorted(state), sorted(expected))
        raise SourceError(
            "; ".join(parts) + (hint or "; were the weights saved from this model class?")
        )
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise SourceError(
            f"weights {str(path)!r} do not fit the model from {source!r}: {len(wrong)} tensor(s) "
            f"have other shapes: {_listing(wrong)}; the weights were saved from a differently "
            "configured model: check the factory's settings (widths, classes, kernel sizes)"
        )


# --- exported programs -------------------------------------------------------------------


def _load_exported(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    import torch

    path = path.expanduser().resolve()
    if not path.is_file():
        raise SourceError(f"exported program {str(path)!r} does not exist; check the path")
    try:
        program = torch.export.load(str(path))
    except Exception as e:
        raise SourceError(
            f"cannot load {str(path)!r} as a torch.export program ({type(e).__name__}: {e}); "
            "a .pt2 source must be written by torch.export.save"
        ) from e
    module = program.module()
    description: dict[str, Any] = {
        "kind": "exported-program",
        "path": str(path),
        "sha256": sha256_file(path),
        "class": type(module).__name__,
        "parameters": sum(p.numel() for p in module.parameters()),
    }
    inputs = _exported_inputs(program)
    if inputs:
        description["inputs"] = inputs
    return module, description


def _exported_inputs(program: Any) -> list[str]:
    """Input specs read off the program's placeholders (symbolic dims keep their symbols)."""
    import torch

    from edgerep.spec import DTYPES, DimRange, InputSpec

    dtype_names = {getattr(torch, attr): name for name, (attr, _) in DTYPES.items()}
    user_inputs = list(program.graph_signature.user_inputs)
    ranges = {str(k): v for k, v in program.range_constraints.items()}
    specs = []
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name not in user_inputs:
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dtype not in dtype_names:
            return []  # a non-tensor or exotic input: the user must say what to feed
        shape: list[int | str] = []
        dim_ranges: dict[str, DimRange] = {}
        for d in val.shape:
            if isinstance(d, int):
                shape.append(d)
                continue
            sym = str(d)
            if not sym.isidentifier() or "x" in sym:
                return []  # an expression such as 2*s0: cannot be fed as a free dim
            shape.append(sym)
            vr = ranges.get(sym)
            # torch.export may allow 0; edgerep never feeds empty inputs (parity over 0
            # elements proves nothing), so the range starts at 1
            lo = max(int(vr.lower), 1) if vr is not None and _is_finite(vr.lower) else 1
            hi = int(vr.upper) if vr is not None and _is_finite(vr.upper) else None
            opt = lo
            if hi is not None and opt > hi:
                return []
            dim_ranges[sym] = DimRange(sym, lo, opt, hi)
        spec = InputSpec(
            node.name,
            tuple(shape),
            dtype_names[val.dtype],
            tuple(r for r in dim_ranges.values() if not r.is_default),
        )
        specs.append(spec.to_text())
    return specs


def _is_finite(value: Any) -> bool:
    try:
        return abs(int(value)) < 2**62
    except Exception:  # torch's int_oo and sympy infinities refuse int() in several ways
        return False
