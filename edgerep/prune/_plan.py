"""Prune plans: which channels of which group stay, as versioned JSON, and their application.

A plan names each pruned group by its root layer and lists the channel indices
kept. Applying it to the model it was made from slices the same weights with
Torch-Pruning's own group pruning, so the pruned weights are the original values
bit for bit; when the plan records a recovery and the same calibration data is
given, the recovery is re-solved deterministically. The pruned model is saved as a
plain state_dict (loadable with ``weights_only=True``) next to ``prune_plan.json``;
nothing is pickled.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgerep.errors import ConfigError, SourceError
from edgerep.prune import PLAN_FILE, WEIGHTS_FILE
from edgerep.prune._calib import to_float64
from edgerep.prune._groups import build_groups, require_torch_pruning

__all__ = [
    "PLAN_FILE",
    "WEIGHTS_FILE",
    "PrunePlan",
    "apply_plan_structure",
    "load_pruned",
    "model_sha256",
    "save_pruned",
]

#: the keys of a projection-shortcut depth entry besides output/input/map/channels
PROJECTION_KEYS = ("out_channels", "stride", "shortcut")

#: the newest plan format: 1 = channels only, 2 = adds depth and rank decisions.
#: A plan with neither is still written as version 1 (older readers read it).
PLAN_VERSION = 2
READ_VERSIONS = (1, 2)


def model_sha256(model: nn.Module) -> str:
    """A hash of the model's structure and every tensor of its state_dict, bytes and shapes."""
    h = hashlib.sha256()
    h.update(str(model).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class PrunePlan:
    """Which channels stay.

    Attributes:
        kept: group root name -> sorted kept channel indices (only pruned groups).
        sizes: group root name -> channels before pruning.
        model_sha256: `model_sha256` of the model the plan was made for.
        recovery: ``none``, ``mean`` or ``ls`` (see `edgerep.prune._recover`).
        ridge: the ridge factor of the least-squares recovery.
        calib_sha256: hash of the calibration inputs the recovery used, or None.
        target: the target the plan was made for, as text.
        version: the JSON format version (written: 1 without depth/rank, else 2).
        depth: residual blocks replaced by a fitted linear map, applied first
            (``{"output", "input", "map", "channels"}`` each, plus ``out_channels``,
            ``stride`` and ``shortcut`` for a projection shortcut; see
            `edgerep.prune._depth`).
        depth_ridge: the identity-regularisation factor of their fit.
        ranks: layer -> rank, factorized last (on the channel-pruned model).
    """

    kept: Mapping[str, tuple[int, ...]]
    sizes: Mapping[str, int]
    model_sha256: str
    recovery: str = "none"
    ridge: float = 1e-4
    calib_sha256: str | None = None
    target: str = ""
    version: int = PLAN_VERSION
    extra: Mapping[str, Any] = field(default_factory=dict)
    depth: tuple[Mapping[str, Any], ...] = ()
    depth_ridge: float = 1e-4
    ranks: Mapping[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "version": 2 if self.depth or self.ranks else 1,
            "model_sha256": self.model_sha256,
            "target": self.target,
            "recovery": self.recovery,
            "ridge": self.ridge,
            "calib_sha256": self.calib_sha256,
            "groups": [
                {"name": n, "size": int(self.sizes[n]), "kept": [int(i) for i in k]}
                for n, k in self.kept.items()
            ],
            "extra": dict(self.extra),
        }
        if self.depth or self.ranks:
            d["depth"] = [dict(e) for e in self.depth]
            d["depth_ridge"] = self.depth_ridge
            d["rank"] = [{"layer": n, "rank": int(r)} for n, r in self.ranks.items()]
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrunePlan:
        """The inverse of `to_dict`.

        Raises:
            ConfigError: another version, or a malformed group.
        """
        known = {
            "version",
            "model_sha256",
            "target",
            "recovery",
            "ridge",
            "calib_sha256",
            "groups",
            "extra",
        }
        if data.get("version") == 2:
            known |= {"depth", "depth_ridge", "rank"}
        unknown = sorted(set(data) - known)
        if data.get("version") not in READ_VERSIONS or unknown:
            raise ConfigError(
                f"cannot read prune plan: version {data.get('version')!r} (this edgerep reads "
                f"{', '.join(map(str, READ_VERSIONS))}) or unknown keys {unknown}"
            )
        depth = []
        for e in data.get("depth") or ():
            base = {"output", "input", "map", "channels"}
            # a projection-shortcut block also records its map's out_channels, stride, shortcut
            if not isinstance(e, Mapping) or set(e) not in (base, base | set(PROJECTION_KEYS)):
                raise ConfigError(
                    f"depth entry {e!r} of the plan is not {{output, input, map, channels}} "
                    f"(plus {{{', '.join(PROJECTION_KEYS)}}} for a projection shortcut); the "
                    "plan file is damaged"
                )
            depth.append(dict(e))
        ranks: dict[str, int] = {}
        for e in data.get("rank") or ():
            try:
                ranks[str(e["layer"])] = int(e["rank"])
            except (KeyError, TypeError, ValueError) as err:
                raise ConfigError(
                    f"rank entry {e!r} of the plan is not {{layer, rank}}; the plan file is damaged"
                ) from err
        kept: dict[str, tuple[int, ...]] = {}
        sizes: dict[str, int] = {}
        for g in data["groups"]:
            idx = tuple(int(i) for i in g["kept"])
            size = int(g["size"])
            if not idx or list(idx) != sorted(set(idx)) or idx[0] < 0 or idx[-1] >= size:
                raise ConfigError(
                    f"group {g.get('name')!r} of the plan keeps {len(idx)} channels that are "
                    f"not sorted unique indices in [0, {size}); the plan file is damaged"
                )
            kept[str(g["name"])] = idx
            sizes[str(g["name"])] = size
        return cls(
            kept=kept,
            sizes=sizes,
            model_sha256=str(data["model_sha256"]),
            recovery=str(data.get("recovery", "none")),
            ridge=float(data.get("ridge", 1e-4)),
            calib_sha256=data.get("calib_sha256"),
            target=str(data.get("target", "")),
            extra=dict(data.get("extra") or {}),
            depth=tuple(depth),
            depth_ridge=float(data.get("depth_ridge", 1e-4)),
            ranks=ranks,
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> PrunePlan:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read prune plan {str(path)!r}: {e}") from e
        return cls.from_dict(data)


def apply_plan_structure(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    kept: Mapping[str, Sequence[int]],
    *,
    check_sha256: str | None = None,
) -> nn.Module:
    """A pruned copy of `model`: each named group keeps only its `kept` channels.

    Torch-Pruning's group pruning slices every coupled layer; values are copied, not
    recomputed, so they are the original bits.

    Raises:
        ConfigError: a group the model does not have or cannot prune, an index out of
            range, or (with `check_sha256`) a model other than the plan's.
    """
    tp = require_torch_pruning()
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = [example_inputs]
    work = copy.deepcopy(model).eval()
    # hashed after the copy, as `prune` hashes its copy: a deep-copied torch.fx
    # GraphModule prints under another class name than the fold's original
    if check_sha256 is not None and model_sha256(work) != check_sha256:
        raise ConfigError(
            "the prune plan was made for another model (its model_sha256 differs from this "
            "model's); apply a plan to the exact model (same weights, folded the same way) "
            "it was made from"
        )
    graph, groups = build_groups(work, example_inputs, trial=False)
    by_name = {g.name: g for g in groups}
    modules = dict(work.named_modules())
    for name, idx in kept.items():
        g = by_name.get(name)
        if g is None:
            raise ConfigError(
                f"the model has no channel group rooted at {name!r}; groups: {', '.join(by_name)}"
            )
        if not g.prunable:
            raise ConfigError(f"group {name!r} cannot be pruned: {g.reason}")
        keep = sorted({int(i) for i in idx})
        if not keep or keep[0] < 0 or keep[-1] >= g.size:
            raise ConfigError(
                f"group {name!r} has {g.size} channels; kept indices must lie in [0, {g.size}) "
                f"and not be empty"
            )
        removed = sorted(set(range(g.size)) - set(keep))
        if not removed:
            continue
        root = modules[name]
        fn = (
            tp.prune_linear_out_channels
            if isinstance(root, nn.Linear)
            else (tp.prune_conv_out_channels)
        )
        group = graph.get_pruning_group(root, fn, idxs=removed)
        group.prune()
    return work


def apply_full_structure(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    plan: PrunePlan,
    *,
    check_sha256: bool = True,
) -> nn.Module:
    """The plan's structure on a copy of `model`: depth maps (identity), channels, ranks.

    The weights are those of `model` (sliced) and of identity maps; `load_pruned`
    then loads the saved state_dict, `apply_plan` re-solves what needs data.
    """
    from edgerep.prune._depth import blocks_from_plan, replace_blocks, to_graph
    from edgerep.prune._rank import apply_ranks

    if isinstance(example_inputs, torch.Tensor):
        example_inputs = [example_inputs]
    work = copy.deepcopy(model).eval()
    # hashed after the copy, as `prune` hashes its copy: a deep-copied torch.fx
    # GraphModule prints under another class name than the fold's original
    if check_sha256 and model_sha256(work) != plan.model_sha256:
        raise ConfigError(
            "the prune plan was made for another model (its model_sha256 differs from this "
            "model's); apply a plan to the exact model (same weights, folded the same way) "
            "it was made from"
        )
    if plan.depth:
        gm = to_graph(work)
        work = replace_blocks(gm, blocks_from_plan(gm, example_inputs, plan.depth))
    if plan.kept:
        work = apply_plan_structure(work, example_inputs, plan.kept)
    if plan.ranks:
        work = apply_ranks(work, plan.ranks)
    return work


def index_maps(
    model: nn.Module, example_inputs: Sequence[torch.Tensor], kept: Mapping[str, Sequence[int]]
) -> dict[str, np.ndarray]:
    """For each Conv/Linear layer: the original output-channel index of each remaining row.

    Found by pruning a copy whose every output row holds its own index, so that
    whatever Torch-Pruning does with concatenations or reshapes, the answer is its own.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = [example_inputs]
    tagged = copy.deepcopy(model).double()
    with torch.no_grad():
        for m in tagged.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                rows = torch.arange(m.weight.shape[0], dtype=torch.float64)
                m.weight.copy_(rows.reshape(-1, *([1] * (m.weight.dim() - 1))).expand_as(m.weight))
    pruned = apply_plan_structure(tagged, [to_float64(t) for t in example_inputs], kept)
    out = {}
    for name, m in pruned.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            out[name] = m.weight.detach().reshape(m.weight.shape[0], -1)[:, 0].long().numpy()
    return out


def save_pruned(model: nn.Module, plan: PrunePlan, out_dir: str | Path) -> Path:
    """Write ``pruned_state_dict.pt`` (plain tensors) and ``prune_plan.json`` into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    tmp = out / (WEIGHTS_FILE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(out / WEIGHTS_FILE)
    plan.save(out / PLAN_FILE)
    return out


def load_pruned(
    model: nn.Module, example_inputs: Sequence[torch.Tensor], directory: str | Path
) -> nn.Module:
    """The pruned model saved by `save_pruned`, rebuilt from the original `model`.

    The plan gives the structure (applied to a copy of `model`), the state_dict the
    weights, read with ``weights_only=True``.

    Raises:
        SourceError: the files are missing or do not fit the model.
    """
    d = Path(directory)
    if not (d / PLAN_FILE).is_file() or not (d / WEIGHTS_FILE).is_file():
        raise SourceError(f"{str(d)!r} holds no {PLAN_FILE} and {WEIGHTS_FILE}")
    plan = PrunePlan.load(d / PLAN_FILE)
    pruned = apply_full_structure(model, example_inputs, plan)
    state = torch.load(d / WEIGHTS_FILE, weights_only=True)
    try:
        pruned.load_state_dict(state)
    except RuntimeError as e:
        raise SourceError(f"{WEIGHTS_FILE} in {str(d)!r} does not fit the plan: {e}") from e
    return pruned
