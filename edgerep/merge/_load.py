"""Attach adapters read from disk to a base model, for `edgerep merge` and `convert`.

Two forms of adapter:

- a PEFT adapter directory (``adapter_config.json`` plus ``adapter_model.safetensors``
  or ``adapter_model.bin``), loaded with ``peft.PeftModel.from_pretrained`` (or
  ``load_adapter`` for the second and later ones); this works on any
  ``nn.Module`` whose target modules exist;
- a ``.safetensors`` file of LoRA factors: ``<module>.lora_A.weight`` and
  ``<module>.lora_B.weight`` (``lora_embedding_A``/``lora_embedding_B`` for an
  embedding, a ``base_model.model.`` prefix allowed), with ``A`` of shape ``(r, in)``
  (``(r, in/groups, *kernel)`` for a conv, ``(r, num_embeddings)`` for an
  embedding) and ``B`` of shape ``(out, r)`` (``(out, r, 1, ...)``, ``(dim, r)``), so
  that ``ΔW = (alpha/r)·B·A``. The scale ``alpha`` comes from a ``<module>.alpha`` tensor,
  the file's ``lora_alpha`` metadata, or ``lora_alpha=`` (which wins).

Every problem the user must fix is a `SourceError` or `ConfigError` that names it:
target modules missing from the base, tensors whose shapes do not fit (both
shapes given), incomplete adapter directories. Nothing is written to disk.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgerep.errors import ConfigError, MissingDependencyError, SourceError, did_you_mean

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["AdapterSource", "load_adapters", "parse_adapter_spec"]

_CONFIG = "adapter_config.json"
_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = "base_model.model."
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_SHOWN = 8


@dataclass(frozen=True)
class AdapterSource:
    """One adapter on disk: its path, the name to load it under, its combine weight."""

    path: str
    name: str | None = None
    weight: float | None = None

    def to_text(self) -> str:
        text = self.path if self.name is None else f"{self.name}={self.path}"
        return text if self.weight is None else f"{text}:{self.weight:g}"


def parse_adapter_spec(text: str) -> AdapterSource:
    """Parse ``PATH``, ``NAME=PATH``, ``PATH:WEIGHT`` or ``NAME=PATH:WEIGHT``.

    Text after the last ``:`` is the weight and must be a number, unless the whole
    text names an existing path, the colon follows a drive letter (``C:dir``) or a
    directory follows it (``a:b/adapter``).

    Raises:
        ConfigError: an empty spec or name, a bad name, or a weight that is not a
            finite number.
    """
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"adapter spec {text!r} is empty; give PATH or NAME=PATH:WEIGHT")
    name: str | None = None
    rest = text.strip()
    head, sep, tail = rest.partition("=")
    if sep:
        if not _NAME.fullmatch(head):
            raise ConfigError(
                f"adapter name {head!r} in {text!r} may hold only letters, digits, '_', '-', '.'"
            )
        name, rest = head, tail
    weight: float | None = None
    path, sep, wtext = rest.rpartition(":")
    if sep and path:
        if Path(rest).expanduser().exists() and not Path(path).expanduser().exists():
            path = rest  # an existing path with a colon in its name
        else:
            try:
                weight = float(wtext)
            except ValueError:
                # a colon that is part of the path: a drive letter (C:dir) or a directory
                # on the way (a:b/adapter); anything else after a ':' was meant as a weight
                drive = len(path) == 1 and path.isalpha()
                if not (drive or "/" in wtext or "\\" in wtext):
                    raise ConfigError(
                        f"adapter spec {text!r}: the weight after the last ':' is {wtext!r}, "
                        "not a number; give NAME=PATH:WEIGHT with a number (e.g. "
                        f"{name or 'a'}={path}:0.5), or PATH alone for weight 1"
                    ) from None
                path = rest
            else:
                if not math.isfinite(weight):
                    raise ConfigError(
                        f"adapter weight {wtext!r} in {text!r} is not a finite number"
                    )
    else:
        path = rest
    if not path:
        raise ConfigError(f"adapter spec {text!r} names no path; give NAME=PATH:WEIGHT")
    return AdapterSource(path, name, weight)


def load_adapters(
    model: nn.Module,
    sources: Sequence[AdapterSource | str],
    *,
    lora_alpha: float | None = None,
) -> nn.Module:
    """Attach the adapters to `model` (in place) and return the `PeftModel`.

    Args:
        model: the base model; its modules are wrapped in place (pass a copy to
            keep it).
        sources: adapter paths (`AdapterSource` or spec strings); with more than
            one, each needs a distinct name.
        lora_alpha: the LoRA scale numerator for ``.safetensors`` factor files
            (overrides the file's own).

    Raises:
        SourceError: a path is missing, an adapter directory is incomplete, target
            modules are missing from the model, or tensor shapes do not fit.
        ConfigError: names are missing or repeated, the LoRA scale is unknown, or
            the adapters are of different PEFT types.
        MissingDependencyError: peft is not installed.
    """
    items = [parse_adapter_spec(s) if isinstance(s, str) else s for s in sources]
    if not items:
        raise ConfigError("no adapter given")
    if len(items) > 1:
        unnamed = [s.path for s in items if s.name is None]
        if unnamed:
            raise ConfigError(
                f"several adapters need a name each: give NAME=PATH:WEIGHT for {', '.join(unnamed)}"
            )
        names = [s.name for s in items]
        repeated = sorted({n for n in names if names.count(n) > 1})  # type: ignore[type-var]
        if repeated:
            raise ConfigError(f"adapter name(s) {repeated} given more than once")
    try:
        import peft  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError("peft", "peft", "loading adapters") from e

    peft_model: Any = None
    kinds: dict[str, str] = {}
    for src in items:
        name = src.name or "default"
        path = Path(src.path).expanduser()
        if path.is_dir():
            config = _read_dir(path)
            kinds[name] = str(config.get("peft_type", "?"))
            _check_targets(model, config, path)
            peft_model = _load_dir(model, peft_model, path, name)
        elif path.is_file() and path.suffix == ".safetensors":
            kinds[name] = "LORA"
            peft_model = _load_file(model, peft_model, path, name, lora_alpha)
        elif path.exists():
            raise SourceError(
                f"adapter {str(path)!r} is neither a PEFT adapter directory ({_CONFIG} + "
                f"{_WEIGHTS[0]}) nor a .safetensors file of LoRA factors"
            )
        else:
            raise SourceError(f"adapter {str(path)!r} does not exist; check --adapter")
        if len(set(kinds.values())) > 1:
            raise ConfigError(
                "adapters of different PEFT types cannot be loaded into one model: "
                + ", ".join(f"{n!r}: {k}" for n, k in kinds.items())
            )
    return peft_model  # type: ignore[no-any-return]


# --- PEFT adapter directories -------------------------------------------------------------


def _read_dir(path: Path) -> dict[str, Any]:
    config_path = path / _CONFIG
    weights = [path / w for w in _WEIGHTS if (path / w).is_file()]
    missing = []
    if not config_path.is_file():
        missing.append(_CONFIG)
    if not weights:
        missing.append(f"{_WEIGHTS[0]} (or {_WEIGHTS[1]})")
    if missing:
        present = sorted(p.name for p in path.iterdir())
        raise SourceError(
            f"adapter directory {str(path)!r} is incomplete: missing {' and '.join(missing)} "
            f"(it holds: {', '.join(present) or 'nothing'}); save the adapter with "
            "model.save_pretrained(DIR)"
        )
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise SourceError(f"cannot read {str(config_path)!r} as JSON: {e}") from e
    if not isinstance(config, dict):
        raise SourceError(f"{str(config_path)!r} does not hold a JSON object")
    return config


def _module_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


def _check_targets(model: nn.Module, config: dict[str, Any], path: Path) -> None:
    targets = config.get("target_modules")
    names = _module_names(model)
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, n) for n in names):
            raise SourceError(
                f"adapter {str(path)!r}: its target_modules pattern {targets!r} matches no module "
                f"of the base model; modules: {_listing(names)}"
            )
        return
    if not isinstance(targets, list):
        return  # prompt learning and other configs without target modules
    missing = [
        t
        for t in targets
        if isinstance(t, str) and not any(n == t or n.endswith("." + t) for n in names)
    ]
    if missing:
        leaves = sorted({n.rpartition(".")[2] for n in names})
        hint = did_you_mean(missing[0], leaves)
        raise SourceError(
            f"adapter {str(path)!r} targets module(s) missing from the base model: "
            f"{', '.join(repr(t) for t in missing)};{hint} the base model's modules: "
            f"{_listing(names)}; was the adapter trained on another model?"
        )


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (f", ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else "")


def _load_dir(model: nn.Module, peft_model: Any, path: Path, name: str) -> Any:
    from peft import PeftModel

    try:
        if peft_model is None:
            return PeftModel.from_pretrained(model, str(path), adapter_name=name)
        peft_model.load_adapter(str(path), adapter_name=name)
        return peft_model
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        if lines:
            raise SourceError(
                f"adapter {str(path)!r} does not fit the base model: "
                + "; ".join(_shape_line(ln) for ln in lines)
                + "; was the adapter trained on a model with other layer sizes?"
            ) from e
        raise SourceError(f"loading adapter {str(path)!r} failed: {e}") from e
    except (ValueError, TypeError, KeyError) as e:
        raise SourceError(f"loading adapter {str(path)!r} failed: {type(e).__name__}: {e}") from e


def _shape_line(line: str) -> str:
    m = re.search(
        r"size mismatch for (\S+): copying a param with shape torch.Size\((\[.*?\])\) from "
        r"checkpoint, the shape in current model is torch.Size\((\[.*?\])\)",
        line,
    )
    if not m:
        return line
    return (
        f"tensor {m.group(1)} has shape {m.group(2)} in the adapter but {m.group(3)} in the model"
    )


# --- safetensors files of LoRA factors ----------------------------------------------------


_A_SUFFIXES = (".lora_A.weight", ".lora_embedding_A", ".lora_A")
_B_SUFFIXES = (".lora_B.weight", ".lora_embedding_B", ".lora_B")


def _split(key: str) -> tuple[str, str] | None:
    key = key.removeprefix(_PREFIX)
    for role, suffixes in (("A", _A_SUFFIXES), ("B", _B_SUFFIXES)):
        for s in suffixes:
            if key.endswith(s):
                return key[: -len(s)], role
    if key.endswith(".alpha"):
        return key[: -len(".alpha")], "alpha"
    return None


def _read_file(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:
        raise SourceError(f"cannot read {str(path)!r} as safetensors: {e}") from e
    modules: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, t in tensors.items():
        split = _split(key)
        if split is None:
            unknown.append(key)
            continue
        modules.setdefault(split[0], {})[split[1]] = t
    if unknown:
        raise SourceError(
            f"{str(path)!r} holds tensors that are not LoRA factors: {_listing(unknown)}; "
            "expected <module>.lora_A.weight and <module>.lora_B.weight"
        )
    incomplete = [
        f"{m} (has {', '.join(sorted(d))})"
        for m, d in modules.items()
        if len(d.keys() & {"A", "B"}) < 2
    ]
    if incomplete:
        raise SourceError(
            f"{str(path)!r}: module(s) without both lora_A and lora_B: {_listing(incomplete)}"
        )
    if not modules:
        raise SourceError(f"{str(path)!r} holds no LoRA factors")
    return modules, metadata


def _linear_shapes(base: Any, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return (r, base.in_features), (base.out_features, r)


def _embedding_shapes(base: Any, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return (r, base.num_embeddings), (base.embedding_dim, r)


def _conv_shapes(base: Any, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    k = tuple(base.kernel_size)
    return (r, base.in_channels // base.groups, *k), (base.out_channels, r, *(1 for _ in k))


# base layer class name -> the shapes of A and B that fit it (LoRA's factor layout)
_FACTOR_SHAPES = {
    "Linear": _linear_shapes,
    "Embedding": _embedding_shapes,
    "Conv1d": _conv_shapes,
    "Conv2d": _conv_shapes,
    "Conv3d": _conv_shapes,
}


def _expected(base: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Shapes of A and B that fit `base`, or None for an unsupported base type."""
    for cls in type(base).__mro__:
        if cls.__module__.startswith("torch.nn.") and cls.__name__ in _FACTOR_SHAPES:
            return _FACTOR_SHAPES[cls.__name__](base, r)
    return None


def _alpha(
    module: str, factors: dict[str, torch.Tensor], metadata: dict[str, str], override: float | None
) -> float:
    if override is not None:
        return float(override)
    if "alpha" in factors:
        return float(factors["alpha"].reshape(-1)[0])
    text = metadata.get("lora_alpha")
    if text is not None:
        try:
            return float(json.loads(text))
        except (ValueError, TypeError) as e:
            raise SourceError(f"metadata lora_alpha={text!r} is not a number") from e
    raise ConfigError(
        f"the LoRA scale of {module!r} is unknown: the file has no {module}.alpha tensor and no "
        "lora_alpha metadata; pass lora_alpha (--lora-alpha A: ΔW = (A/r)·B·A)"
    )


def _load_file(
    model: nn.Module, peft_model: Any, path: Path, name: str, lora_alpha: float | None
) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model

    from edgerep.merge import _peft

    factors, metadata = _read_file(path)
    target_root = model if peft_model is None else peft_model.base_model.model
    modules = dict(target_root.named_modules())
    missing = [m for m in factors if m not in modules]
    if missing:
        hint = did_you_mean(missing[0], [n for n in modules if n])
        raise SourceError(
            f"{str(path)!r} has LoRA factors for module(s) missing from the base model: "
            f"{_listing(missing)};{hint} the base model's modules: {_listing(_module_names(target_root))}"
        )
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    problems = []
    for mod, f in factors.items():
        base = modules[mod]
        if _peft.is_tuner_layer(base):  # a module that already holds another adapter
            base = _peft.base_layer(base)
        r = int(f["A"].shape[0])
        want = _expected(base, r)
        if want is None:
            problems.append(f"{mod} is a {type(base).__name__}, not a Linear, Conv or Embedding")
            continue
        for role, shape in zip("AB", want):
            got = tuple(f[role].shape)
            if got != shape:
                problems.append(
                    f"tensor {mod}.lora_{role} has shape {list(got)} in the file but "
                    f"{list(shape)} fits {mod} ({_describe(base)})"
                )
        ranks[mod] = r
        alphas[mod] = _alpha(mod, f, metadata, lora_alpha)
    if problems:
        raise SourceError(f"{str(path)!r} does not fit the base model: " + "; ".join(problems))
    pattern = "|".join(re.escape(m) for m in factors)
    first = next(iter(factors))
    config = LoraConfig(
        r=ranks[first],
        lora_alpha=alphas[first],  # type: ignore[arg-type]  # PEFT accepts floats
        target_modules=f"^({pattern})$",
        rank_pattern={f"^{re.escape(m)}$": r for m, r in ranks.items()},
        alpha_pattern={f"^{re.escape(m)}$": a for m, a in alphas.items()},
        lora_dropout=0.0,
    )
    if peft_model is None:
        peft_model = get_peft_model(model, config, adapter_name=name)
    else:
        peft_model.add_adapter(name, config)
    root = peft_model.base_model.model
    with torch.no_grad():
        for mod, f in factors.items():
            layer = root.get_submodule(mod)
            if name in layer.lora_embedding_A:
                layer.lora_embedding_A[name].copy_(f["A"])
                layer.lora_embedding_B[name].copy_(f["B"])
            else:
                layer.lora_A[name].weight.copy_(f["A"])
                layer.lora_B[name].weight.copy_(f["B"])
            if abs(layer.scaling[name] - alphas[mod] / ranks[mod]) > 1e-12 * abs(
                layer.scaling[name]
            ):
                raise SourceError(
                    f"{mod}: PEFT set the LoRA scale to {layer.scaling[name]}, expected "
                    f"{alphas[mod]}/{ranks[mod]}"
                )
    peft_model.eval()
    return peft_model


def _describe(module: nn.Module) -> str:
    return " ".join(repr(module).split())
