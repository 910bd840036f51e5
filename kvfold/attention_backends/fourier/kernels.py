"""FlashFourierAttention: Triton kernels of a decode step, reading vLLM's paged cache in place.

The authors' kernel rebuilds every compressed dim of every middle token for every query head
(``O(L 2k |Dc|)`` per head and step). Everything a decode step needs from the coefficients is
linear in them, so kvfold projects the query instead (``reference.middle_scores``):

* :func:`_coef_pass` (keys): per (request, KV head, tile of the ``2k`` rows) it reads the request's
  coefficient rows from its reserved pages, adds the rank-1 update of the token that just left the
  recent window, writes them back, and projects the group's queries onto them:
  ``z = C (q_c * scale)``, ``[G, 2k]``;
* the middle's compressed-dim scores ``(1/k) z F`` for every position are one length-``T`` inverse
  real FFT per query head (``spectral.synthesize``, torch);
* :func:`_decode_pass` (FlashFourierAttention proper), launched twice: per (request, KV head,
  split) one online softmax over the compressed middle (kept dims from the paged slots plus the
  FFT's scores; it exports the probabilities, with each tile's running max), and one over the
  positions whose compressed dims are exact (sink and recent tokens from the exact ring, a
  middle not compressed yet from the coefficient rows that hold it). Both accumulate the values
  of the kept dims, the second also those of the exact compressed dims; the splits of both are
  merged in torch;
* the probabilities' basis weights ``w = p F^T`` are one real FFT per query head (torch);
* :func:`_coef_pass` (values) reads the value coefficients once more, applies their rank-1 update,
  writes them back and returns ``(w C) / k``, which the re-normalisation turns into the middle's
  compressed value dims.

So per step and KV head the coefficients are read and written once each, the kept dims read once,
and the FFTs cost ``O(T log T)`` per query head instead of ``O(2k L)``. Heads of a layer compress
different dims: the kernels take per-head tables (segment offsets, widths, state pages).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Table columns per KV head (int64), see decode.HeadTables.
SEG_K, WIDTH_K, SEG_V, WIDTH_V = 0, 1, 2, 3
RING_K, RING_V, COEF_K, COEF_V = 4, 8, 12, 16  # each: first page, rows per page, row bytes, width
TABLE_COLUMNS = 20
LOG2E = 1.4426950408889634
_launched: dict[str, object] = {}  # kernel name -> the compiled kernel of its last launch


def compiled_stats() -> dict[str, dict[str, int]]:
    """Registers per thread, spilled registers and shared memory of each kernel's last compiled
    launch (empty under Triton's interpreter): the first things to read when a kernel is far slower
    than the bytes it moves."""
    stats = {}
    for name, kernel in _launched.items():
        fields = {"n_regs": getattr(kernel, "n_regs", None), "n_spills": getattr(kernel, "n_spills", None),
                  "shared": getattr(getattr(kernel, "metadata", None), "shared", None)}
        if any(v is not None for v in fields.values()):
            stats[name] = {k: int(v) for k, v in fields.items() if v is not None}
    return stats


def triton_enabled(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def pow2(x: int, least: int = 16) -> int:
    return max(least, 1 << max(int(x) - 1, 0).bit_length())


def round_up(x: int, multiple: int) -> int:
    return -(-int(x) // multiple) * multiple


@triton.jit
def _row_address(Table, BlockTable, Base, h, req_row, rows, item: tl.constexpr,
                 reserved, block_stride, mask):
    """Byte address of ``rows`` of a state item of KV head ``h`` (rows never straddle pages).

    Row, page and block indices are int32 (GPUs emulate 64-bit division, and these divide per
    position); only the byte address is 64-bit."""
    first = tl.load(Table + h * 20 + item).to(tl.int32)
    per_page = tl.minimum(tl.load(Table + h * 20 + item + 1), 1 << 30).to(tl.int32)
    row_bytes = tl.load(Table + h * 20 + item + 2)
    page = first + rows // per_page
    block = tl.load(BlockTable + req_row + page % reserved, mask=mask, other=0).to(tl.int64)
    base = tl.load(Base + page // reserved, mask=mask, other=0)
    return base + block * block_stride + (rows % per_page).to(tl.int64) * row_bytes


@triton.jit
def _coef_pass(
    Cache32, BlockTable, Base, Table, SeqLens, Flags, Enter, Weights, Out,  # noqa: N803
    stride_b, stride_er, stride_eh, stride_wr, stride_wh, stride_or, stride_oh, stride_op,
    reserved, block_stride, sink, recent, window,
    ITEM: tl.constexpr, WIDTH: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr,  # noqa: N803
    ROWS: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr, BLOCK_R: tl.constexpr,  # noqa: N803
    BLOCK_D: tl.constexpr, PROJECT: tl.constexpr,  # noqa: N803
):
    """Coefficients ``C [2k, dc]`` of (request, KV head), the rows of this program's range: add
    ``f(t) x^T`` of the entering token when ``Flags & 1`` (compressed before this step), store,
    then either (PROJECT) ``Out[g, rows] = C[rows] . Weights[g]``, or (values) the range's part
    ``Out[g, part] = sum_r Weights[g, r] C[r]``, summed over parts by the caller. Requests without
    ``Flags & 2`` (compressed now) are skipped."""
    r = tl.program_id(0)
    h = tl.program_id(1)
    flags = tl.load(Flags + r)
    active = (flags >> 1) & 1  # int scalars: a bool scalar cannot mask a vector in the interpreter
    update = (flags & 1) != 0
    width = tl.load(Table + h * 20 + WIDTH)
    n = tl.load(SeqLens + r)
    t = n - 1 - recent - sink  # middle index of the token that left the recent window
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < width
    offs_g = tl.arange(0, BLOCK_G)
    mask_g = offs_g < G
    heads = h * G + offs_g
    enter = tl.load(Enter + r * stride_er + h * stride_eh + offs_d, mask=mask_d, other=0.0)
    req_row = r * stride_b
    start = tl.program_id(2) * ROWS_PER_PROGRAM
    if PROJECT:
        q = tl.load(Weights + r * stride_wr + heads[:, None] * stride_wh + offs_d[None, :],
                    mask=mask_g[:, None] & mask_d[None, :], other=0.0)
    else:
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for r0 in range(start, start + ROWS_PER_PROGRAM, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask_r = (rows < ROWS) & (rows * 0 + active != 0)
        addr = _row_address(Table, BlockTable, Base, h, req_row, rows, ITEM, reserved, block_stride, mask_r)
        ptrs = Cache32 + (addr // 4)[:, None] + offs_d[None, :]
        mask = mask_r[:, None] & mask_d[None, :]
        coef = tl.load(ptrs, mask=mask, other=0.0)
        if update:
            freq = rows // 2  # freq * t < 512 * window stays in int32 for windows below 4M tokens
            angle = ((freq * t) % window).to(tl.float32) * (6.283185307179586 / window)
            basis = tl.where(rows % 2 == 0, tl.cos(angle), tl.sin(angle))
            coef = coef + basis[:, None] * enter[None, :]
            tl.store(ptrs, coef, mask=mask)
        if PROJECT:
            z = tl.dot(q, tl.trans(coef), input_precision="ieee")  # [BLOCK_G, BLOCK_R]
            tl.store(Out + r * stride_or + heads[:, None] * stride_oh + rows[None, :], z,
                     mask=mask_g[:, None] & (rows < ROWS)[None, :])
        else:
            w = tl.load(Weights + r * stride_wr + heads[:, None] * stride_wh + rows[None, :],
                        mask=mask_g[:, None] & (rows < ROWS)[None, :], other=0.0)
            acc += tl.dot(w, coef, input_precision="ieee")
    if not PROJECT:
        tl.store(Out + r * stride_or + heads[:, None] * stride_oh + tl.program_id(2) * stride_op + offs_d[None, :],
                 acc, mask=mask_g[:, None] & mask_d[None, :])


@triton.jit
def _exact_rows(CacheM, Table, BlockTable, Base, h, req_row, offs, is_ring, is_pre, sink, recent,
                per, reserved, block_stride, RING: tl.constexpr, COEF: tl.constexpr,  # noqa: N803
                ELEM: tl.constexpr, BLOCK_D: tl.constexpr):  # noqa: N803
    """``[BLOCK_N, BLOCK_D]`` compressed dims of exact positions: ring rows for sink/recent ones,
    the coefficient rows that hold the middle before its first compression for the others."""
    width = tl.load(Table + h * 20 + RING + 3)
    offs_d = tl.arange(0, BLOCK_D)
    ring_row = tl.where(offs < sink, offs, sink + (offs - sink) % recent)
    ring = _row_address(Table, BlockTable, Base, h, req_row, ring_row, RING, reserved, block_stride, is_ring)
    t = tl.maximum(offs - sink, 0)
    pre = _row_address(Table, BlockTable, Base, h, req_row, t // per, COEF, reserved, block_stride, is_pre)
    pre += ((t % per) * width * ELEM).to(tl.int64)
    addr = tl.where(is_ring, ring, pre)
    mask = (is_ring | is_pre)[:, None] & (offs_d < width)[None, :]
    return tl.load(CacheM + (addr // ELEM)[:, None] + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _decode_pass(
    CacheM, BlockTable, Base, Table, SeqLens, Flags, QK, QC, Spec,  # noqa: N803
    P, TileMax, AccK, AccC, MPart, LPart,  # noqa: N803
    chunk, first_split, reserved, block_size, block_stride, slot_stride, sink, recent, per,
    stride_b, stride_qr, stride_qh, stride_cr, stride_ch, stride_sr, stride_sh,
    stride_pr, stride_ph, stride_tr, stride_th,
    stride_ar, stride_ah, stride_as, stride_xr, stride_xh, stride_xs, stride_mr, stride_mh,
    G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, ELEM: tl.constexpr,  # noqa: N803
    BLOCK_WK: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_WV: tl.constexpr,  # noqa: N803
    BLOCK_DV: tl.constexpr, EXACT: tl.constexpr,  # noqa: N803
):
    """One online softmax per (request, KV head, split) over either the compressed middle
    (``EXACT`` off: kept dims plus the FFT's scores) or the positions whose compressed dims are
    exact (``EXACT`` on: the sink and recent tokens, and the whole of a request whose middle is
    not compressed yet). Two compiled kernels instead of one with a branch: the exact-row work
    needs ``[BLOCK_N, Dc]`` tiles and a second accumulator, which in one kernel took every
    register and spilled (H100: 255 registers, 264 spills, 2.6x the middle-only kernel's time)
    for the few tiles that have exact rows."""
    r = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    n = tl.load(SeqLens + r)
    compressed = (tl.load(Flags + r) >> 1) & 1
    middle_end = sink + tl.maximum(n - sink - recent, 0)
    if EXACT:
        # Index i < count runs over the sink, then from `resume` on: what follows the
        # compressed middle, or the rest of the request while nothing is compressed.
        resume = tl.where(compressed != 0, middle_end, sink)
        count = tl.minimum(sink, n) + n - tl.minimum(resume, n)
        start = split * chunk
        end = tl.minimum(start + chunk, count)
    else:
        # Tiles aligned to position 0: the exported probabilities carry one running max per
        # BLOCK_N positions.
        start = (sink // BLOCK_N) * BLOCK_N + split * chunk
        end = tl.minimum(start + chunk, tl.where(compressed != 0, middle_end, 0))
    offs_g = tl.arange(0, BLOCK_G)
    mask_g = offs_g < G
    heads = h * G + offs_g
    seg_k, width_k = tl.load(Table + h * 20 + 0), tl.load(Table + h * 20 + 1)
    seg_v, width_v = tl.load(Table + h * 20 + 2), tl.load(Table + h * 20 + 3)
    offs_wk, offs_wv = tl.arange(0, BLOCK_WK), tl.arange(0, BLOCK_WV)
    # Queries carry the softmax scale * log2(e); so does Spec.
    qk = tl.load(QK + r * stride_qr + heads[:, None] * stride_qh + offs_wk[None, :],
                 mask=mask_g[:, None] & (offs_wk < width_k)[None, :], other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc_k = tl.zeros([BLOCK_G, BLOCK_WV], tl.float32)
    if EXACT:
        offs_dk, offs_dv = tl.arange(0, BLOCK_DK), tl.arange(0, BLOCK_DV)
        qc = tl.load(QC + r * stride_cr + heads[:, None] * stride_ch + offs_dk[None, :],
                     mask=mask_g[:, None] & (offs_dk < BLOCK_DK)[None, :], other=0.0)
        acc_c = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    req_row = r * stride_b
    for s0 in range(start, end, BLOCK_N):
        index = s0 + tl.arange(0, BLOCK_N)  # int32: positions, blocks and rows divide in 32 bits
        if EXACT:
            valid = index < end
            offs = tl.where(index < sink, index, index - sink + resume)
        else:
            offs = index
            valid = (offs >= sink) & (offs < end)
        block = tl.load(BlockTable + req_row + reserved + offs // block_size, mask=valid, other=0).to(tl.int64)
        slot = block * block_stride + (offs % block_size).to(tl.int64) * slot_stride  # bytes, within a view
        kept = tl.load(CacheM + ((slot + seg_k) // ELEM)[:, None] + offs_wk[None, :],
                       mask=valid[:, None] & (offs_wk < width_k)[None, :], other=0.0).to(tl.float32)
        s = tl.dot(qk, tl.trans(kept), input_precision="ieee")
        if EXACT:
            is_ring = valid & ((offs < sink) | (offs >= tl.maximum(sink, n - recent)))
            is_pre = valid & ~is_ring
            exact = _exact_rows(CacheM, Table, BlockTable, Base, h, req_row, offs, is_ring, is_pre, sink,
                                recent, per, reserved, block_stride, 4, 12, ELEM, BLOCK_DK)
            s += tl.dot(qc, tl.trans(exact), input_precision="ieee")
        else:
            s += tl.load(Spec + r * stride_sr + heads[:, None] * stride_sh + offs[None, :],
                         mask=mask_g[:, None] & valid[None, :], other=0.0)
        s = tl.where(valid[None, :], s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        values = tl.load(CacheM + ((slot + seg_v) // ELEM)[:, None] + offs_wv[None, :],
                         mask=valid[:, None] & (offs_wv < width_v)[None, :], other=0.0).to(tl.float32)
        acc_k = acc_k * alpha[:, None] + tl.dot(p, values, input_precision="ieee")
        if EXACT:
            exact_v = _exact_rows(CacheM, Table, BlockTable, Base, h, req_row, offs, is_ring, is_pre, sink,
                                  recent, per, reserved, block_stride, 8, 16, ELEM, BLOCK_DV)
            acc_c = acc_c * alpha[:, None] + tl.dot(p, exact_v, input_precision="ieee")
        else:
            # The compressed middle's probabilities leave for the FFT, relative to this tile's max.
            tl.store(P + r * stride_pr + heads[:, None] * stride_ph + offs[None, :], p,
                     mask=mask_g[:, None] & valid[None, :])
            tl.store(TileMax + r * stride_tr + heads * stride_th + s0 // BLOCK_N, m_new, mask=mask_g)
        m_i = m_new

    split = first_split + split
    part = r * stride_ar + heads[:, None] * stride_ah + split * stride_as
    tl.store(AccK + part + offs_wv[None, :], acc_k, mask=mask_g[:, None] & (offs_wv < BLOCK_WV)[None, :])
    if EXACT:
        part = r * stride_xr + heads[:, None] * stride_xh + split * stride_xs
        tl.store(AccC + part + offs_dv[None, :], acc_c, mask=mask_g[:, None] & (offs_dv < BLOCK_DV)[None, :])
    ml = r * stride_mr + heads * stride_mh + split
    tl.store(MPart + ml, m_i, mask=mask_g)
    tl.store(LPart + ml, l_i, mask=mask_g)


def coef_pass(cache32, block_table, base, table, seq_lens, flags, enter, weights, *, item: int,
              group: int, rows: int, width: int, project: bool, reserved: int, block_stride: int,
              sink: int, recent: int, window: int) -> torch.Tensor:
    """Run :func:`_coef_pass` for every (request, KV head); returns ``[R, Hq, 2k]`` (project) or
    ``[R, Hq, width]`` float32."""
    num_reqs, num_heads = enter.shape[0], enter.shape[1] * group
    block_r, block_d = COEF_BLOCK_R, pow2(width)
    parts = triton.cdiv(rows, block_r) if project else VALUE_SPLITS
    per_program = triton.cdiv(triton.cdiv(rows, parts), block_r) * block_r
    parts = triton.cdiv(rows, per_program)
    out = torch.zeros(num_reqs, num_heads, *((rows,) if project else (parts, width)), device=enter.device)
    _launched["coef_pass_project" if project else "coef_pass_values"] = _coef_pass[(num_reqs, enter.shape[1], parts)](
        cache32, block_table, base, table, seq_lens, flags, enter, weights, out,
        block_table.stride(0), enter.stride(0), enter.stride(1), weights.stride(0), weights.stride(1),
        out.stride(0), out.stride(1), 0 if project else out.stride(2), reserved, block_stride, sink, recent, window,
        ITEM=item, WIDTH=item + 3, G=group, BLOCK_G=pow2(group), ROWS=rows, ROWS_PER_PROGRAM=per_program,
        BLOCK_R=block_r, BLOCK_D=block_d, PROJECT=project, num_warps=COEF_NUM_WARPS,
    )
    return out if project else out.sum(2)


# Tuning, module-level so that benchmarks.fourier_kernel --sweep can set it; chosen on an H100 at
# Llama-3.1-8B's shape, 16 and 64 requests of 32k (docs/benchmarks/fourier-kernel-sweep*-h100.json;
# multiply-and-sum in place of tl.dot, without padded query rows, was slower: 12.0 against 10.7 ms).
BLOCK_N = 32
TARGET_PROGRAMS = 1056  # 8 per H100 SM: at 64 x 32k, 10.7 ms against 12.6 with 264
EXACT_BLOCK_N = 16  # the exact pass's tiles: [BLOCK_N, Dc] fp32 rows and their dots spill at 32
NUM_WARPS = 8  # decode pass: 8 warps took 3.05 ms against 4.15 with 4 (fewer spills in the exact pass)
COEF_NUM_WARPS = 2  # coefficient passes: 0.42 ms with 2 warps against 0.81 with 4
COEF_BLOCK_R = 16  # coefficient rows per tile (64 spilled: 255 registers, 174 spills)
VALUE_SPLITS = 4  # programs per (request, KV head) reading the value coefficients


def _splits(tiles: int, programs: int) -> tuple[int, int]:
    """(splits, tiles per split) spreading ``tiles`` over about TARGET_PROGRAMS programs."""
    if tiles <= 0:
        return 0, 0
    splits = max(1, min(tiles, TARGET_PROGRAMS // max(1, programs)))
    per = triton.cdiv(tiles, splits)
    return triton.cdiv(tiles, per), per


def decode_pass(cache, block_table, base, table, seq_lens, flags, qk, qc, spec, *, group: int,
                longest: int, longest_middle_end: int, longest_exact: int, reserved: int,
                block_size: int, block_stride: int, slot_stride: int, sink: int, recent: int, per: int,
                widths: tuple[int, int, int, int]):
    """Run :func:`_decode_pass` over the compressed middles and over the exact positions;
    returns ``(p, tile_max, acc_k, acc_c, m, l)``, the last four per split of either launch.

    ``longest_middle_end``: the largest ``sink + middle`` of a compressed request (0 if none);
    ``longest_exact``: the most exact positions of a request."""
    num_reqs, num_heads = qk.shape[0], qk.shape[1]
    num_kv = num_heads // group
    dev = qk.device
    block_n = BLOCK_N
    first = (sink // block_n) * block_n
    mid_splits, mid_tiles = _splits(triton.cdiv(max(longest_middle_end - first, 0), block_n), num_reqs * num_kv)
    ex_splits, ex_tiles = _splits(triton.cdiv(longest_exact, EXACT_BLOCK_N), num_reqs * num_kv)
    wk, dk, wv, dv = (pow2(w) for w in widths)
    # Triton compiles a kernel per divisibility of its integer arguments (strides included), so
    # buffers sized by the longest request are padded to multiples of 16: one compiled kernel
    # serves every step instead of a new one whenever the longest request grows.
    tiles_padded = round_up(triton.cdiv(longest, block_n), 16)
    splits_padded = round_up(mid_splits + ex_splits, 16)
    p = torch.zeros(num_reqs, num_heads, spec.shape[-1], device=dev)
    tile_max = torch.full((num_reqs, num_heads, tiles_padded), float("-inf"), device=dev)
    acc_k = torch.zeros(num_reqs, num_heads, splits_padded, wv, device=dev)
    acc_c = torch.zeros(num_reqs, num_heads, splits_padded, dv, device=dev)
    m = torch.full((num_reqs, num_heads, splits_padded), float("-inf"), device=dev)
    l = torch.zeros(num_reqs, num_heads, splits_padded, device=dev)  # noqa: E741
    for exact, splits, tiles, first_split, tile in ((False, mid_splits, mid_tiles, 0, block_n),
                                                    (True, ex_splits, ex_tiles, mid_splits, EXACT_BLOCK_N)):
        if not splits:
            continue
        _launched["decode_pass_exact" if exact else "decode_pass_middle"] = _decode_pass[(num_reqs, num_kv, splits)](
            cache, block_table, base, table, seq_lens, flags, qk, qc, spec, p, tile_max, acc_k, acc_c, m, l,
            tiles * tile, first_split, reserved, block_size, block_stride, slot_stride, sink, recent, per,
            block_table.stride(0), qk.stride(0), qk.stride(1), qc.stride(0), qc.stride(1),
            spec.stride(0), spec.stride(1), p.stride(0), p.stride(1), tile_max.stride(0), tile_max.stride(1),
            acc_k.stride(0), acc_k.stride(1), acc_k.stride(2), acc_c.stride(0), acc_c.stride(1), acc_c.stride(2),
            m.stride(0), m.stride(1),
            G=group, BLOCK_G=pow2(group), BLOCK_N=tile, ELEM=cache.element_size(),
            BLOCK_WK=wk, BLOCK_DK=dk, BLOCK_WV=wv, BLOCK_DV=dv, EXACT=exact, num_warps=NUM_WARPS,
        )
    return p, tile_max, acc_k, acc_c, m, l


def scaled_log2(scale: float) -> float:
    """Scores enter the kernel multiplied by this, so the kernel can use exp2."""
    return scale * LOG2E

