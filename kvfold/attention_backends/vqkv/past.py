"""A prefill chunk's past in Triton: one request's cached tokens written as model-dtype K/V, ready
for flash attention.

A chunk of a long prompt attends to every earlier token of its request. The torch path
(:func:`read_past`: gather the cells, :func:`rebuild.rebuild` in float32, patch in the exact
ring tokens, concatenate with the chunk, convert) made ~10 full-size float32 temporaries: 4 ms per
layer for a 16k-token past at 8B shape on an H100, so prefill set VQKV's served latency. Here one
program per (tile of positions, KV head) reads the tile's codes once, sums each part's stage
codewords (L2-resident codebooks) in registers, takes the ring's exact bytes for sink and recent
positions instead, and stores the result straight into the caller's K/V buffer, where the chunk's
own K/V follow. Two launches per chunk (keys, then values); the buffer is the only temporary
(2 x model-dtype bytes per element instead of ~64).

A *part* is a key branch or a value group: ``stages`` consecutive codes over a set of ``width``
dims. Parts of one kind share stages and width (value groups must, key branches do), so a tile's
stage ``s`` is one gather ``[BLOCK_T, parts, width]`` from the stacked codebook
``[parts * stages, 256, width]``, and the sum is scattered to its dims on the store.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton.language as tl

from kvfold.attention_backends.vqkv.kernels import _once, _pow2
from kvfold.attention_backends.vqkv.pages import PageLayout, read_cells
from kvfold.attention_backends.vqkv.rebuild import rebuild
from kvfold.attention_backends.vqkv.reference import CODEBOOK_SIZE, LayerCodebooks, ResidualCodebook

BLOCK_T = 64  # positions per program: [64, parts, width] float32 is 64 registers a thread at 4 warps
NUM_WARPS = 4
# The stacked codewords in the model's 16-bit type (sums stay float32): half the L2 gather bytes, at
# one more rounding of each codeword. Off: the rebuild equals read_past's float32 sums rounded once.
BOOK_16BIT = False


def _rebuild_past(
    Cache, Row, Book, Dims, Out,  # noqa: N803 (Triton pointer arguments)
    computed, recent_from,
    stride_cb, stride_ch, stride_cs, stride_ot, stride_oh,
    CODE0: tl.constexpr, PARTS: tl.constexpr, BLOCK_P: tl.constexpr,  # noqa: N803
    STAGES: tl.constexpr, WIDTH: tl.constexpr, BLOCK_W: tl.constexpr,  # noqa: N803
    RESERVED: tl.constexpr, PAGE: tl.constexpr, CELL: tl.constexpr,  # noqa: N803
    PER_ENTRY: tl.constexpr, SINK: tl.constexpr, RECENT: tl.constexpr,  # noqa: N803
    OFFSET: tl.constexpr, SIZE: tl.constexpr, BOOK: tl.constexpr, BLOCK_T: tl.constexpr,  # noqa: N803
    VEC: tl.constexpr,  # noqa: N803
):
    h = tl.program_id(1)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < computed
    offs_p = tl.arange(0, BLOCK_P)
    offs_w = tl.arange(0, BLOCK_W)
    mask_pw = (offs_p < PARTS)[:, None] & (offs_w < WIDTH)[None, :]
    dims = tl.load(Dims + offs_p[:, None] * BLOCK_W + offs_w[None, :], mask=mask_pw, other=0)  # [P, W]
    if VEC > 1:  # runs of VEC consecutive dims starting at multiples of VEC: vector stores
        dims = tl.max_contiguous(tl.multiple_of(dims, [1, VEC]), [1, VEC])
    head_cells = Cache + h * stride_ch

    block = tl.load(Row + RESERVED + offs_t // PAGE, mask=mask_t, other=0).to(tl.int64)
    cells = head_cells + block * stride_cb + (offs_t % PAGE) * stride_cs  # [T] uint8*
    acc = tl.full([BLOCK_T, BLOCK_P, BLOCK_W], 0.0, tl.float32)
    mask_tp = mask_t[:, None] & (offs_p < PARTS)[None, :]
    for s in tl.static_range(STAGES):
        code = tl.load(cells[:, None] + CODE0 + offs_p[None, :] * STAGES + s, mask=mask_tp, other=0)
        rows = (offs_p[None, :] * STAGES + s) * BOOK + code.to(tl.int32)  # [T, P]
        acc += tl.load(Book + rows[:, :, None] * BLOCK_W + offs_w[None, None, :],
                       mask=mask_tp[:, :, None] & mask_pw[None, :, :], other=0.0).to(tl.float32)

    dtype = Out.dtype.element_ty  # the ring's dtype (``usable``)
    result = acc
    t0 = tl.program_id(0) * BLOCK_T
    if (t0 < SINK) | (t0 + BLOCK_T > recent_from):  # most tiles hold no exact position
        # Sink and recent positions: the ring's exact bytes (pages.PageLayout.pack_exact's order).
        exact = mask_t & ((offs_t < SINK) | (offs_t >= recent_from))
        if RECENT > 0:
            entry = tl.where(offs_t < SINK, offs_t, SINK + (offs_t - SINK) % RECENT)
        else:
            entry = offs_t
        mask_e = exact[:, None, None] & mask_pw[None, :, :]
        nbytes = (OFFSET + dims[None, :, :]) * SIZE
        ring_cells = entry[:, None, None] * PER_ENTRY + nbytes // CELL
        ring_blocks = tl.load(Row + ring_cells // PAGE, mask=mask_e, other=0).to(tl.int64)
        ptrs = head_cells + ring_blocks * stride_cb + (ring_cells % PAGE) * stride_cs + nbytes % CELL
        exact_values = tl.load(ptrs.to(tl.pointer_type(dtype)), mask=mask_e, other=0.0)
        result = tl.where(mask_e, exact_values.to(tl.float32), acc)
    out = Out + offs_t[:, None, None].to(tl.int64) * stride_ot + h * stride_oh + dims[None, :, :]
    tl.store(out, result.to(dtype), mask=mask_t[:, None, None] & mask_pw[None, :, :])


_jitted: dict[bool, Any] = {}


def _kernel() -> Any:
    import triton

    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if interpret not in _jitted:
        _jitted[interpret] = triton.jit(_rebuild_past)
    return _jitted[interpret]


def stacked_parts(parts: list[ResidualCodebook], device: torch.device, dtype: torch.dtype = torch.float32
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codewords [parts * stages, 256, BLOCK_W], dims [parts, BLOCK_W])`` in ``dtype`` / int32,
    the width padded to a power of two with zeros, converted once per layer."""
    stages, width = parts[0].stages, parts[0].dims.numel()
    if any(p.stages != stages or p.dims.numel() != width for p in parts):
        raise ValueError("VQKV's prefill kernel needs parts (key branches, value groups) of equal width "
                         f"and stage count, got {[(p.dims.numel(), p.stages) for p in parts]}")
    block_w = _pow2(width)

    def book() -> torch.Tensor:
        words = torch.cat([p.codewords.to(device, torch.float32) for p in parts]).to(dtype)
        return torch.nn.functional.pad(words, (0, block_w - width)).contiguous()

    def dims() -> torch.Tensor:
        stacked = torch.stack([p.dims.to(device, torch.int32) for p in parts])
        return torch.nn.functional.pad(stacked, (0, block_w - width)).contiguous()

    sources = tuple(p.codewords for p in parts) + tuple(p.dims for p in parts)
    return (_once(sources, device, dtype, book, tag="past.book"),
            _once(sources, device, torch.int32, dims, tag="past.dims"))


def vector_width(dims: torch.Tensor, limit: int = 8) -> int:
    """The largest power of two ``v <= limit`` such that every row of ``dims [parts, width]`` is runs
    of ``v`` consecutive dims, each starting at a multiple of ``v`` (1 for shuffled dims)."""
    dims = dims.cpu().long()
    v = limit
    while v > 1:
        runs = dims.view(dims.shape[0], -1, v) if dims.shape[1] % v == 0 else None
        if runs is not None and bool((runs[..., 0] % v == 0).all()) and bool(
                (runs - runs[..., :1] == torch.arange(v)).all()):
            return v
        v //= 2
    return 1


def usable(cache: torch.Tensor, layout: PageLayout, dtype: torch.dtype) -> bool:
    """Whether the ring's elements can be read as ``dtype`` straight from ``cache``'s bytes
    (:func:`ring.usable`'s conditions)."""
    size = layout.dtype.itemsize
    return (dtype == layout.dtype and cache.stride(-1) == 1 and layout.num_codes % size == 0
            and all(cache.stride(i) % size == 0 for i in range(3)) and cache.data_ptr() % size == 0)


def past_into(
    cache: torch.Tensor,
    row: torch.Tensor,
    computed: int,
    layout: PageLayout,
    books: LayerCodebooks,
    key_out: torch.Tensor,
    value_out: torch.Tensor,
) -> None:
    """Writes positions ``[0, computed)`` of the request with block-table ``row`` into
    ``key_out [>= computed, Hk, D]`` / ``value_out [>= computed, Hk, Dv]`` (the layout's dtype):
    what :func:`read_past` returns, rounded to that dtype. Needs :func:`usable`."""
    if computed <= 0:
        return
    num_kv_heads = cache.shape[1]
    recent_from = min(max(computed - layout.recent, layout.sink), computed)
    row = row if row.stride(-1) == 1 else row.contiguous()
    code0 = 0
    for parts, out, offset in ((books.key, key_out, 0), (books.value, value_out, layout.head_size)):
        if out.stride(-1) != 1:
            raise ValueError("past_into writes rows with contiguous head dims")
        book_dtype = out.dtype if BOOK_16BIT and out.dtype.itemsize == 2 else torch.float32
        book, dims = stacked_parts(parts, cache.device, book_dtype)
        stages, width = parts[0].stages, parts[0].dims.numel()
        vec = _once(tuple(p.dims for p in parts), torch.device("cpu"), torch.int8,
                    lambda: torch.tensor(vector_width(torch.stack([p.dims.cpu() for p in parts]))),
                    tag="past.vec")
        _kernel()[(-(-computed // BLOCK_T), num_kv_heads)](
            cache, row, book, dims, out,
            computed, recent_from,
            cache.stride(0), cache.stride(1), cache.stride(2), out.stride(0), out.stride(1),
            CODE0=code0, PARTS=len(parts), BLOCK_P=_pow2(len(parts)), STAGES=stages, WIDTH=width,
            BLOCK_W=dims.shape[1], RESERVED=layout.reserved_blocks, PAGE=cache.shape[2],
            CELL=layout.num_codes, PER_ENTRY=layout.cells_per_entry, SINK=layout.sink,
            RECENT=layout.recent, OFFSET=offset, SIZE=layout.dtype.itemsize, BOOK=CODEBOOK_SIZE,
            BLOCK_T=BLOCK_T, VEC=int(vec), num_warps=NUM_WARPS,
        )
        code0 += len(parts) * stages


def read_past(
    cache: torch.Tensor, row: torch.Tensor, computed: int, layout: PageLayout, books: LayerCodebooks
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 K/V ``[computed, H, D]`` a step of one request sees for its cached tokens: the torch
    path (CPU, and caches :func:`usable` refuses), and :func:`past_into`'s specification."""
    positions = torch.arange(computed, device=cache.device)
    rows = row.expand(computed, -1)
    blocks, slots = layout.code_cells(rows, positions)
    key, value = rebuild(read_cells(cache, blocks, slots)[..., : layout.num_codes], books)
    # Exact positions from host ints: a boolean index of a device tensor would sync every layer.
    recent_from = min(max(computed - layout.recent, layout.sink), computed)
    exact = torch.cat([torch.arange(min(layout.sink, computed)), torch.arange(recent_from, computed)])
    if exact.numel():
        exact = exact.to(cache.device)
        blocks, slots = layout.ring_cells(row.expand(exact.numel(), -1), layout.ring_index(exact))
        exact_k, exact_v = layout.unpack_exact(read_cells(cache, blocks, slots))
        key[exact], value[exact] = exact_k.float(), exact_v.float()
    return key, value
