"""VQKV decode attention straight from the paged code cache: no bf16 K/V is ever written to HBM.

A cached token is ``num_codes`` one-byte indices (key branch 0's stages, key branch 1's, then the
value's; ``reference.LayerCodebooks``). Two facts make attention over codes cheap:

* keys: ``q . k = sum_j q[dims(j)] . codeword_j[code_j]``, so one lookup table per query head,
  ``[key_codes, 256]`` (:func:`key_tables`, a few KiB, computed once per step; the kernel reads
  them in float16 for 16-bit models, :func:`table_dtype`), turns a token's score into
  ``key_codes`` gathers and adds. It is exact for the rotated keys vLLM hands
  the backend, since the codebooks quantize post-RoPE keys;
* values: a tile's values are rebuilt in registers as the sum of the value stages' codeword rows,
  gathered from the layer's value codebooks (``[groups * stages, 256, Dv / groups]``, L2-resident).
  With ``groups`` value groups each element of a value is the sum of only ``stages`` codewords'
  elements, so a rebuild reads ``groups`` times fewer codebook elements for the same code bytes.

:func:`decode_attention_torch` is the specification (gather, ``books.decode``, softmax);
:func:`decode_attention` runs the Triton kernel on CUDA, and on CPU under ``TRITON_INTERPRET=1``.
Each program takes one (request, KV head, split of the request's position range), scores the KV
head's whole query group at once (padded to 16 rows for ``tl.dot``) with an online softmax, and
writes its partial ``(acc, max, sum)``; a second small kernel merges the splits into the output
and its log-sum-exp, which the caller uses to merge the exact sink/recent tokens.

Cost: rebuilding values reads ``stages * Dv`` codebook elements from L2 per token and KV head
(4 KiB at one group of 16 stages, Dv 128, bf16), 8x the bytes dense bf16 K/V reads from HBM. On an
H100 the kernel runs at about 5 TB/s of such L2 reads, so with one value group it is ~4-6x slower
than dense bf16 decode attention (torch SDPA) at batch >= 16; more value groups cut those reads
(``docs/vqkv.md`` has the measurements). With the default 16 one-stage groups and float16 tables,
two thirds of the step are the key-table gathers and the code reads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import triton.language as tl

from kvfold.attention_backends.vqkv.pages import PageLayout
from kvfold.attention_backends.vqkv.reference import CODEBOOK_SIZE, LayerCodebooks
from kvfold.attention_backends.vqkv import ring as exact_ring

# Positions per tile and warps per program, from sweeps on an H100 (8B shape, 32k positions, value
# groups of 8 dims, heads-inner tables): 128 x 4 fastest at 32 and 64 requests (8 warps 7% slower);
# 64-position tiles 14% faster at 16 requests (more programs per request) but 8% slower at 64. The
# tile's rebuilt values are [BLOCK_N, Dv] float32 in registers, so wider heads get shorter tiles.
BLOCK_N = 128
SMALL_BATCH_BLOCK_N, SMALL_BATCH = 64, 128  # when requests x KV heads <= SMALL_BATCH
NUM_WARPS = 4
# Enough programs to fill an H100's 132 SMs about twice at small batch.
TARGET_PROGRAMS = 264
# Value groups > 1 (powers of two filling the head): a tile's values are gathered as
# [BLOCK_N, groups, dims per group], one code per (token, group) and each codeword row a contiguous,
# vectorized load, rather than one code and one element per (token, dim).
VECTOR_GATHER = True
# Scores are gathered for the group's real query heads only (rows padded to a power of two) and then
# widened to the BLOCK_G >= 16 rows tl.dot needs, rather than gathered for all BLOCK_G rows masked.
EXACT_KEY_ROWS = True
# The lookup tables laid out [R, Hk, key_codes, 256, query heads of the group] (heads padded to a
# power of two): a token's entries for the whole group are one contiguous, vectorized load per code.
# Needs EXACT_KEY_ROWS.
HEADS_INNER = True
LOG2E = 1.4426950408889634


def key_tables(query: torch.Tensor, books: LayerCodebooks) -> torch.Tensor:
    """ADC tables ``[R, Hq, key_codes, 256]`` float32 for ``query`` ``[R, Hq, D]``.

    ``table[r, h, j, s] = query[r, h, dims(j)] . codeword_j[s]`` where key code ``j`` is a stage of
    one branch (branch 0's stages first): a token's score is ``sum_j table[r, h, j, code_j]``.
    One matrix product with :func:`key_codebook_matrix`.
    """
    num_reqs, num_heads, head_size = query.shape
    matrix = key_codebook_matrix(books, query.device)
    return (query.reshape(-1, head_size).float() @ matrix).view(num_reqs, num_heads, books.key_codes, -1)


def gather_codes(cache: torch.Tensor, row: torch.Tensor, reserved_blocks: int, positions: torch.Tensor,
                 num_codes: int) -> torch.Tensor:
    """Codes ``[L, Hk, num_codes]`` of ``positions`` ``[L]`` for a request with block-table ``row``."""
    block_size = cache.shape[2]
    blocks = row[reserved_blocks + positions // block_size].long()
    return cache[blocks, :, positions % block_size, :num_codes]


def decode_attention_torch(
    query: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    reserved_blocks: int,
    starts: torch.Tensor,
    ends: torch.Tensor,
    books: LayerCodebooks,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query token per request over its code positions ``[starts[r], ends[r])``.

    ``query`` ``[R, Hq, D]``; ``cache`` uint8 ``[blocks, Hk, block_size, C >= num_codes]`` (strided
    views are fine); ``block_table`` ``[R, W]``, position ``p`` of request ``r`` in block
    ``block_table[r, reserved_blocks + p // block_size]``, slot ``p % block_size``. Returns float32
    ``(out [R, Hq, Dv], lse [R, Hq])``, the natural-log log-sum-exp of the scaled scores; an empty
    range gives ``out = 0`` and ``lse = -inf``.
    """
    num_reqs, num_heads, head_size = query.shape
    num_kv_heads = cache.shape[1]
    group = num_heads // num_kv_heads
    dev = query.device
    out = torch.zeros(num_reqs, num_heads, books.head_size_v, device=dev)
    lse = torch.full((num_reqs, num_heads), float("-inf"), device=dev)
    for r in range(num_reqs):
        start, end = int(starts[r]), int(ends[r])
        if end <= start:
            continue
        positions = torch.arange(start, end, device=cache.device)
        codes = gather_codes(cache, block_table[r].to(cache.device), reserved_blocks, positions, books.num_codes)
        key, value = books.decode(codes.to(dev))  # [L, Hk, D], [L, Hk, Dv]
        q = query[r].float().view(num_kv_heads, group, head_size)
        logits = torch.einsum("hgd,lhd->hgl", q, key) * scale
        lse[r] = torch.logsumexp(logits, -1).reshape(num_heads)
        probs = torch.softmax(logits, -1)
        out[r] = torch.einsum("hgl,lhd->hgd", probs, value).reshape(num_heads, -1)
    return out, lse


def _decode_split(
    Tables, Cache, BlockTable, Starts, Ends, VBook,  # noqa: N803 (Triton pointer arguments)
    OutPart, MPart, LPart,  # noqa: N803
    chunk, reserved,
    stride_tr, stride_th,
    stride_cb, stride_ch, stride_cs, stride_cc,
    stride_br,
    stride_or, stride_oh, stride_os,
    stride_mr, stride_mh,
    PAGE: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr,  # noqa: N803
    KC: tl.constexpr, VS: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr,  # noqa: N803
    VG: tl.constexpr, DG: tl.constexpr, VECTOR: tl.constexpr, GP: tl.constexpr,  # noqa: N803
    HEADS_INNER: tl.constexpr,  # noqa: N803
    BOOK: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,  # noqa: N803
    UPCAST: tl.constexpr,  # noqa: N803
):
    r = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    lo = tl.load(Starts + r)
    start = lo + split * chunk
    end = tl.minimum(start + chunk, tl.load(Ends + r))

    offs_g = tl.arange(0, BLOCK_G)
    mask_g = offs_g < G
    heads = h * G + offs_g
    # Table rows of the group's query heads; tables already carry scale * log2(e).
    tab_rows = Tables + r * stride_tr + heads[:, None] * stride_th  # [BLOCK_G, 1]
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_dv = offs_dv < DV

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_G], 0.0, tl.float32)
    acc = tl.full([BLOCK_G, BLOCK_DV], 0.0, tl.float32)
    row = BlockTable + r * stride_br + reserved
    head_cells = Cache + h * stride_ch
    for s0 in range(start, end, BLOCK_N):  # every tile holds at least one position of the range
        offs_n = s0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        block = tl.load(row + offs_n // PAGE, mask=mask_n, other=0).to(tl.int64)
        cells = head_cells + block * stride_cb + (offs_n % PAGE) * stride_cs  # [BLOCK_N] uint8*
        # The tile's cells come from HBM once (BLOCK_N * num_codes bytes); the per-code column
        # reads below hit L1, which is cheaper than extracting columns from a register tile.
        if HEADS_INNER:  # [BLOCK_N, GP] per code (padded heads' entries are 0), then widened
            offs_p = tl.arange(0, GP)
            group_tables = Tables + r * stride_tr + h * stride_th
            qk_t = tl.full([BLOCK_N, GP], 0.0, tl.float32)
            for j in range(KC):
                code = tl.load(cells + j * stride_cc, mask=mask_n, other=0).to(tl.int32)
                qk_t += tl.load(group_tables + (j * BOOK + code[:, None]) * GP + offs_p[None, :])
            qk_p = tl.trans(qk_t)
            if GP < BLOCK_G:
                qk = tl.full([BLOCK_G, BLOCK_N], 0.0, tl.float32)
                for i in tl.static_range(GP):
                    head_scores = tl.sum(tl.where(offs_p[:, None] == i, qk_p, 0.0), 0)
                    qk = tl.where(offs_g[:, None] == i, head_scores[None, :], qk)
            else:
                qk = qk_p
        elif GP < BLOCK_G:  # gather GP rows, then widen: padded rows stay 0 as masked loads give
            offs_p = tl.arange(0, GP)
            rows_p = Tables + r * stride_tr + (h * G + offs_p)[:, None] * stride_th
            qk_p = tl.full([GP, BLOCK_N], 0.0, tl.float32)
            for j in range(KC):
                code = tl.load(cells + j * stride_cc, mask=mask_n, other=0).to(tl.int32)
                qk_p += tl.load(rows_p + j * BOOK + code[None, :], mask=(offs_p < G)[:, None], other=0.0)
            qk = tl.full([BLOCK_G, BLOCK_N], 0.0, tl.float32)
            for i in tl.static_range(GP):
                head_scores = tl.sum(tl.where(offs_p[:, None] == i, qk_p, 0.0), 0)
                qk = tl.where(offs_g[:, None] == i, head_scores[None, :], qk)
        else:
            qk = tl.full([BLOCK_G, BLOCK_N], 0.0, tl.float32)
            for j in range(KC):
                code = tl.load(cells + j * stride_cc, mask=mask_n, other=0).to(tl.int32)
                qk += tl.load(tab_rows + j * BOOK + code[None, :], mask=mask_g[:, None], other=0.0)
        qk = tl.where(mask_n[None, :], qk, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)

        # Values of the tile, dequantized in registers: the sum of the stages' codeword rows
        # (rows past the range read codeword 0 and get p = 0). Value code (group g, stage s) is
        # column KC + g * VS + s of a cell; its codewords are VBook rows (g * VS + s) * BOOK + code.
        if VG == 1:
            values = tl.full([BLOCK_N, BLOCK_DV], 0.0, tl.float32)
            for s in range(VS):
                code = tl.load(cells + (KC + s) * stride_cc, mask=mask_n, other=0).to(tl.int32)
                rows = VBook + (s * BOOK + code[:, None]) * DV + offs_dv[None, :]
                values += tl.load(rows, mask=mask_dv[None, :], other=0.0).to(tl.float32)
        elif VECTOR and VS == 1:  # one codeword per (token, group): loaded in the book's dtype, no sum
            offs_vg = tl.arange(0, VG)
            offs_dg = tl.arange(0, DG)
            codes = tl.load(cells[:, None] + (KC + offs_vg[None, :]) * stride_cc,
                            mask=mask_n[:, None], other=0).to(tl.int32)  # [BLOCK_N, VG]
            firsts = (offs_vg[None, :] * BOOK + codes) * DG
            values = tl.reshape(tl.load(VBook + firsts[:, :, None] + offs_dg[None, None, :]), [BLOCK_N, BLOCK_DV])
        elif VECTOR:  # VG * DG == BLOCK_DV == DV, powers of two
            offs_vg = tl.arange(0, VG)
            offs_dg = tl.arange(0, DG)
            parts = tl.full([BLOCK_N, VG, DG], 0.0, tl.float32)
            for s in range(VS):
                codes = tl.load(cells[:, None] + (KC + offs_vg[None, :] * VS + s) * stride_cc,
                                mask=mask_n[:, None], other=0).to(tl.int32)  # [BLOCK_N, VG]
                firsts = ((offs_vg[None, :] * VS + s) * BOOK + codes) * DG
                parts += tl.load(VBook + firsts[:, :, None] + offs_dg[None, None, :]).to(tl.float32)
            values = tl.reshape(parts, [BLOCK_N, BLOCK_DV])
        else:
            values = tl.full([BLOCK_N, BLOCK_DV], 0.0, tl.float32)
            group = offs_dv // DG
            within = offs_dv % DG
            for s in range(VS):
                code = tl.load(cells[:, None] + (KC + group[None, :] * VS + s) * stride_cc,
                               mask=mask_n[:, None] & mask_dv[None, :], other=0).to(tl.int32)
                rows = VBook + ((group[None, :] * VS + s) * BOOK + code) * DG + within[None, :]
                values += tl.load(rows, mask=mask_dv[None, :], other=0.0).to(tl.float32)
        if UPCAST:
            pv = tl.dot(p, values.to(tl.float32), input_precision=PRECISION)
        else:  # the codebook's dtype: float32 (IEEE dot) or the model's 16-bit type (tensor cores)
            dt = VBook.dtype.element_ty
            pv = tl.dot(p.to(dt), values.to(dt), input_precision=PRECISION)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    out_rows = OutPart + r * stride_or + heads[:, None] * stride_oh + split * stride_os
    tl.store(out_rows + offs_dv[None, :], acc, mask=mask_g[:, None] & mask_dv[None, :])
    ml = r * stride_mr + heads * stride_mh + split
    tl.store(MPart + ml, m_i, mask=mask_g)
    tl.store(LPart + ml, l_i, mask=mask_g)


def _merge_splits(
    OutPart, MPart, LPart, Out, Lse,  # noqa: N803
    splits,
    stride_por, stride_poh, stride_pos,
    stride_mr, stride_mh,
    stride_or, stride_oh,
    stride_lr,
    DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK_S: tl.constexpr,  # noqa: N803
):
    r = tl.program_id(0)
    hq = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < splits
    ml = MPart + r * stride_mr + hq * stride_mh
    m_s = tl.load(ml + offs_s, mask=mask_s, other=float("-inf"))
    m = tl.max(m_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # all splits empty: every weight is 0
    l_s = tl.load(LPart + r * stride_mr + hq * stride_mh + offs_s, mask=mask_s, other=0.0)
    total = tl.sum(l_s * tl.exp2(m_s - m_safe), 0)

    offs_dv = tl.arange(0, BLOCK_DV)
    mask_dv = offs_dv < DV
    acc = tl.full([BLOCK_DV], 0.0, tl.float32)
    parts = OutPart + r * stride_por + hq * stride_poh
    for c0 in range(0, splits, CHUNK_S):
        offs_c = c0 + tl.arange(0, CHUNK_S)
        mask_c = offs_c < splits
        w = tl.exp2(tl.load(ml + offs_c, mask=mask_c, other=float("-inf")) - m_safe)
        part = tl.load(parts + offs_c[:, None] * stride_pos + offs_dv[None, :],
                       mask=mask_c[:, None] & mask_dv[None, :], other=0.0)
        acc += tl.sum(w[:, None] * part, 0)
    empty = total == 0.0
    out = acc / tl.where(empty, 1.0, total)
    tl.store(Out + r * stride_or + hq * stride_oh + offs_dv, out, mask=mask_dv)
    lse = tl.where(empty, float("-inf"), (m_safe + tl.log2(tl.where(empty, 1.0, total))) * 0.6931471805599453)
    tl.store(Lse + r * stride_lr + hq, lse)


@dataclass(frozen=True)
class RingInputs:
    """What the exact-token split needs: the step's own ``key``/``value [R, Hk, D]``, the requests'
    ``seq_lens`` (including that token) and the page layout."""

    key: torch.Tensor
    value: torch.Tensor
    seq_lens: torch.Tensor
    layout: PageLayout


_jitted: dict[bool, Any] = {}


def _kernels() -> Any:
    """The jitted kernels; built on first use so ``TRITON_INTERPRET`` set by then is honoured."""
    import triton

    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if interpret not in _jitted:
        _jitted[interpret] = (triton.jit(_decode_split), triton.jit(_merge_splits))
    return _jitted[interpret]


def triton_enabled(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pow2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


_converted: dict[tuple, tuple[tuple[torch.Tensor, ...], torch.Tensor]] = {}


def _once(sources: tuple[torch.Tensor, ...], device: torch.device, dtype: torch.dtype, make,
          tag: str = "") -> torch.Tensor:
    """``make()``, computed once per (codebook tensors and their versions, device, dtype, ``tag``);
    callers that derive different tensors of the same sources and dtype give each its own tag.

    Inference tensors (codebooks first moved to the device inside vLLM's forward) have no version
    counter, and cannot be changed in place outside inference mode: their id alone is the key."""
    key = (*((id(t), -1 if t.is_inference() else t._version) for t in sources), str(device), dtype, tag)
    hit = _converted.get(key)
    if hit is None:
        if len(_converted) > 4096:
            _converted.clear()
        hit = _converted[key] = (sources, make())  # keeps the sources alive: their ids stay unique
    return hit[1]


def key_codebook_matrix(books: LayerCodebooks, device: torch.device) -> torch.Tensor:
    """``[D, key_codes * 256]`` float32: column ``(j, s)`` is codeword ``s`` of key code ``j``,
    zero outside its branch's dims, so ``query @ matrix`` is every table at once."""

    def make() -> torch.Tensor:
        matrix = torch.zeros(books.head_size, books.key_codes, CODEBOOK_SIZE, device=device)
        start = 0
        for branch in books.key:
            words = branch.codewords.to(device, torch.float32)  # [stages, 256, len(dims)]
            matrix[branch.dims.to(device), start : start + branch.stages] = words.permute(2, 0, 1)
            start += branch.stages
        return matrix.view(books.head_size, -1)

    sources = tuple(branch.codewords for branch in books.key) + tuple(branch.dims for branch in books.key)
    return _once(sources, device, torch.float32, make)


def table_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The lookup tables' dtype: float16 for 16-bit models, float32 otherwise.

    Half-size tables double how many of the step's tables stay in L1/L2 next to the value
    codebooks: at 170 requests of 32k the kernel took 0.72x the time with them (H100). float16,
    not bfloat16: a table entry is a partial score, well inside its range, and its 11-bit mantissa
    rounds it ~8x finer than the bfloat16 keys a dense backend multiplies. Float32 models keep
    float32 tables, so their kernel still matches the specification to float32 rounding.
    """
    return torch.float32 if model_dtype == torch.float32 else torch.float16


def value_layout(books: LayerCodebooks) -> tuple[int, int, int]:
    """``(groups, stages per group, dims per group)`` of the kernel's value codebooks; its output
    columns are the groups' dims in turn (:func:`_output_order`)."""
    groups = books.value
    stages, width = groups[0].stages, groups[0].dims.numel()
    if any(g.stages != stages or g.dims.numel() != width for g in groups):
        raise ValueError("VQKV's kernel needs value groups of equal width and stage count, got "
                         f"{[(g.dims.numel(), g.stages) for g in groups]}")
    return len(groups), stages, width


def value_codebook(books: LayerCodebooks, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The value codewords ``[groups * stages, 256, Dv / groups]`` as the kernel reads them (group
    ``g``'s stage ``s`` at row ``g * stages + s``), converted once per layer.

    float32 for a float32 model; the model's 16-bit type otherwise: the tile's ``p @ V`` runs on
    tensor cores in that type, so the rebuilt values are rounded to it anyway, and 16-bit codewords
    halve the L2 traffic of the gathers, the kernel's largest (the stage sum stays float32).
    """
    sources = tuple(g.codewords for g in books.value)
    return _once(sources, device, dtype, lambda: torch.cat(sources).to(device, dtype).contiguous())


def _output_order(books: LayerCodebooks, device: torch.device) -> torch.Tensor | None:
    """Where the kernel's output columns go, or None when they already are in dim order (the
    groups ``kvfold calibrate`` writes). Decided once per layer (a host read of the dims), so a
    CUDA-graph capture after the first eager step does not sync."""

    def make() -> torch.Tensor:
        dims = torch.cat([g.dims.cpu() for g in books.value])
        ordered = torch.equal(dims, torch.arange(books.head_size_v))
        return dims[:0].to(device) if ordered else dims.to(device)

    order = _once(tuple(g.dims for g in books.value), device, torch.int64, make)
    return order if order.numel() else None


def block_n_for(head_size_v: int, num_reqs: int = 1 << 30, num_kv_heads: int = 1) -> int:
    tile = SMALL_BATCH_BLOCK_N if num_reqs * num_kv_heads <= SMALL_BATCH else BLOCK_N
    return min(tile, max(16, 16384 // _pow2(head_size_v)))


def num_splits_for(num_reqs: int, num_kv_heads: int, longest: int, block_n: int = BLOCK_N) -> tuple[int, int]:
    """``(splits, chunk)``: enough programs for the GPU, each a whole number of ``block_n`` tiles."""
    tiles = max(1, -(-longest // block_n))
    splits = min(tiles, max(1, -(-TARGET_PROGRAMS // max(1, num_reqs * num_kv_heads))))
    chunk = -(-tiles // splits) * block_n
    return max(1, -(-longest // chunk)), chunk


def decode_attention(
    query: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    reserved_blocks: int,
    starts: torch.Tensor,
    ends: torch.Tensor,
    books: LayerCodebooks,
    scale: float,
    *,
    longest: int | None = None,
    num_splits: int | None = None,
    ring: RingInputs | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`decode_attention_torch`, computed by the Triton kernel where Triton runs.

    ``longest`` (the largest ``ends - starts``, if the caller knows it on the host) saves a device
    sync; ``num_splits`` caps the split count chosen from it (splits are whole tiles). With
    ``ring``, the requests' exact tokens (``ring.ring_attention``) are one more split, so the
    result is the attention over the codes and the exact tokens together.
    """
    if not triton_enabled(query.device):
        return decode_attention_torch(query, cache, block_table, reserved_blocks, starts, ends, books, scale)
    num_reqs, num_heads, _ = query.shape
    _, num_kv_heads, block_size, width = cache.shape
    if cache.dtype != torch.uint8 or width < books.num_codes:
        raise ValueError(f"VQKV's kernel reads uint8 cells of >= {books.num_codes} codes, got "
                         f"{cache.dtype} {tuple(cache.shape)}")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads cannot share {num_kv_heads} KV heads")
    if any(g.codewords.shape[1] != CODEBOOK_SIZE for g in books.value):
        raise ValueError(f"VQKV's kernel needs {CODEBOOK_SIZE}-entry codebooks")
    groups, stages, width = value_layout(books)
    group = num_heads // num_kv_heads
    head_size_v = books.head_size_v
    dev = query.device
    starts = starts.to(dev, torch.int32)
    ends = ends.to(dev, torch.int32)
    if longest is None:
        longest = int((ends - starts).max()) if num_reqs else 0
    if num_reqs == 0 or (longest <= 0 and ring is None):
        empty = torch.full((num_reqs, num_heads), float("-inf"), device=dev)
        return torch.zeros(num_reqs, num_heads, head_size_v, device=dev), empty
    block_n = block_n_for(head_size_v, num_reqs, num_kv_heads)
    if longest <= 0:
        splits, chunk = 0, block_n
    elif num_splits is None:
        splits, chunk = num_splits_for(num_reqs, num_kv_heads, longest, block_n)
    else:
        chunk = -(-longest // max(1, num_splits))
        chunk = -(-chunk // block_n) * block_n
        splits = -(-longest // chunk)

    # scale * log2(e) folded into the tables: the kernel's softmax runs in base 2.
    scaled = query.reshape(num_reqs * num_heads, -1).float() * (scale * LOG2E)
    tables = (scaled @ key_codebook_matrix(books, dev)).view(num_reqs, num_heads, books.key_codes, -1)
    rows_p = _pow2(group) if EXACT_KEY_ROWS else max(16, _pow2(group))
    heads_inner = HEADS_INNER and EXACT_KEY_ROWS
    book_dtype = torch.float32 if query.dtype == torch.float32 else query.dtype
    if heads_inner:  # [R, Hk, key_codes * 256, rows_p], padded heads 0
        grouped = tables.view(num_reqs, num_kv_heads, group, -1).transpose(-1, -2)
        tables = torch.zeros(*grouped.shape[:-1], rows_p, device=dev, dtype=table_dtype(query.dtype))
        tables[..., :group] = grouped
    vbook = value_codebook(books, dev, book_dtype)
    block_table = block_table.to(dev, torch.int32)
    if block_table.stride(-1) != 1:
        block_table = block_table.contiguous()
    block_g = max(16, _pow2(group))
    block_dv = max(16, _pow2(head_size_v))
    vector = VECTOR_GATHER and groups > 1 and groups * width == block_dv == head_size_v \
        and _pow2(groups) == groups
    out = torch.empty(num_reqs, num_heads, head_size_v, device=dev)  # every element is written
    lse = torch.empty(num_reqs, num_heads, device=dev)
    total_splits = splits + (exact_ring.RING_SPLITS if ring is not None else 0)
    out_part = torch.empty(num_reqs, num_heads, total_splits, head_size_v, device=dev)
    m_part = torch.empty(num_reqs, num_heads, total_splits, device=dev)
    l_part = torch.empty_like(m_part)
    precision = "ieee" if book_dtype == torch.float32 else "tf32"  # (tf32 is unused for 16-bit dots)
    # Triton's interpreter multiplies 16-bit floats wrongly (a bf16 dot is off by 1e10); it computes
    # in float32 there, which checks everything but the GPU's 16-bit dot.
    upcast = not query.is_cuda

    split_kernel, merge_kernel = _kernels()
    order = _output_order(books, dev)
    if ring is not None:
        exact_ring.ring_attention(query, ring.key, ring.value, cache, block_table, ring.seq_lens, ring.layout, scale,
                       out_part, m_part, l_part, splits)
        if order is not None:  # into the coded splits' column order (value groups' dims in turn)
            out_part[:, :, splits:] = out_part[:, :, splits:].index_select(-1, order)
    if splits:
        split_kernel[(num_reqs, num_kv_heads, splits)](
            tables, cache, block_table, starts, ends, vbook,
            out_part, m_part, l_part,
            chunk, int(reserved_blocks),
            tables.stride(0), tables.stride(1),
            cache.stride(0), cache.stride(1), cache.stride(2), cache.stride(3),
            block_table.stride(0),
            out_part.stride(0), out_part.stride(1), out_part.stride(2),
            m_part.stride(0), m_part.stride(1),
            PAGE=block_size, G=group, BLOCK_G=block_g, KC=books.key_codes, VS=stages,
            DV=head_size_v, BLOCK_DV=block_dv, VG=groups, DG=width, VECTOR=vector, GP=rows_p,
                HEADS_INNER=heads_inner,
            BOOK=CODEBOOK_SIZE, BLOCK_N=block_n,
            PRECISION=precision, UPCAST=upcast, num_warps=NUM_WARPS,
        )
    merge_kernel[(num_reqs, num_heads)](
        out_part, m_part, l_part, out, lse,
        total_splits,
        out_part.stride(0), out_part.stride(1), out_part.stride(2),
        m_part.stride(0), m_part.stride(1),
        out.stride(0), out.stride(1),
        lse.stride(0),
        DV=head_size_v, BLOCK_DV=block_dv, BLOCK_S=max(16, _pow2(total_splits)), CHUNK_S=16,
    )
    if order is not None:
        out = torch.empty_like(out).index_copy_(-1, order, out)
    return out, lse

