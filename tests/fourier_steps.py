"""Drives FourierAttention's paged steps against the specification (no vLLM imports: the GPU check
runs it on a machine without vLLM).

The cache is laid out as vLLM 0.32 lays it out (every layer a view of one allocation, layer-major
or block-major), filled with garbage, and handed blocks by a small allocator that puts each
request's reserved blocks first. Two layers run on it at once, so a layer that stores its kept dims
or state in another layer's cells is caught if it clobbers anything. The requests cross every
phase: exact, first compression in prefill and in decode, rank-n and rank-1 updates, chunked
prefill, a single-token prefill.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvfold.attention_backends.fourier.arena import CacheArena
from kvfold.attention_backends.fourier.layout import FourierLayout
from kvfold.attention_backends.fourier.stream import FourierStream

# Chunks that compress in prefill then decode; a short prompt compressed during decode; a
# single-token prefill; one long prompt in a single step (exact prefill, then rank-1 updates).
PLANS = {0: [30, 25, 40] + [1] * 12, 1: [9] + [1] * 40, 2: [1] + [1] * 20, 3: [120] + [1] * 8}

# attend(arena, layer, query, key, value, block_table, requests, output); requests as in step.attend_step
Attend = Callable[[CacheArena, int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list, torch.Tensor], None]


def vllm_views(layout: FourierLayout, num_blocks: int, order: str, device: str) -> list[torch.Tensor]:
    """Per-layer ``[blocks, 1, block_size, cell]`` uint8 views of one garbage-filled allocation."""
    page, cell, bs = layout.page_bytes, layout.cell_bytes, layout.block_size
    raw = torch.randint(0, 256, (layout.num_layers * num_blocks * page,), dtype=torch.uint8, device=device)
    if order == "layer-major":
        return [torch.as_strided(raw, (num_blocks, 1, bs, cell), (page, page, cell, 1), layer * num_blocks * page)
                for layer in range(layout.num_layers)]
    stride = layout.num_layers * page  # block-major: a block's pages of all layers side by side
    return [torch.as_strided(raw, (num_blocks, 1, bs, cell), (stride, page, cell, 1), layer * page)
            for layer in range(layout.num_layers)]


def run_steps(layout: FourierLayout, attend: Attend, *, heads: int, window: int, scale: float,
              device: str, order: str = "layer-major", plans: dict[int, list[int]] = PLANS,
              num_blocks: int = 300, atol: float = 2e-4) -> dict[str, float]:
    """Every step's outputs of every layer must be the specification's; returns the largest errors."""
    dtype, head_size = layout.dtype, layout.head_size
    arena = CacheArena(vllm_views(layout, num_blocks, order, device), layout)
    free = list(range(1, num_blocks))  # block 0 is vLLM's null block
    tables: dict[int, list[int]] = {}
    g = torch.Generator().manual_seed(0)
    # A 16-bit cache stores K/V in its dtype: the data are rounded to it first, so the cache holds
    # them exactly and the specification sees the same numbers; queries stay float32.
    data = {r: [[torch.randn(sum(p), h, head_size, generator=g).to(dtype).float().to(device)
                 for h in (heads, layout.num_kv_heads, layout.num_kv_heads)]
                for _ in range(layout.num_layers)] for r, p in plans.items()}
    streams = {r: [FourierStream([d.to(device) for d in layout.compressed[i]["k"]],
                                 [d.to(device) for d in layout.compressed[i]["v"]], sink=layout.sink,
                                 recent=layout.recent, freqs=layout.freqs, window=window, scale=scale)
                   for i in range(layout.num_layers)] for r in plans}
    done = dict.fromkeys(plans, 0)
    worst = {"decode": 0.0, "prefill": 0.0}
    for step in range(max(len(p) for p in plans.values())):
        batch = [(r, plans[r][step]) for r in plans if step < len(plans[r])]
        rows, requests, start = [], [], 0
        for b, (r, n) in enumerate(batch):
            table = tables.setdefault(r, [])
            while len(table) < layout.reserved_blocks + -(-(done[r] + n) // layout.block_size):
                table.append(free.pop(0))
            rows.append(table)
            requests.append((b, start, start + n, done[r] + n))
            start += n
        width = max(len(t) for t in rows)
        block_table = torch.tensor([t + [0] * (width - len(t)) for t in rows], dtype=torch.int32, device=device)
        for index in range(layout.num_layers):
            q, k, v = (torch.cat([data[r][index][j][done[r] : done[r] + n] for r, n in batch]) for j in range(3))
            out = torch.full((start, heads, layout.head_size_v), float("nan"), device=device)
            attend(arena, index, q, k, v, block_table, requests, out)
            for (r, n), (_, first, end, _) in zip(batch, requests):
                expected = streams[r][index].step(*(t[done[r] : done[r] + n] for t in data[r][index]))
                got = out[first:end]
                torch.testing.assert_close(got, expected, atol=atol, rtol=atol,
                                           msg=lambda m: f"step {step} request {r} layer {index}: {m}")
                kind = "decode" if n == 1 else "prefill"
                worst[kind] = max(worst[kind], float((got - expected).abs().max()))
        for r, n in batch:
            done[r] += n
    if plans is PLANS:  # request 1's middle is first compressed in decode
        assert streams[1][0].compressed() and not streams[1][0].compressed(layout.sink + layout.recent + 9)
    threshold = layout.sink + layout.recent + 2 * layout.freqs
    assert all(s[0].compressed() for s in streams.values() if len(s[0]) > threshold)
    return worst
