"""Decode-attention kernel microbenchmark: time per call and share of the HBM bandwidth floor.

One decode step of one attention layer at a model's shape (default Llama-3.1-8B: 32 query heads,
8 KV heads, head dim 128, bf16, 16-token blocks), for each batch size and context length:

- ``fa3``: FlashAttention-3 as vLLM 0.32's FLASH_ATTN calls it for decode (``flash_attn_varlen_func``
  on the paged cache, ``block_table``/``seqused_k``, ``max_seqlen_q=1``, causal, ``fa_version=3``,
  the ahead-of-time ``scheduler_metadata``), K/V being views of vLLM's cache layout
  ``[blocks, kv_heads, block_size, 2 * head_dim]``;
- ``sdpa``: PyTorch's own fused attention (``scaled_dot_product_attention``, flash/cuDNN/efficient
  backends, GQA) over a contiguous dense bf16 cache: a dense baseline that needs no vLLM;
- ``triton``: TRITON_ATTN's ``unified_attention`` on the same layout (its 3D split-softmax kernel
  below 16 sequences, as vLLM configures it);
- ``treekv``: kvfold's TreeKV decode kernel over per-(request, head) entry lists; its context axis
  is the budget (the kernel reads only the kept entries), at the same batch sizes;
- ``fourier``: KVFOLD_FOURIER's whole decode step of one layer (``fourier.decode.decode_step``: the
  new token's write, the coefficient passes with their rank-1 updates, the FFTs, the
  FlashFourierAttention kernel and the merge), the paper's settings and middle-layer shares (80% of
  K and V dims compressed, k = 512, 4 sink + 1020 recent), eager (it syncs with the host);
- ``fa3_fp8``: ``fa3`` with an fp8 (e4m3) cache and query, as FLASH_ATTN with ``--kv-cache-dtype fp8``.

First the HBM bandwidth is measured (a large device-to-device copy, bytes read + written / time;
and a read-only sum for reference). Each kernel's achieved bandwidth = the bytes it must read (K and
V of the attended tokens, the block table or entry ids, the queries) / its median time; its share of
the copy bandwidth is reported. A real model has one cache per layer: each measurement rotates over
up to 32 separate caches (at least ~512 MiB in all) so L2 (50 MB on an H100) does not serve
repeated reads, and replays the calls from a CUDA graph so launch overhead does not count (falling
back to timed eager calls where capture fails; the result says which).

Results go to a JSON rewritten after every measurement (a run cut short keeps what it measured).

    python -m benchmarks.kernels --time-budget 400 --out OUT.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field

from benchmarks import env_info
from benchmarks.model_dirs import load_config, model_names

REPO = Path(__file__).resolve().parent.parent
KERNELS = ["fa3", "sdpa", "treekv", "vqkv", "fourier", "triton", "fa3_fp8"]
FOURIER = {"sink": 4, "recent": 1020, "freqs": 512, "fractions": (0.8, 0.8)}  # the paper's middle layers
# kvfold calibrate vqkv defaults: 2 x 8 key codes, 16 value groups of 1 stage per token and head
VQKV_STAGES = (8, 1)
VQKV_VALUE_GROUPS = 16
ROTATE_TARGET_BYTES = 512 * 2**20
MAX_LAYERS = 32


@dataclass(frozen=True)
class Shape:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int = 16

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def kv_bytes(self, tokens: int, elem: int = 2) -> int:
        """K + V of ``tokens`` tokens of one layer, all KV heads."""
        return tokens * self.num_kv_heads * self.head_dim * 2 * elem


class Measurement(BaseModel):
    kernel: str
    batch: int
    context: int  # tokens attended per request and KV head (TreeKV: the budget)
    status: str  # ok, failed, skipped, unavailable
    reason: str | None = None
    time_us: float | None = None  # median over repeats, per call (one layer)
    time_us_min: float | None = None
    repeats: list[float] = Field(default_factory=list)
    layers: int | None = None  # caches rotated over
    timing: str | None = None  # cuda_graph, eager_events, cpu_wall
    bytes_required: int | None = None
    bytes_extra_estimate: int | None = None  # outputs and scratch the implementation also moves
    achieved_gbps: float | None = None
    pct_of_hbm_copy: float | None = None
    notes: dict[str, Any] = Field(default_factory=dict)


class KernelRun(BaseModel):
    kind: str = "kernels"
    date: str
    command: list[str]
    environment: dict[str, Any] = Field(default_factory=dict)
    model: str
    shape: dict[str, int]
    dtype: str = "bfloat16"
    hbm: dict[str, Any] = Field(default_factory=dict)
    check: dict[str, Any] = Field(default_factory=dict)
    measurements: list[Measurement] = Field(default_factory=list)
    elapsed_s: float = 0.0


# ----------------------------------------------------------------------------------------------
# Timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(calls: list[Callable[[], object]], device: torch.device, iters: int, repeats: int,
               use_graph: bool = True) -> tuple[list[float], str, str | None]:
    """Microseconds per call (one per repeat) of running ``calls`` in turn, ``iters`` times.

    On CUDA the sequence is captured once in a CUDA graph and replayed between two events; if the
    capture fails the calls run eagerly between the events (launch overhead then counts).
    """
    for call in calls:  # warm-up: JIT compilation, autotuning, allocator
        call()
    _sync(device)
    per_pass = len(calls)
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(iters):
                for call in calls:
                    call()
            times.append((time.perf_counter() - t0) * 1e6 / (iters * per_pass))
        return times, "cpu_wall", None

    run: Callable[[], None]
    mode, note = "cuda_graph", None
    if use_graph:
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up on a side stream, as torch recommends
                for call in calls:
                    call()
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for call in calls:
                    call()
            run = graph.replay
        except Exception as exc:  # noqa: BLE001 (capture is an optimisation: fall back, say so)
            mode, note = "eager_events", f"graph capture failed: {exc!r}"[:300]
            _sync(device)
    else:
        mode = "eager_events"
    if mode == "eager_events":
        def run() -> None:
            for call in calls:
                call()
    run()
    _sync(device)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (iters * per_pass))
    return times, mode, note


def measure_hbm(device: torch.device, gib: float, repeats: int) -> dict[str, Any]:
    """Copy bandwidth (read + write bytes / time) and read-only bandwidth (a sum), median."""
    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    copy_times, mode, _ = time_calls([lambda: dst.copy_(src)], device, iters=1, repeats=repeats,
                                     use_graph=False)
    read_times, _, _ = time_calls([lambda: src.sum(dtype=torch.float32)], device,
                                  iters=1, repeats=repeats, use_graph=False)
    nbytes = n * 2
    copy_us, read_us = statistics.median(copy_times), statistics.median(read_times)
    return {
        "buffer_gib": gib, "repeats": repeats, "timing": mode,
        "copy_us": copy_us, "copy_gbps": 2 * nbytes / copy_us / 1e3,
        "copy_gbps_max": 2 * nbytes / min(copy_times) / 1e3,
        "read_us": read_us, "read_gbps": nbytes / read_us / 1e3,
        "read_gbps_max": nbytes / min(read_times) / 1e3,
    }


# ----------------------------------------------------------------------------------------------
# Inputs


def paged_cache(shape: Shape, batch: int, context: int, device: torch.device,
                dtype: torch.dtype = torch.bfloat16, gen: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's cache ``[blocks, Hk, block_size, 2D]`` (K | V in the last dim) and a block table
    ``[batch, blocks per request]`` over a random permutation of the blocks (a cache in use)."""
    per_req = math.ceil(context / shape.block_size)
    blocks = batch * per_req
    size = (blocks, shape.num_kv_heads, shape.block_size, 2 * shape.head_dim)
    if dtype == torch.float8_e4m3fn:
        cache = torch.empty(size, dtype=torch.uint8, device=device)
        cache.random_(0, 256, generator=gen)
        cache.bitwise_and_(0xBF)  # top exponent bit off: |x| < 2, and no NaN patterns (0x7F/0xFF)
        cache = cache.view(torch.float8_e4m3fn)
    else:
        cache = torch.empty(size, dtype=dtype, device=device).normal_(generator=gen)
    table = torch.randperm(blocks, device=device, generator=gen).view(batch, per_req).to(torch.int32)
    return cache, table


def split_kv(cache: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V as FlashAttention and Triton get them: ``[blocks, block_size, Hk, D]`` views."""
    key, value = cache.transpose(1, 2).split(head_dim, dim=-1)
    return key, value


def treekv_entries(shape: Shape, batch: int, budget: int, pool_tokens: int, device: torch.device,
                   gen: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
    """Entries ``[batch, Hk, budget]`` int32: per (request, head) a random ``budget`` of the
    request's ``pool_tokens`` slots (its blocks scattered over the pool), in the request's token
    order (as TreeKV keeps them: old to new, with gaps)."""
    bs = shape.block_size
    per_req = math.ceil(pool_tokens / bs)
    blocks = batch * per_req
    req_blocks = torch.randperm(blocks, device=device, generator=gen).view(batch, per_req)
    scores = torch.rand(batch, shape.num_kv_heads, per_req * bs, device=device, generator=gen)
    local = scores.argsort(-1)[..., :budget].sort(-1).values
    del scores
    block = torch.gather(req_blocks[:, None, :].expand(-1, shape.num_kv_heads, -1), 2, local // bs)
    return (block * bs + local % bs).to(torch.int32).contiguous(), blocks


# ----------------------------------------------------------------------------------------------
# Kernels: each builder returns (call, bytes_required, bytes_extra_estimate, notes) for one layer


def _import_fa() -> Any:
    from vllm.vllm_flash_attn import flash_attn_varlen_func, get_scheduler_metadata

    return flash_attn_varlen_func, get_scheduler_metadata


def build_sdpa(shape: Shape, batch: int, context: int, device: torch.device,
               gen: torch.Generator | None = None) -> tuple[Callable[[], object], int, int, dict]:
    """Dense decode attention through ``torch.nn.functional.scaled_dot_product_attention``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kv = torch.empty(2, batch, shape.num_kv_heads, context, shape.head_dim, dtype=torch.bfloat16,
                     device=device).normal_(generator=gen)
    query = torch.empty(batch, shape.num_heads, 1, shape.head_dim, dtype=torch.bfloat16,
                        device=device).normal_(generator=gen)
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]

    def call() -> object:
        with sdpa_kernel(fused if device.type == "cuda" else [SDPBackend.MATH]):
            return torch.nn.functional.scaled_dot_product_attention(query, kv[0], kv[1], enable_gqa=True)

    return call, kv.numel() * 2 + query.numel() * 2, query.numel() * 2, {}


def build_fa3(shape: Shape, batch: int, context: int, device: torch.device, fp8: bool = False,
              gen: torch.Generator | None = None) -> tuple[Callable[[], object], int, int, dict]:
    flash_attn_varlen_func, get_scheduler_metadata = _import_fa()
    cache_dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
    cache, table = paged_cache(shape, batch, context, device, cache_dtype, gen)
    key, value = split_kv(cache, shape.head_dim)
    query = torch.empty(batch, shape.num_heads, shape.head_dim, dtype=torch.bfloat16,
                        device=device).normal_(generator=gen)
    out = torch.empty_like(query)
    if fp8:  # vLLM quantizes the query too when the cache is fp8 (FA3 wants all three alike)
        query = query.to(torch.float8_e4m3fn)
    seqused = torch.full((batch,), context, dtype=torch.int32, device=device)
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device=device)
    descale = torch.ones(1, dtype=torch.float32, device=device).expand(batch, shape.num_kv_heads)
    notes: dict[str, Any] = {}
    try:  # vLLM builds this ahead of time for FA3 (aot_schedule), outside the kernel
        scheduler = get_scheduler_metadata(
            batch_size=batch, max_seqlen_q=1, max_seqlen_k=context, num_heads_q=shape.num_heads,
            num_heads_kv=shape.num_kv_heads, headdim=shape.head_dim, cache_seqlens=seqused,
            qkv_dtype=cache_dtype, cu_seqlens_q=cu_q, page_size=shape.block_size, causal=True,
            window_size=(-1, -1), num_splits=0)
    except Exception as exc:  # noqa: BLE001 (then FA3 schedules itself; the note says so)
        scheduler, notes["scheduler_metadata"] = None, f"not used: {exc!r}"[:300]
    scale = shape.head_dim ** -0.5

    def call() -> object:
        return flash_attn_varlen_func(
            q=query, k=key, v=value, out=out, cu_seqlens_q=cu_q, max_seqlen_q=1,
            seqused_k=seqused, max_seqlen_k=context, softmax_scale=scale, causal=True,
            alibi_slopes=None, window_size=None, block_table=table, softcap=0.0,
            scheduler_metadata=scheduler, fa_version=3,
            q_descale=descale if fp8 else None, k_descale=descale if fp8 else None,
            v_descale=descale if fp8 else None, num_splits=0)

    elem = 1 if fp8 else 2
    required = (shape.kv_bytes(batch * context, elem) + table.numel() * 4
                + query.numel() * query.element_size())
    return call, required, out.numel() * 2, notes


def build_triton(shape: Shape, batch: int, context: int, device: torch.device,
                 gen: torch.Generator | None = None) -> tuple[Callable[[], object], int, int, dict]:
    from vllm.v1.attention.ops.triton_unified_attention import unified_attention

    cache, table = paged_cache(shape, batch, context, device, torch.bfloat16, gen)
    key, value = split_kv(cache, shape.head_dim)
    query = torch.empty(batch, shape.num_heads, shape.head_dim, dtype=torch.bfloat16,
                        device=device).normal_(generator=gen)
    out = torch.empty_like(query)
    seqused = torch.full((batch,), context, dtype=torch.int32, device=device)
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device=device)
    descale = torch.ones(1, dtype=torch.float32, device=device).expand(batch, shape.num_kv_heads)
    # As vLLM's TritonAttentionMetadataBuilder sets them up: the 3D (split softmax) kernel for
    # decode batches of at most 128 // kv_heads sequences, 16 segments, head dim padded to 2^k.
    segments = 16
    padded = 1 << (shape.head_dim - 1).bit_length()
    segm_out = torch.empty(batch, shape.num_heads, segments, padded, dtype=torch.float32, device=device)
    segm_max = torch.empty(batch, shape.num_heads, segments, dtype=torch.float32, device=device)
    segm_sum = torch.empty_like(segm_max)
    threshold = 128 // shape.num_kv_heads
    scale = shape.head_dim ** -0.5

    def call() -> object:
        return unified_attention(
            q=query, k=key, v=value, out=out, cu_seqlens_q=cu_q, max_seqlen_q=1,
            seqused_k=seqused, max_seqlen_k=context, softmax_scale=scale, causal=True,
            window_size=(-1, -1), block_table=table, softcap=0, q_descale=None,
            k_descale=descale, v_descale=descale, seq_threshold_3D=threshold,
            num_par_softmax_segments=segments, softmax_segm_output=segm_out,
            softmax_segm_max=segm_max, softmax_segm_expsum=segm_sum, sinks=None)

    required = shape.kv_bytes(batch * context) + table.numel() * 4 + query.numel() * 2
    notes = {"kernel": "3d" if batch <= threshold else "2d"}
    return call, required, out.numel() * 2, notes


def build_treekv(shape: Shape, batch: int, budget: int, device: torch.device, pool_factor: float,
                 gen: torch.Generator | None = None) -> tuple[Callable[[], object], int, int, dict]:
    from kvfold.attention_backends.treekv.kernels import decode_attention

    pool_tokens = math.ceil(budget * pool_factor / shape.block_size) * shape.block_size
    entries, blocks = treekv_entries(shape, batch, budget, pool_tokens, device, gen)
    size = (blocks, shape.num_kv_heads, shape.block_size, shape.head_dim)
    k = torch.empty(size, dtype=torch.bfloat16, device=device).normal_(generator=gen)
    v = torch.empty(size, dtype=torch.bfloat16, device=device).normal_(generator=gen)
    lengths = torch.full((batch,), budget, dtype=torch.int32, device=device)
    query = torch.empty(batch, shape.num_heads, shape.head_dim, dtype=torch.bfloat16,
                        device=device).normal_(generator=gen)
    scale = shape.head_dim ** -0.5

    def call() -> object:
        return decode_attention(query, k, v, entries, lengths, scale)

    required = shape.kv_bytes(batch * budget) + entries.numel() * 4 + query.numel() * 2
    # out (bf16) + probs (f32) + the raw logits (f32, per query head: filled, written, read back)
    logits = batch * shape.num_heads * budget * 4
    extra = query.numel() * 2 + entries.numel() * 4 + 3 * logits
    return call, required, extra, {"pool_tokens_per_request": pool_tokens}


def shape_codebooks(head_dim: int, key_stages: int, value_stages: int, device: torch.device,
                    gen: torch.Generator | None = None, value_groups: int = 1):
    """Random codebooks of the calibrated shape (speed depends on the shape only)."""
    from kvfold.attention_backends.vqkv.reference import LayerCodebooks, ResidualCodebook, rope_branches

    def book(stages: int, dims: int) -> torch.Tensor:
        return torch.empty(stages, 256, dims, device=device).normal_(generator=gen)

    key = [ResidualCodebook(d.to(device), book(key_stages, d.numel())) for d in rope_branches(head_dim)]
    value = [ResidualCodebook(d.to(device), book(value_stages, d.numel()))
             for d in torch.arange(head_dim).view(value_groups, -1)]
    return LayerCodebooks(head_dim, head_dim, key, value)


def build_vqkv(shape: Shape, batch: int, context: int, device: torch.device,
               gen: torch.Generator | None = None) -> tuple[Callable[[], object], int, int, dict]:
    """VQKV's decode kernel over ``context`` coded tokens per request (its one-byte codes are all
    it reads from HBM; codebooks and lookup tables stay in L2)."""
    from kvfold.attention_backends.vqkv.kernels import decode_attention, key_tables

    key_stages, value_stages = VQKV_STAGES
    books = shape_codebooks(shape.head_dim, key_stages, value_stages, device, gen, VQKV_VALUE_GROUPS)
    num_codes = books.num_codes
    per_request = context // shape.block_size
    blocks = batch * per_request + 1
    cache = torch.randint(0, 256, (blocks, shape.num_kv_heads, shape.block_size, num_codes),
                          dtype=torch.uint8, device=device, generator=gen)
    table = (1 + torch.randperm(blocks - 1, device=device, generator=gen)).view(batch, per_request)
    table = table.to(torch.int32)
    query = torch.empty(batch, shape.num_heads, shape.head_dim, dtype=torch.bfloat16,
                        device=device).normal_(generator=gen)
    starts = torch.zeros(batch, dtype=torch.int32, device=device)
    ends = torch.full((batch,), context, dtype=torch.int32, device=device)
    scale = shape.head_dim ** -0.5

    def call() -> object:
        return decode_attention(query, cache, table, 0, starts, ends, books, scale, longest=context)

    required = cache[1:].numel() + table.numel() * 4 + query.numel() * 2
    tables = key_tables(query, books)
    extra = tables.numel() * 4 + batch * shape.num_heads * shape.head_dim * 4
    return call, required, extra, {"num_codes": num_codes, "stages": list(VQKV_STAGES),
                                   "value_groups": VQKV_VALUE_GROUPS,
                                   "bf16_kv_bytes": shape.kv_bytes(batch * context)}


def fourier_layout(shape: Shape, gen_seed: int = 0):
    """A one-layer FourierAttention layout of ``shape`` with dims at random in ``FOURIER``'s shares."""
    from kvfold.attention_backends.fourier.layout import FourierLayout
    from kvfold.attention_backends.fourier.selection import select

    g = torch.Generator().manual_seed(gen_seed)
    noise = torch.rand(2, shape.num_kv_heads, shape.head_dim, generator=g)
    kf, vf = FOURIER["fractions"]
    return FourierLayout([select(noise[0], kf)], [select(noise[1], vf)], head_size=shape.head_dim,
                         head_size_v=shape.head_dim, dtype=torch.bfloat16, block_size=shape.block_size,
                         sink=FOURIER["sink"], recent=FOURIER["recent"], freqs=FOURIER["freqs"])


def build_fourier(shape: Shape, batch: int, context: int, device: torch.device,
                  gen: torch.Generator | None = None) -> tuple[Callable[[], object], int, int, dict]:
    """KVFOLD_FOURIER's decode step of one layer for ``batch`` requests of ``context`` tokens."""
    from kvfold.attention_backends.fourier.arena import CacheArena
    from kvfold.attention_backends.fourier.decode import HeadTables, decode_step

    layout = fourier_layout(shape)
    per_request = layout.reserved_blocks + -(-context // shape.block_size)
    blocks = batch * per_request + 1
    raw = torch.empty(blocks * layout.page_bytes, dtype=torch.uint8, device=device)
    raw.view(torch.bfloat16).normal_(generator=gen)  # finite bf16 and float32 (high halves) alike
    view = raw.view(blocks, 1, shape.block_size, layout.cell_bytes)
    arena = CacheArena([view], layout)
    tables = HeadTables.build(arena, 0)
    rows = (1 + torch.randperm(blocks - 1, device=device, generator=gen)).view(batch, per_request).to(torch.int32)
    query = torch.empty(batch, shape.num_heads, shape.head_dim, dtype=torch.bfloat16, device=device).normal_(generator=gen)
    key = torch.empty(batch, shape.num_kv_heads, shape.head_dim, dtype=torch.bfloat16, device=device).normal_(generator=gen)
    value = torch.empty_like(key).normal_(generator=gen)
    window = context - layout.sink - layout.recent
    lens = [context] * batch

    def call() -> object:
        return decode_step(arena, tables, 0, query, key, value, rows, lens, scale=shape.head_dim**-0.5,
                           window=window)

    kept = sum(d.numel() for kind in "kv" for d in layout.kept[0][kind])
    compressed = sum(d.numel() for kind in "kv" for d in layout.compressed[0][kind])
    # What a step must read: every token's kept dims, the exact ring's compressed dims, the K and V
    # coefficients (written back too), the queries.
    required = batch * (context * kept * 2 + layout.ring_entries * compressed * 2
                        + 2 * layout.freqs * compressed * 4) + query.numel() * 2
    extra = batch * shape.num_heads * window * 4 * 4  # FFT inputs/outputs and the exported probabilities
    return call, required, extra, {"bf16_kv_bytes": shape.kv_bytes(batch * context),
                                   "fourier_bytes_per_request": layout.bytes_per_request(context),
                                   "compressed_share": compressed / (2 * shape.num_kv_heads * shape.head_dim),
                                   **{k: list(v) if isinstance(v, tuple) else v for k, v in FOURIER.items()}}


# ----------------------------------------------------------------------------------------------
# Correctness check (small): every kernel against a float32 reference on one shared cache


def reference_decode(query: torch.Tensor, cache: torch.Tensor, table: torch.Tensor, context: int,
                     shape: Shape) -> torch.Tensor:
    bs, d = shape.block_size, shape.head_dim
    slots = torch.arange(context, device=cache.device)
    blocks = table[:, slots // bs].long()  # [B, ctx]
    tokens = cache[blocks, :, (slots % bs)[None, :].expand_as(blocks)]  # [B, ctx, Hk, 2D]
    keys, values = tokens[..., :d].float(), tokens[..., d:].float()
    q = query.float().view(query.shape[0], shape.num_kv_heads, shape.group, d)
    logits = torch.einsum("bhgd,bshd->bhgs", q, keys) * d ** -0.5
    out = torch.einsum("bhgs,bshd->bhgd", logits.softmax(-1), values)
    return out.reshape(query.shape)


def check_kernels(shape: Shape, kernels: Sequence[str], device: torch.device, batch: int = 3,
                  context: int = 1000) -> dict[str, Any]:
    """Max |error| of each kernel vs the float32 reference on the same cache and queries (TreeKV
    with every token kept, in order: its output must equal full attention's)."""
    gen = torch.Generator(device=device).manual_seed(1)
    cache, table = paged_cache(shape, batch, context, device, torch.bfloat16, gen)
    query = torch.empty(batch, shape.num_heads, shape.head_dim, dtype=torch.bfloat16,
                        device=device).normal_(generator=gen)
    ref = reference_decode(query, cache, table, context, shape)
    key, value = split_kv(cache, shape.head_dim)
    seqused = torch.full((batch,), context, dtype=torch.int32, device=device)
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device=device)
    scale = shape.head_dim ** -0.5
    report: dict[str, Any] = {"batch": batch, "context": context}
    for kernel in kernels:
        try:
            if kernel == "fa3":
                flash_attn_varlen_func, _ = _import_fa()
                out = flash_attn_varlen_func(q=query, k=key, v=value, cu_seqlens_q=cu_q, max_seqlen_q=1,
                                             seqused_k=seqused, max_seqlen_k=context, softmax_scale=scale,
                                             causal=True, block_table=table, fa_version=3)
            elif kernel == "triton":
                from vllm.v1.attention.ops.triton_unified_attention import (
                    unified_attention,
                )

                out = torch.empty_like(query)
                ones = torch.ones(1, dtype=torch.float32, device=device).expand(batch, shape.num_kv_heads)
                unified_attention(q=query, k=key, v=value, out=out, cu_seqlens_q=cu_q, max_seqlen_q=1,
                                  seqused_k=seqused, max_seqlen_k=context, softmax_scale=scale,
                                  causal=True, window_size=(-1, -1), block_table=table, softcap=0,
                                  q_descale=None, k_descale=ones, v_descale=ones)
            elif kernel == "treekv":
                from kvfold.attention_backends.treekv.kernels import decode_attention

                slots = torch.arange(context, device=device)
                entries = (table[:, slots // shape.block_size] * shape.block_size
                           + slots % shape.block_size)
                entries = entries[:, None, :].expand(-1, shape.num_kv_heads, -1).contiguous()
                # TreeKV's view of the same cache: [blocks, Hk, block_size, D], strided
                k, v = cache[..., : shape.head_dim], cache[..., shape.head_dim:]
                out, probs = decode_attention(query, k, v, entries.to(torch.int32),
                                              torch.full((batch,), context, dtype=torch.int32,
                                                         device=device), scale)
                report["treekv_probs_sum_max_dev"] = float((probs.sum(-1) - 1).abs().max())
            else:
                continue
            _sync(device)
            report[kernel] = {"max_abs_err": float((out.float() - ref).abs().max()),
                              "ref_max_abs": float(ref.abs().max())}
        except Exception as exc:  # noqa: BLE001 (one kernel's failure is a result, not the end)
            report[kernel] = {"error": f"{exc!r}"[:400]}
    return report


# ----------------------------------------------------------------------------------------------
# Driver


def parse_ints(text: str) -> list[int]:
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        if item:
            out.append(int(float(item[:-1]) * 1024) if item.endswith("k") else int(item))
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.1-8b", choices=model_names(),
                   help="attention shape from benchmarks/models/NAME/config.json")
    p.add_argument("--num-heads", type=int, help="override the model's query heads")
    p.add_argument("--num-kv-heads", type=int, help="override the model's KV heads")
    p.add_argument("--head-dim", type=int, help="override the model's head dim")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kernels", default=",".join(KERNELS), help="comma-separated, run in this order")
    p.add_argument("--batches", default="1,4,16,64,256")
    p.add_argument("--contexts", default="2k,4k,16k,32k,128k",
                   help="dense kernels' context lengths (2k: the same tokens as TreeKV's 2048 budget)")
    p.add_argument("--budgets", default="2048,4096", help="TreeKV budgets (its context axis)")
    p.add_argument("--treekv-pool-factor", type=float, default=1.5,
                   help="slots a TreeKV request's blocks hold, per budget token (kept entries are "
                        "scattered among them)")
    p.add_argument("--max-kv-gb", type=float, default=60.0, help="skip sizes whose K+V exceed this")
    p.add_argument("--iters", type=int, default=20, help="graph replays per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--hbm-gib", type=float, default=4.0)
    p.add_argument("--no-graph", action="store_true", help="time eager calls, not a CUDA graph")
    p.add_argument("--no-check", action="store_true", help="skip the small correctness check")
    p.add_argument("--time-budget", type=float, default=None, help="seconds; later sizes are skipped")
    p.add_argument("--device", default="cuda", help="cuda (cpu only to test this script)")
    p.add_argument("--out", type=Path, help="default docs/benchmarks/kernels-DEVICE.json")
    return p.parse_args(argv)


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def save(run: KernelRun, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(run.model_dump_json(indent=2) + "\n")
    os.replace(tmp, path)


def plan(kernels: Sequence[str], batches: Sequence[int], contexts: Sequence[int],
         budgets: Sequence[int]) -> list[tuple[str, int, int]]:
    """(kernel, batch, context) in run order: kernel by kernel, so a kernel that breaks the CUDA
    context (fa3_fp8 last) cannot spoil the others' results."""
    points = []
    for kernel in kernels:
        for batch in batches:
            for context in (budgets if kernel == "treekv" else contexts):
                points.append((kernel, batch, context))
    return points


def build_layers(kernel: str, batch: int, context: int, layers: int, shape: Shape,
                 args: argparse.Namespace, device: torch.device
                 ) -> tuple[list[Callable[[], object]], int, int, dict]:
    """``layers`` independent caches (and calls) of one size; bytes and notes of one layer."""
    gen = torch.Generator(device=device).manual_seed(0)
    calls, required, extra, notes = [], 0, 0, {}
    for _ in range(layers):
        if kernel in ("fa3", "fa3_fp8"):
            call, required, extra, notes = build_fa3(shape, batch, context, device,
                                                     fp8=kernel == "fa3_fp8", gen=gen)
        elif kernel == "triton":
            call, required, extra, notes = build_triton(shape, batch, context, device, gen=gen)
        elif kernel == "treekv":
            call, required, extra, notes = build_treekv(shape, batch, context, device,
                                                        args.treekv_pool_factor, gen=gen)
        elif kernel == "vqkv":
            call, required, extra, notes = build_vqkv(shape, batch, context, device, gen=gen)
        elif kernel == "sdpa":
            call, required, extra, notes = build_sdpa(shape, batch, context, device, gen=gen)
        elif kernel == "fourier":
            call, required, extra, notes = build_fourier(shape, batch, context, device, gen=gen)
        else:
            raise ValueError(f"unknown kernel {kernel!r}")
        calls.append(call)
    return calls, required, extra, notes


def measure_one(kernel: str, batch: int, context: int, shape: Shape, args: argparse.Namespace,
                device: torch.device, hbm_gbps: float | None) -> Measurement:
    m = Measurement(kernel=kernel, batch=batch, context=context, status="failed")
    elem = 1 if kernel == "fa3_fp8" else 2
    per_layer = shape.kv_bytes(batch * context, elem)
    if kernel == "treekv":
        per_layer = math.ceil(per_layer * args.treekv_pool_factor)
    if kernel == "vqkv":  # one-byte codes instead of 2 x head_dim bf16 values
        codes = 2 * VQKV_STAGES[0] + VQKV_VALUE_GROUPS * VQKV_STAGES[1]
        per_layer = math.ceil(per_layer * codes / (4 * shape.head_dim))
    if kernel == "fourier":
        if context <= FOURIER["sink"] + FOURIER["recent"] + 2 * FOURIER["freqs"]:
            m.status, m.reason = "skipped", "nothing compressed at this context"
            return m
        per_layer = batch * fourier_layout(shape).bytes_per_request(context)
    if per_layer > args.max_kv_gb * 1e9:
        m.status, m.reason = "skipped", f"K+V {per_layer / 1e9:.1f} GB > --max-kv-gb {args.max_kv_gb}"
        return m
    layers = max(1, min(MAX_LAYERS, math.ceil(ROTATE_TARGET_BYTES / max(per_layer, 1))))
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()  # the previous size's blocks, still cached, count as used
        free, _ = torch.cuda.mem_get_info(device)
        if layers * per_layer * 1.1 + 2**30 > free:
            m.status = "skipped"
            m.reason = f"K+V {layers * per_layer / 1e9:.1f} GB > free {free / 1e9:.1f} GB"
            return m
    try:
        calls, required, extra, notes = build_layers(kernel, batch, context, layers, shape, args, device)
        times, mode, note = time_calls(calls, device, args.iters, args.repeats,
                                       # fourier's step syncs with the host: never capturable
                                       use_graph=not args.no_graph and kernel != "fourier")
    except ImportError as exc:
        m.status, m.reason = "unavailable", f"{exc!r}"[:300]
        return m
    except Exception as exc:  # noqa: BLE001 (recorded; the next size still runs)
        m.reason = "".join(traceback.format_exception_only(exc)).strip()[-600:]
        return m
    finally:
        calls = []  # the caches go with the calls' closures
    m.status, m.layers, m.timing, m.repeats = "ok", layers, mode, [round(t, 3) for t in times]
    m.time_us, m.time_us_min = statistics.median(times), min(times)
    m.bytes_required, m.bytes_extra_estimate, m.notes = required, extra, notes
    if note:
        m.notes["timing"] = note
    m.achieved_gbps = required / m.time_us / 1e3
    if hbm_gbps:
        m.pct_of_hbm_copy = 100 * m.achieved_gbps / hbm_gbps
    return m


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --device cpu only to test the script)")
    config = load_config(args.model)
    shape = Shape(
        num_heads=args.num_heads or config["num_attention_heads"],
        num_kv_heads=args.num_kv_heads or config["num_key_value_heads"],
        head_dim=args.head_dim or config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
        block_size=args.block_size,
    )
    kernels = [k for k in args.kernels.split(",") if k]
    unknown = set(kernels) - set(KERNELS)
    if unknown:
        raise SystemExit(f"unknown kernels {sorted(unknown)}; known: {KERNELS}")
    environment = env_info.collect(torch_in_subprocess=False)
    environment["torch"] = torch.__version__
    if device.type == "cuda":
        environment["device"] = torch.cuda.get_device_name(device)
        environment["capability"] = list(torch.cuda.get_device_capability(device))
        environment["sm_count"] = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        environment["device"] = "cpu"
    out = args.out or REPO / "docs" / "benchmarks" / f"kernels-{device_slug(environment['device'])}.json"
    run = KernelRun(date=time.strftime("%Y-%m-%dT%H:%M:%S%z"), command=[sys.executable, *sys.argv],
                    environment=environment, model=args.model,
                    shape={"num_heads": shape.num_heads, "num_kv_heads": shape.num_kv_heads,
                           "head_dim": shape.head_dim, "block_size": shape.block_size})

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:7.1f}s] {message}", flush=True)

    def persist() -> None:
        run.elapsed_s = round(time.monotonic() - started, 1)
        save(run, out)

    log(f"{environment['device']}, shape {run.shape}, kernels {kernels} -> {out}")
    hbm_gbps = None
    try:
        run.hbm = measure_hbm(device, args.hbm_gib, repeats=max(args.repeats, 5))
        hbm_gbps = run.hbm["copy_gbps"]
        log(f"HBM: copy {run.hbm['copy_gbps']:.0f} GB/s, read {run.hbm['read_gbps']:.0f} GB/s")
    except Exception as exc:  # noqa: BLE001 (recorded; the kernels still run)
        run.hbm = {"error": f"{exc!r}"[:400]}
    persist()
    if not args.no_check:
        # vqkv and fourier are checked against their references by tests/gpu/check_cuda.py
        run.check = check_kernels(shape, [k for k in kernels if k not in ("fa3_fp8", "vqkv", "fourier", "sdpa")],
                                  device)
        log(f"check: {json.dumps(run.check)}")
        persist()
    points = plan(kernels, parse_ints(args.batches), parse_ints(args.contexts), parse_ints(args.budgets))
    # One line per measurement, "[i/N]" for progress (a log file, not a terminal: no progress bar).
    for i, (kernel, batch, context) in enumerate(points, 1):
        if args.time_budget is not None and time.monotonic() - started > args.time_budget:
            run.measurements.append(Measurement(kernel=kernel, batch=batch, context=context,
                                                status="skipped", reason="time budget spent"))
            continue
        m = measure_one(kernel, batch, context, shape, args, device, hbm_gbps)
        run.measurements.append(m)
        persist()
        head = f"[{i}/{len(points)}] {kernel:8s} batch {batch:4d} context {context:6d}"
        if m.status == "ok":
            log(f"{head}: {m.time_us:9.1f} us, "
                f"{m.achieved_gbps:7.0f} GB/s ({m.pct_of_hbm_copy or 0:5.1f}% of copy), {m.timing}")
        else:
            log(f"{head}: {m.status}: {m.reason}")
    persist()
    return 0


if __name__ == "__main__":
    sys.exit(main())
