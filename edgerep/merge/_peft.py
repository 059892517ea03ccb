"""What edgerep needs to know about PEFT: where its layers are and which adapter is on.

Nothing here computes a merged weight. PEFT is only asked to find a tuner layer's
base layer, to list and switch its adapters (on float64 copies), and to unwrap a
`PeftModel` to the model it wraps. peft is imported only when the model holds its
modules, i.e. when it is already imported.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from torch import nn

from edgerep.fold.report import KeptRegion

__all__ = [
    "active_adapters",
    "available_adapters",
    "base_layer",
    "is_modules_to_save",
    "is_other_aux_wrapper",
    "is_tuner_layer",
    "merged_adapters",
    "select",
    "type_name",
    "unwrap",
]


def _loaded() -> bool:
    return "peft" in sys.modules


def is_tuner_layer(module: nn.Module) -> bool:
    """A PEFT tuner layer (LoRA, DoRA, AdaLoRA, LoHa, LoKr, IA3, OFT, BOFT, VeRA, ...)."""
    if not _loaded():
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


def _aux_types() -> tuple[type, type]:
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    return AuxiliaryTrainingWrapper, ModulesToSaveWrapper


def is_modules_to_save(module: nn.Module) -> bool:
    """PEFT's wrapper of a fully trained copy of a module (``modules_to_save``)."""
    return _loaded() and isinstance(module, _aux_types()[1])


def is_other_aux_wrapper(module: nn.Module) -> bool:
    """Another PEFT auxiliary wrapper (trainable tokens, ...)."""
    if not _loaded():
        return False
    aux, mts = _aux_types()
    return isinstance(module, aux) and not isinstance(module, mts)


def base_layer(module: nn.Module) -> nn.Module:
    """The innermost base layer of a tuner layer."""
    return module.get_base_layer()  # type: ignore[operator]


def type_name(module: nn.Module) -> str:
    """'lora.Linear' for ``peft.tuners.lora.layer.Linear``; the class name otherwise."""
    cls = type(module)
    parts = cls.__module__.split(".")
    if parts[:2] == ["peft", "tuners"] and len(parts) >= 3:
        return f"{parts[2]}.{cls.__name__}"
    return cls.__name__


def _tuner_layers(module: nn.Module) -> list[Any]:
    return [m for m in module.modules() if is_tuner_layer(m)]


def available_adapters(module: nn.Module) -> list[str]:
    """Adapter names held by the tuner layers in `module` (sorted)."""
    names: set[str] = set()
    for layer in _tuner_layers(module):
        names.update(layer._get_available_adapters())
    return sorted(names)


def active_adapters(module: nn.Module) -> list[str]:
    """Adapter names that the tuner layers in `module` apply in their forward."""
    names: list[str] = []
    for layer in _tuner_layers(module):
        if layer.disable_adapters:
            continue
        have = layer._get_available_adapters()
        names += [n for n in layer.active_adapters if n in have and n not in names]
    return names


def merged_adapters(module: nn.Module) -> list[str]:
    """Adapters already merged into base weights by PEFT inside `module`."""
    names: list[str] = []
    for layer in _tuner_layers(module):
        names += [n for n in layer.merged_adapters if n not in names]
    return names


def select(module: nn.Module, names: Sequence[str]) -> None:
    """Make the tuner layers in `module` apply exactly the adapters `names` (in place).

    A layer that holds none of them is switched off (it computes its base layer).
    Called on float64 copies only.
    """
    for layer in _tuner_layers(module):
        have = [n for n in names if n in layer._get_available_adapters()]
        if have:
            layer.enable_adapters(True)
            layer.set_adapter(have)
        else:
            layer.enable_adapters(False)


def modules_to_save_choice(
    wrapper: Any, names: Sequence[str] | None
) -> tuple[nn.Module, str | None]:
    """The module a ``modules_to_save`` wrapper computes with, and its adapter name.

    Args:
        wrapper: a ModulesToSaveWrapper.
        names: the adapters to apply; None for the wrapper's own active state.

    Returns:
        (module, adapter name, or None for the original module).
    """
    saved = wrapper.modules_to_save
    if names is None:
        active = list(wrapper.active_adapters)
        if wrapper.disable_adapters or any(a not in saved for a in active):
            return wrapper.original_module, None
        return saved[active[0]], active[0]
    have = [n for n in names if n in saved]
    if not have:
        return wrapper.original_module, None
    return saved[have[0]], have[0]


def unwrap(model: nn.Module) -> tuple[nn.Module, list[KeptRegion], list[str]]:
    """The model a PEFT wrapper holds, or `model` itself.

    Returns:
        (the model to merge in, structure kept with its reason, notes). For a
        prompt-learning `PeftModel` (prompt, prefix or p-tuning) the `PeftModel`
        itself is returned and listed as kept: its virtual tokens are inputs to
        the base model, not a layer to merge.
    """
    if not _loaded():
        return model, [], []
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(model, PeftModel):
        configs = dict(model.peft_config)
        prompt = {n: c for n, c in configs.items() if c.is_prompt_learning}
        if prompt:
            kinds = ", ".join(f"{n!r} ({_peft_type(c)})" for n, c in prompt.items())
            reason = (
                f"prompt-learning adapter(s) {kinds}: learned virtual tokens or past key/values "
                "are fed to the base model with its inputs; there is no adapter-wrapped layer to "
                "merge, so the PeftModel is kept as it is"
            )
            return model, [KeptRegion("", ("prompt_encoder",), reason)], []
        inner = model.base_model
        if isinstance(inner, BaseTuner):
            return inner.model, [], [f"unwrapped {type(model).__name__} and {type(inner).__name__}"]
        return inner, [], [f"unwrapped {type(model).__name__}"]
    if isinstance(model, BaseTuner):
        return model.model, [], [f"unwrapped {type(model).__name__}"]
    mixed = getattr(sys.modules.get("peft.mixed_model"), "PeftMixedModel", None)
    if mixed is not None and isinstance(model, mixed):
        return model.base_model.model, [], [f"unwrapped {type(model).__name__}"]  # type: ignore[union-attr]
    return model, [], []


def _peft_type(config: Any) -> str:
    kind = getattr(config, "peft_type", None)
    return str(getattr(kind, "value", kind))
