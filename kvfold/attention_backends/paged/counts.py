"""Device-side numbers the host reads without stalling: counts for metrics that may arrive a step
late, and invariant checks that run where a sync is free."""

from __future__ import annotations

import os
from collections import deque

import torch


def check_invariants(device: torch.device) -> bool:
    """Whether to verify a cache invariant that costs a device sync to read: always on CPU (free
    there, and what the tests run), on CUDA only with ``KVFOLD_CHECK_INVARIANTS=1``."""
    return device.type != "cuda" or os.environ.get("KVFOLD_CHECK_INVARIANTS") == "1"


class DeferredCount:
    """A running total of counts computed on the device.

    Reading a count with ``int()`` makes the host wait for every kernel queued before it, so a
    backend that did so once per step (TreeKV's evictions) lost the host's lead over the GPU in
    every step. Here each count is copied into pinned memory behind the step's kernels, and
    :meth:`take` returns what has landed so far; the rest is returned by a later call.
    """

    def __init__(self) -> None:
        self._ready = 0
        self._pending: deque[tuple[torch.cuda.Event, torch.Tensor]] = deque()

    def add(self, count: torch.Tensor) -> None:
        if count.device.type != "cuda":
            self._ready += int(count)
            return
        host = torch.empty(count.shape, dtype=count.dtype, pin_memory=True)
        host.copy_(count, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((event, host))

    def take(self) -> int:
        """The counts whose copies have finished (all of them on CPU), each returned once."""
        total, self._ready = self._ready, 0
        while self._pending and self._pending[0][0].query():
            total += int(self._pending.popleft()[1])
        return total
