"""CUDA-graph replay of a backend's per-layer step, so its glue stops costing host time.

The decode paths of the kvfold backends are a hundred or more small tensor operations per layer and
step, free of host syncs and of shapes that depend on data. Run eagerly, each operation costs a few
microseconds of Python and a kernel launch, which made TreeKV's decode step several milliseconds
per layer on an H100 against tens of microseconds of GPU work. vLLM cannot capture them: an
attention backend is a splitting point of its piecewise graphs. :class:`GraphedStep` captures the
step itself, once per shape key, and replays it.

The first call with a key runs ``fn`` eagerly on the real inputs (its side effects on the KV cache
are that step's), then records ``fn`` on copies of the inputs without running it; later calls copy
their inputs into those copies and replay. Graphs share one memory pool (they run one at a time on
one stream, as vLLM's own graphs do), and the outputs returned are the graph's buffers: read them
before the next call with the same key.

Off on CPU, while another capture is under way, and with ``KVFOLD_CUDA_GRAPHS=0``. A step that
cannot be captured logs a warning and stays eager (``KVFOLD_CUDA_GRAPHS=strict`` raises instead).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)
_pool: Any = None


def enabled(device: torch.device) -> bool:
    return (device.type == "cuda" and os.environ.get("KVFOLD_CUDA_GRAPHS", "1") != "0"
            and not torch.cuda.is_current_stream_capturing())


def kv_cache_key(cache: torch.Tensor) -> int:
    """Part of a graph's key: graphs hold the addresses of the cache they were captured on."""
    return cache.data_ptr()


def bucket(n: int, sizes: Sequence[int] = (1, 2, 4, 8)) -> int:
    """The padded size a batch of ``n`` runs at: the small sizes, then multiples of 8 (as vLLM's
    capture sizes), so a batch that grows by one does not need a new graph each time."""
    for size in sizes:
        if n <= size:
            return size
    return -(-n // 8) * 8


class GraphedStep:
    """``fn(*tensors, **static) -> tuple[Tensor, ...]`` replayed as a CUDA graph per key.

    ``static`` (hashable values the step's shapes or launch grids depend on) and the inputs' shapes
    and dtypes join the key, so an input of a new shape captures a new graph instead of failing to
    copy into an old one's buffers. Callers pad inputs to few shapes to keep the graphs few.
    """

    def __init__(self, fn: Callable[..., tuple[torch.Tensor, ...]]) -> None:
        self.fn = fn
        self.failed = False
        self.graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], tuple[torch.Tensor, ...]]] = {}

    def __call__(self, key: Hashable, *inputs: torch.Tensor, **static: Hashable) -> tuple[torch.Tensor, ...]:
        if not inputs or not enabled(inputs[0].device):
            return self.fn(*inputs, **static)
        key = (key, tuple(sorted(static.items())), tuple((x.shape, x.dtype) for x in inputs))
        entry = self.graphs.get(key)
        if entry is not None:
            graph, buffers, outputs = entry
            for buffer, x in zip(buffers, inputs):
                buffer.copy_(x, non_blocking=True)
            graph.replay()
            return outputs
        result = self.fn(*inputs, **static)  # the real step, and the warm-up the capture needs
        if not self.failed:
            try:
                self.graphs[key] = self._capture(inputs, static)
            except RuntimeError as exc:
                if os.environ.get("KVFOLD_CUDA_GRAPHS") == "strict":  # the GPU checks
                    raise
                # The step stays correct eagerly; say so once instead of stopping the server.
                global _pool
                _pool = None  # a failed capture leaves its pool unusable for the next one
                self.failed = True
                logger.warning("kvfold: %s cannot be captured as a CUDA graph (%s); it runs eagerly",
                               getattr(self.fn, "__qualname__", self.fn), exc)
        return result

    def _capture(self, inputs: Sequence[torch.Tensor], static: dict[str, Hashable]):
        global _pool
        if _pool is None:
            _pool = torch.cuda.graph_pool_handle()
        buffers = [x.clone() for x in inputs]
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            # thread_local: vLLM's other threads (output copies, scheduling) keep working.
            graph.capture_begin(pool=_pool, capture_error_mode="thread_local")
            try:
                outputs = self.fn(*buffers, **static)
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(stream)
        return graph, buffers, tuple(outputs)
