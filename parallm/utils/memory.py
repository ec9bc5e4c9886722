"""The peak of torch-allocated bytes on any device, CPU included: tensor storages as they live.

CPU has no `torch.cuda.max_memory_allocated`, and the profiler's allocator events
(`profile_memory=True`) miss every free made on a thread it does not profile: a collective's
buffer released by the gloo thread that ran it stays counted, so the total only grows under
FSDP. `AllocationTracker` instead follows storages: a dispatch mode sees each tensor an
operator returns (a DTensor's local tensor included) and counts its storage's bytes once, a
weak reference takes them off when the storage is freed, on whatever thread, and
`UntypedStorage.resize_` (how FSDP2 frees and refills its gathered parameters) moves the count.
Opened before a model is built, the count is everything the run holds in tensors: parameters,
gradients, optimizer state, activations, communication buffers (not RSS: no allocator slack, no
Python objects, no gloo-internal buffers; nor the short-lived temporaries a DTensor operator
makes inside its own dispatch, or a kernel's workspace).

    with AllocationTracker() as mem:
        model = build()
        mem.reset_peak()
        step(model)
    mem.peak  # the most bytes held at once since reset_peak
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class AllocationTracker(TorchDispatchMode):
    """Counts the bytes of live tensor storages created while it is open; `held` now, `peak`
    since `reset_peak` (or the start)."""

    def __init__(self) -> None:
        super().__init__()
        self.held = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}  # id of the storage's weak reference -> bytes counted
        self._refs: dict[int, tuple[weakref.ref, int]] = {}  # storage key -> (ref, its id)
        self._lock = threading.Lock()
        self._resize = None

    def reset_peak(self) -> None:
        with self._lock:
            self.peak = self.held

    def _add(self, delta: int) -> None:
        self.held += delta
        self.peak = max(self.peak, self.held)

    def _freed(self, ref: weakref.ref) -> None:
        with self._lock:
            self._add(-self._sizes.pop(id(ref), 0))

    def _track(self, t: torch.Tensor) -> None:
        if hasattr(t, "__tensor_flatten__"):  # a DTensor (or another wrapper): its inner tensors
            for name in t.__tensor_flatten__()[0]:
                inner = getattr(t, name)
                if isinstance(inner, torch.Tensor):
                    self._track(inner)
            return
        if t.device.type != "meta":
            self._track_storage(t.untyped_storage())

    def _track_storage(self, st: torch.UntypedStorage) -> None:
        key = st._cdata
        with self._lock:
            known = self._refs.get(key)
            if known is not None and known[0]() is st:
                return
            ref = weakref.ref(st, self._freed)
            self._refs[key] = (ref, id(ref))
            self._sizes[id(ref)] = st.nbytes()
            self._add(st.nbytes())

    def _resized(self, st: torch.UntypedStorage, before: int) -> None:
        with self._lock:
            known = self._refs.get(st._cdata)
            if known is not None and known[0]() is st:
                self._sizes[known[1]] = st.nbytes()
                self._add(st.nbytes() - before)
                return
        self._track_storage(st)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            # Let DTensor run the operator: the local operators it runs come back through this
            # mode, so its temporaries (a redistributed input, loss_parallel's pieces) count.
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def __enter__(self) -> AllocationTracker:
        original = torch.UntypedStorage.resize_
        tracker = self

        def resize_(st: torch.UntypedStorage, size: int):
            before = st.nbytes()
            result = original(st, size)
            tracker._resized(st, before)
            return result

        self._resize = original
        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        torch.UntypedStorage.resize_ = self._resize
        super().__exit__(*exc)
