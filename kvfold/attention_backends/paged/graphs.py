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

Each graph keeps its outputs and reads its inputs from buffers shared by every graph of the process
with inputs of the same shapes (:func:`input_buffers`): graphs replay one at a time and each call
copies all its inputs in first, so the 32 layers' graphs of one batch shape need one set of input
buffers, not 32. The pool's other memory is reused from graph to graph. That memory is outside
vLLM's KV-cache accounting (the graphs are captured while serving, after vLLM sized the cache), and
a graph per layer, batch size and shape adds up: TreeKV at 8B shape held about 63 KB per request
per layer and graph before inputs were shared, 2.8 GB over 32 layers for every batch size up to 144.
So the graphs of a process hold at most ``KVFOLD_CUDA_GRAPH_MEMORY_MB``
(default 1024) of memory, measured per capture as what stays allocated after it or what the
allocator reserved for it, whichever is more (at least its inputs and outputs); shapes that come
later run eagerly.

All captures use one stream, warmed outside any capture. cuBLAS keeps a workspace per stream
(32 MiB on Hopper), and a workspace first needed inside a capture is taken from the graphs' pool and
kept. Capturing on a stream from torch's pool each time (up to 32 streams) is our reading of why an
8B-shape VQKV server on an H100 held ~2 GiB of graph pools with inputs and outputs capped at 1 GiB,
before a capture ran out of memory and the engine died. A capture also needs
``KVFOLD_CUDA_GRAPH_HEADROOM_MB`` (default 2048) of the device still free afterwards, so that the
eager steps keep room; after any failed capture the process stops capturing (its pool is kept:
memory a graph may reference is never handed back).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

logger = logging.getLogger("vllm.kvfold.graphs")  # vLLM configures its "vllm" logger tree
_pool: Any = None
_inputs: dict[Hashable, torch.Tensor] = {}  # capture inputs, shared by all graphs (input_buffers)
_graphs = 0  # graphs captured by this process
_reported_mib = 0  # graph memory last logged (every LOG_STEP_MIB more)
LOG_STEP_MIB = 256
_stream: Any = None  # the one capture stream, its cuBLAS workspaces made outside any capture
_held_bytes = 0  # memory kept by every graph of this process
_cap_reported = False
_room_reported = False
_broken = False  # a capture failed: no more captures in this process


def memory_limit() -> int:
    """Bytes of inputs and outputs all graphs may keep (``KVFOLD_CUDA_GRAPH_MEMORY_MB``)."""
    raw = os.environ.get("KVFOLD_CUDA_GRAPH_MEMORY_MB", "1024")
    try:
        megabytes = float(raw)
    except ValueError:
        raise ValueError(f"KVFOLD_CUDA_GRAPH_MEMORY_MB={raw!r} is not a number of megabytes") from None
    if megabytes < 0:
        raise ValueError(f"KVFOLD_CUDA_GRAPH_MEMORY_MB={raw!r} is negative")
    return int(megabytes * (1 << 20))


def headroom() -> int:
    """Bytes of the device a capture must leave free (``KVFOLD_CUDA_GRAPH_HEADROOM_MB``)."""
    raw = os.environ.get("KVFOLD_CUDA_GRAPH_HEADROOM_MB", "2048")
    try:
        megabytes = float(raw)
    except ValueError:
        raise ValueError(f"KVFOLD_CUDA_GRAPH_HEADROOM_MB={raw!r} is not a number of megabytes") from None
    if megabytes < 0:
        raise ValueError(f"KVFOLD_CUDA_GRAPH_HEADROOM_MB={raw!r} is negative")
    return int(megabytes * (1 << 20))


def room_for(needed: int, free: int, reserved: int, allocated: int, keep: int) -> bool:
    """Whether ``needed`` more bytes leave ``keep`` bytes spare: the driver's ``free`` plus what the
    caching allocator holds unused (``reserved - allocated``)."""
    return free + reserved - allocated - needed >= keep


def tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _input_key(slot: int, x: torch.Tensor) -> Hashable:
    return slot, tuple(x.shape), x.stride(), x.dtype, x.device


def new_input_bytes(inputs: Sequence[torch.Tensor]) -> int:
    """Bytes :func:`input_buffers` would allocate for ``inputs``."""
    return tensor_bytes([x for slot, x in enumerate(inputs) if _input_key(slot, x) not in _inputs])


def input_buffers(inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The process's buffers a graph reads ``inputs`` from, one per (position in the call, shape,
    strides, dtype, device), made on first need outside any capture."""
    buffers = []
    for slot, x in enumerate(inputs):
        key = _input_key(slot, x)
        if key not in _inputs:
            _inputs[key] = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
        buffers.append(_inputs[key])
    return buffers


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

    def __init__(self, fn: Callable[..., tuple[torch.Tensor, ...]],
                 on_memory: Callable[[int], None] | None = None) -> None:
        self.fn = fn
        self.on_memory = on_memory  # told the process's graph memory after each capture (a metric)
        self.failed = False
        memory_limit()  # a bad setting stops the start-up, not a later step
        headroom()
        self.graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], tuple[torch.Tensor, ...]]] = {}

    def __call__(self, key: Hashable, *inputs: torch.Tensor, **static: Hashable) -> tuple[torch.Tensor, ...]:
        global _held_bytes, _broken
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
        needed = new_input_bytes(inputs) + tensor_bytes(result)
        if not self.failed and not _broken and self._room(inputs[0].device, needed) and self._affordable(needed):
            try:
                self.graphs[key], kept = self._capture(inputs, static)
                self._book(kept - needed)
                self._report()
                if self.on_memory is not None:
                    self.on_memory(_held_bytes)
            except RuntimeError as exc:
                if os.environ.get("KVFOLD_CUDA_GRAPHS") == "strict":  # the GPU checks
                    raise
                # The step stays correct eagerly; say so once instead of stopping the server.
                _held_bytes -= needed
                _broken = self.failed = True
                logger.warning("kvfold: %s cannot be captured as a CUDA graph (%s); kvfold captures no more "
                               "graphs in this process", getattr(self.fn, "__qualname__", self.fn), exc)
        return result

    @staticmethod
    def _report() -> None:
        """Count the new graph; log the process's graph memory every LOG_STEP_MIB of growth, so a
        server log shows how close the graphs come to KVFOLD_CUDA_GRAPH_MEMORY_MB."""
        global _graphs, _reported_mib
        _graphs += 1
        mib = _held_bytes >> 20
        if mib >= _reported_mib + LOG_STEP_MIB:
            _reported_mib = mib - mib % LOG_STEP_MIB
            logger.info("kvfold: %d CUDA graphs hold %d MiB (KVFOLD_CUDA_GRAPH_MEMORY_MB=%.0f)",
                        _graphs, mib, memory_limit() / (1 << 20))

    @staticmethod
    def _book(extra: int) -> None:
        """Add what a capture kept beyond its inputs and outputs (workspaces, leaked intermediates)."""
        global _held_bytes
        _held_bytes += max(extra, 0)

    @staticmethod
    def _room(device: torch.device, needed: int) -> bool:
        free, _ = torch.cuda.mem_get_info(device)
        if room_for(needed, free, torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device),
                    headroom()):
            return True
        global _room_reported
        if not _room_reported:
            _room_reported = True
            logger.warning("kvfold: %.0f MiB of the GPU left, under KVFOLD_CUDA_GRAPH_HEADROOM_MB=%.0f; "
                           "steps of new shapes run eagerly", free / (1 << 20), headroom() / (1 << 20))
        return False

    @staticmethod
    def _affordable(needed: int) -> bool:
        """Whether a new graph keeping ``needed`` bytes fits the limit; if so, they are booked."""
        global _held_bytes, _cap_reported
        limit = memory_limit()
        if _held_bytes + needed > limit:
            if not _cap_reported:
                _cap_reported = True
                logger.warning("kvfold: CUDA graphs hold %.0f MiB (KVFOLD_CUDA_GRAPH_MEMORY_MB=%.0f); "
                               "steps of new shapes run eagerly", _held_bytes / (1 << 20), limit / (1 << 20))
            return False
        _held_bytes += needed
        return True

    def _capture(self, inputs: Sequence[torch.Tensor], static: dict[str, Hashable]):
        """Returns the graph entry and the bytes it keeps (buffers, outputs, the pool's growth)."""
        global _pool
        device = inputs[0].device
        if _pool is None:
            _pool = torch.cuda.graph_pool_handle()
        stream = capture_stream(device)
        before = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
        buffers = input_buffers(inputs)
        graph = torch.cuda.CUDAGraph()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            # thread_local: vLLM's other threads (output copies, scheduling) keep working.
            graph.capture_begin(pool=_pool, capture_error_mode="thread_local")
            try:
                outputs = self.fn(*buffers, **static)
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(stream)
        # What stays allocated (buffers, outputs), or what the allocator had to reserve for the
        # capture, whichever is more: the pool keeps a capture's freed intermediates for its
        # replays, so new segments it needed are held for good.
        kept = max(torch.cuda.memory_allocated(device) - before[0], torch.cuda.memory_reserved(device) - before[1])
        return (graph, buffers, tuple(outputs)), kept


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The process's capture stream; its first use runs the matrix products the steps use (fp32,
    16-bit, with a bias: cuBLAS and cuBLASLt) so their workspaces come from the ordinary allocator."""
    global _stream
    if _stream is None:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                a = torch.ones(64, 64, device=device, dtype=dtype)
                torch.addmm(a, a, a)
                torch.mm(a, a)
        torch.cuda.current_stream(device).wait_stream(stream)
        stream.synchronize()
        _stream = stream
    return _stream
