"""Live tensor bytes under a dispatch mode: how much activation memory a call holds at once."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the storages that ops return while the mode is on, as long as a tensor holds them.

    Every tensor an op returns is followed by a weak reference; its storage counts
    from the first tensor seen on it until the last such tensor is gone. Storages of
    tensors made before the mode (``ignore``) never count, so slicing a calibration
    set does not count the whole set. ``peak`` is the most bytes alive at once.
    """

    def __init__(self, *ignore: torch.Tensor) -> None:
        super().__init__()
        self._ignored = {t.untyped_storage().data_ptr() for t in ignore}
        self._live: dict[int, list[int]] = {}  # storage pointer -> [bytes, tensors alive]
        self.now = 0
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._follow(t)
        return out

    def _follow(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self._ignored:
            return
        entry = self._live.get(key)
        if entry is None:
            self._live[key] = [storage.nbytes(), 1]
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
        else:
            entry[1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self._live[key]
