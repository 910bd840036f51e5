"""The exact tokens (sink, recent ring, the new token) in Triton: decode attention over them, and
the write of a step's kept tokens into the ring.

A request's exact tokens live in its reserved blocks (``pages.PageLayout``): entry ``e`` of the ring
is the model-dtype bytes of its key then its value, spread over ``cells_per_entry`` cells from cell
``e * cells_per_entry`` on. The specification (``decode.decode_step``'s torch path) gathers those
cells, unpacks them and attends in float32 torch: at 64 requests of 8B shape about 2 ms of copies
and gathers per layer, half as long as the kernel over all the codes. Here one program per
(request, KV head) reads the ring entries straight from the cells, adds the step's own token (not
written yet), and leaves its unnormalised partial ``(acc, max, sum)`` as one more split of the
coded kernel's output, so the split merge yields the whole step's attention.

Ring entry ``e`` holds a real token when ``e < sink`` and ``e < computed``, or ``e >= sink`` and
``e - sink < min(recent, computed - sink)`` (the ring fills from entry ``sink`` on and wraps only
once it is full); every other entry is masked. Scores are base 2 (``scale * log2(e)``), as in the
coded kernel.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton.language as tl

from kvfold.attention_backends.vqkv.pages import PageLayout

# From a sweep on an H100 (8B shape, 512 exact tokens, batch 1 to 128): 128-entry tiles and 8 warps.
BLOCK_E = 128  # ring entries per tile
NUM_WARPS = 8
# Programs per (request, KV head), each a range of the ring: one program looping over 512 entries was
# latency-bound (0.74 ms at 128 requests, ~360 GB/s).
RING_SPLITS = 4


def _exact_ring(
    Query, NewK, NewV, Cache, BlockTable, SeqLens,  # noqa: N803 (Triton pointer arguments)
    OutPart, MPart, LPart,  # noqa: N803
    split, qk_scale,
    stride_qr, stride_qh, stride_kr, stride_kh, stride_vr, stride_vh,
    stride_cb, stride_ch, stride_cs,
    stride_br,
    stride_or, stride_oh, stride_os,
    stride_mr, stride_mh,
    PAGE: tl.constexpr, CELL: tl.constexpr, PER_ENTRY: tl.constexpr,  # noqa: N803
    SINK: tl.constexpr, RECENT: tl.constexpr, PER_SPLIT: tl.constexpr,  # noqa: N803
    G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,  # noqa: N803
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_E: tl.constexpr,  # noqa: N803
    SIZE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,  # noqa: N803
):
    r = tl.program_id(0)
    h = tl.program_id(1)
    part = tl.program_id(2)  # entries [part * PER_SPLIT, (part + 1) * PER_SPLIT); part 0 adds the new token
    split += part
    dtype = Query.dtype.element_ty  # the ring's dtype too (``usable``)
    computed = tl.load(SeqLens + r).to(tl.int32) - 1
    held = tl.minimum(RECENT, tl.maximum(computed - SINK, 0))

    offs_g = tl.arange(0, BLOCK_G)
    mask_g = offs_g < G
    heads = h * G + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_dv = offs_dv < DV
    q = tl.load(Query + r * stride_qr + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_g[:, None] & mask_d[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    # Byte offsets of a key's and a value's elements inside an entry, as (cell, byte in cell).
    key_bytes = offs_d * SIZE
    value_bytes = (D + offs_dv) * SIZE
    row = BlockTable + r * stride_br
    head_cells = Cache + h * stride_ch

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_G], 0.0, tl.float32)
    acc = tl.full([BLOCK_G, BLOCK_DV], 0.0, tl.float32)
    e_end = tl.minimum((part + 1) * PER_SPLIT, SINK + RECENT)
    for e0 in range(part * PER_SPLIT, e_end, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        real = ((offs_e < SINK) & (offs_e < computed)) | ((offs_e >= SINK) & (offs_e - SINK < held))
        real = real & (offs_e < e_end)
        first = offs_e * PER_ENTRY  # first cell of each entry

        k_cells = first[:, None] + key_bytes[None, :] // CELL
        k_blocks = tl.load(row + k_cells // PAGE, mask=real[:, None] & mask_d[None, :], other=0).to(tl.int64)
        k_ptrs = head_cells + k_blocks * stride_cb + (k_cells % PAGE) * stride_cs + key_bytes[None, :] % CELL
        k = tl.load(k_ptrs.to(tl.pointer_type(dtype)), mask=real[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        scores = tl.where(real[None, :], scores, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile and history with no entry
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)

        v_cells = first[:, None] + value_bytes[None, :] // CELL
        v_blocks = tl.load(row + v_cells // PAGE, mask=real[:, None] & mask_dv[None, :], other=0).to(tl.int64)
        v_ptrs = head_cells + v_blocks * stride_cb + (v_cells % PAGE) * stride_cs + value_bytes[None, :] % CELL
        v = tl.load(v_ptrs.to(tl.pointer_type(dtype)), mask=real[:, None] & mask_dv[None, :], other=0.0)
        if UPCAST:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision=PRECISION)
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(dtype), v, input_precision=PRECISION)
        m_i = m_new

    # The step's own token, in part 0: always real, so the request's softmax is never empty (other
    # parts may be: m = -inf, sum 0, which the merge weighs 0).
    k_new = tl.load(NewK + r * stride_kr + h * stride_kh + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    v_new = tl.load(NewV + r * stride_vr + h * stride_vh + offs_dv, mask=mask_dv, other=0.0).to(tl.float32)
    score = tl.sum(q.to(tl.float32) * k_new[None, :], 1) * qk_scale
    score = tl.where(part == 0, score, float("-inf"))
    m_new = tl.maximum(m_i, score)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p_new = tl.exp2(score - m_safe)
    l_i = l_i * alpha + p_new
    acc = acc * alpha[:, None] + p_new[:, None] * v_new[None, :]

    out_rows = OutPart + r * stride_or + heads[:, None] * stride_oh + split * stride_os
    tl.store(out_rows + offs_dv[None, :], acc, mask=mask_g[:, None] & mask_dv[None, :])
    ml = r * stride_mr + heads * stride_mh + split
    tl.store(MPart + ml, m_new, mask=mask_g)
    tl.store(LPart + ml, l_i, mask=mask_g)


def _write_ring(
    Key, Value, Kept, Request, Positions, Table, Cache,  # noqa: N803 (Triton pointer arguments)
    stride_kt, stride_kh, stride_vt, stride_vh, stride_tab,
    stride_cb, stride_ch, stride_cs,
    PAGE: tl.constexpr, CELL: tl.constexpr, PER_ENTRY: tl.constexpr,  # noqa: N803
    SINK: tl.constexpr, RECENT: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,  # noqa: N803
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, SIZE: tl.constexpr,  # noqa: N803
):
    """Copies kept token ``Kept[i]``'s key and value (head ``program_id(1)``) into its ring entry."""
    t = tl.load(Kept + tl.program_id(0)).to(tl.int64)
    h = tl.program_id(1)
    row = Table + tl.load(Request + t).to(tl.int64) * stride_tab
    p = tl.load(Positions + t).to(tl.int64)
    # Only positions the ring keeps (a decode step's new token always is, unless RECENT is 0) and no
    # negative ones (the filler of a batch padded for a CUDA graph), so callers may pass every token.
    if RECENT > 0:
        entry = tl.where(p < SINK, p, SINK + (p - SINK) % RECENT)
        keep = p >= 0
    else:
        entry = p
        keep = (p >= 0) & (p < SINK)
    dtype = Key.dtype.element_ty
    head_cells = Cache + h * stride_ch
    # The key's bytes first, then the value's (pack_exact's order).
    # An integer bound rather than `& keep`: Triton's interpreter rejects a scalar-and-tensor mask.
    offs = tl.arange(0, BLOCK_D)
    mask = offs < tl.where(keep, D, 0)
    nbytes = offs * SIZE
    cells = entry * PER_ENTRY + nbytes // CELL
    blocks = tl.load(row + cells // PAGE, mask=mask, other=0).to(tl.int64)
    target = head_cells + blocks * stride_cb + (cells % PAGE) * stride_cs + nbytes % CELL
    tl.store(target.to(tl.pointer_type(dtype)), tl.load(Key + t * stride_kt + h * stride_kh + offs, mask=mask),
             mask=mask)
    offs = tl.arange(0, BLOCK_DV)
    mask = offs < tl.where(keep, DV, 0)
    nbytes = (D + offs) * SIZE
    cells = entry * PER_ENTRY + nbytes // CELL
    blocks = tl.load(row + cells // PAGE, mask=mask, other=0).to(tl.int64)
    target = head_cells + blocks * stride_cb + (cells % PAGE) * stride_cs + nbytes % CELL
    tl.store(target.to(tl.pointer_type(dtype)), tl.load(Value + t * stride_vt + h * stride_vh + offs, mask=mask),
             mask=mask)


_jitted: dict[tuple[str, bool], Any] = {}


def _kernel(name: str = "attend") -> Any:
    import triton

    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if (name, interpret) not in _jitted:
        _jitted[name, interpret] = triton.jit(_exact_ring if name == "attend" else _write_ring)
    return _jitted[name, interpret]


def write_ring(cache: torch.Tensor, table: torch.Tensor, request: torch.Tensor, positions: torch.Tensor,
               kept: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: PageLayout) -> None:
    """``key``/``value [T, Hk, D]`` of the step's tokens ``kept`` (indices the ring keeps) into their
    ring entries (``PageLayout.ring_index``) in the reserved blocks of ``table[request[t]]``: what
    ``pack_exact`` and ``write_cells`` do, in one launch. Tokens the ring does not keep and tokens at
    negative positions are skipped. Needs :func:`usable` (with ``key``)."""
    if kept.numel() == 0 or layout.ring_entries == 0:
        return
    num_kv_heads = key.shape[1]
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    pow2 = lambda x: 1 << max(int(x) - 1, 0).bit_length()  # noqa: E731
    _kernel("write")[(kept.numel(), num_kv_heads)](
        key, value, kept, request, positions, table, cache,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1), table.stride(0),
        cache.stride(0), cache.stride(1), cache.stride(2),
        PAGE=cache.shape[2], CELL=layout.num_codes, PER_ENTRY=layout.cells_per_entry,
        SINK=layout.sink, RECENT=layout.recent, D=layout.head_size, DV=layout.head_size_v,
        BLOCK_D=max(16, pow2(layout.head_size)), BLOCK_DV=max(16, pow2(layout.head_size_v)),
        SIZE=layout.dtype.itemsize,
    )


def usable(query: torch.Tensor, cache: torch.Tensor, layout: PageLayout) -> bool:
    """Whether the kernel may read the ring's elements straight from ``cache``'s bytes: the query in
    the ring's dtype, every element aligned (even strides and cells for 16-bit types) and a cell's
    bytes contiguous. vLLM's pages always are; the tests' strided caches need not be."""
    size = layout.dtype.itemsize
    return (query.dtype == layout.dtype and cache.stride(-1) == 1 and layout.num_codes % size == 0
            and all(cache.stride(i) % size == 0 for i in range(3)) and cache.data_ptr() % size == 0)


def ring_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cache: torch.Tensor,
    rows: torch.Tensor,
    seq_lens: torch.Tensor,
    layout: PageLayout,
    scale: float,
    out_part: torch.Tensor,
    m_part: torch.Tensor,
    l_part: torch.Tensor,
    split: int,
) -> None:
    """Writes the exact tokens' partial attention of each request into splits ``split`` to
    ``split + RING_SPLITS - 1`` of
    ``out_part [R, Hq, S, Dv]`` / ``m_part``, ``l_part [R, Hq, S]`` (base-2 max and sum), for
    ``query [R, Hq, D]`` and the step's own ``key``/``value [R, Hk, D]``; ``seq_lens`` include it."""
    num_reqs, num_heads, head_size = query.shape
    num_kv_heads = key.shape[1]
    group = num_heads // num_kv_heads
    if query.stride(-1) != 1:
        query = query.contiguous()
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    pow2 = lambda x: 1 << max(int(x) - 1, 0).bit_length()  # noqa: E731
    per_split = -(-max(layout.ring_entries, 1) // RING_SPLITS)
    _kernel()[(num_reqs, num_kv_heads, RING_SPLITS)](
        query, key, value, cache, rows, seq_lens,
        out_part, m_part, l_part,
        split, scale * 1.4426950408889634,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        cache.stride(0), cache.stride(1), cache.stride(2),
        rows.stride(0),
        out_part.stride(0), out_part.stride(1), out_part.stride(2),
        m_part.stride(0), m_part.stride(1),
        PAGE=cache.shape[2], CELL=layout.num_codes, PER_ENTRY=layout.cells_per_entry,
        SINK=layout.sink, RECENT=layout.recent, PER_SPLIT=per_split,
        G=group, BLOCK_G=max(16, pow2(group)), D=head_size, DV=layout.head_size_v,
        BLOCK_D=max(16, pow2(head_size)), BLOCK_DV=max(16, pow2(layout.head_size_v)), BLOCK_E=BLOCK_E,
        SIZE=layout.dtype.itemsize, PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        UPCAST=not query.is_cuda, num_warps=NUM_WARPS,
    )
