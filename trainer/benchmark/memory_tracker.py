"""Peak bytes of live tensor storages, measured on any device (the CPU included) without reading the RSS.

A `TorchDispatchMode` sees every tensor that an operator takes or returns on this thread; each distinct
storage is counted from the first time it is seen until it is freed (a weak reference on the storage tells).
Tensors that exist before the mode and are used in it (weights loaded from a file) are counted from their
first use, so the peak of a training loop is right from its second step on. Tensors made and used only on
other threads (the data reader's) are not seen.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorMemory(TorchDispatchMode):
    def __init__(self, device_type: str = "cpu"):
        super().__init__()
        self.device_type = device_type
        self.live: dict[int, int] = {}  # storage id -> bytes
        self._refs: dict[int, weakref.ref] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten((args, kwargs, out))[0]:
            if isinstance(value, torch.Tensor) and value.device.type == self.device_type:
                self._see(value)
        return out

    def _see(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        size = storage.nbytes()
        self.live[key] = size
        self._refs[key] = weakref.ref(storage, lambda _, key=key: self._free(key))
        self.current += size
        self.peak = max(self.peak, self.current)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)
        self._refs.pop(key, None)

    def reset_peak(self) -> None:
        self.peak = self.current
