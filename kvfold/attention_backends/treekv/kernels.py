"""TreeKV decode attention over per-head entry lists, with the probabilities eviction needs.

Every KV head of a request keeps its own tokens, scattered over the request's budget blocks, so a
decode step reads, per (request, KV head), a list of slots (``entries``) instead of a block table.
Eviction scores each entry by the attention it received: besides the output, the kernel returns
each entry's softmax probability averaged over the query heads of its group.

:func:`decode_attention_torch` is the specification (and the CPU path);
:func:`decode_attention` runs the Triton kernel on CUDA, and on CPU under ``TRITON_INTERPRET=1``.
The kernel is split-K: each program scores one chunk of one (request, KV head)'s entries with an
online softmax for the group's query heads and writes its partial output, running max and sum and
raw logits; a few tensor ops then merge the chunks and normalise the probabilities.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton.language as tl

from kvfold.attention_backends.treekv.reference import rope_rotate

BLOCK_N = 64
# Enough programs to fill an H100's 132 SMs about twice at small batch.
TARGET_PROGRAMS = 264


def gather_entries(pages: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
    """``pages`` ``[blocks, Hk, block_size, D]`` at ``entries`` ``[R, Hk, S]`` -> ``[R, Hk, S, D]``."""
    block_size = pages.shape[2]
    e = entries.long()
    heads = torch.arange(pages.shape[1], device=pages.device)[None, :, None]
    return pages[e // block_size, heads, e % block_size]


def decode_attention_torch(
    query: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    entries: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    delta: torch.Tensor | None = None,
    inv_freq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query token per request over its entries, in float32.

    ``query`` ``[R, Hq, D]``; ``k``/``v`` ``[blocks, Hk, block_size, D]`` (strided views are fine);
    ``entries`` ``[R, Hk, S]`` slot ids, the first ``lengths[r]`` of each head valid; ``delta``
    ``[R, Hk, S]`` rotates each key by that many positions first (TreeKV's rank positions).
    Returns the output ``[R, Hq, Dv]`` in ``query``'s dtype and the probabilities ``[R, Hk, S]``
    (mean over the group's query heads; zero past ``lengths``).
    """
    num_reqs, num_kv_heads, num_entries = entries.shape
    group = query.shape[1] // num_kv_heads
    keys = gather_entries(k, entries).float()
    if delta is not None:
        keys = rope_rotate(keys, delta, inv_freq)
    values = gather_entries(v, entries).float()
    q = query.float().view(num_reqs, num_kv_heads, group, -1)
    logits = torch.einsum("rhgd,rhsd->rhgs", q, keys) * scale
    valid = torch.arange(num_entries, device=entries.device) < lengths.to(entries.device)[:, None]
    probs = torch.softmax(logits.masked_fill(~valid[:, None, None, :], float("-inf")), dim=-1)
    out = torch.einsum("rhgs,rhsd->rhgd", probs, values)
    return out.reshape(num_reqs, query.shape[1], -1).to(query.dtype), probs.mean(2)


def _decode_split(
    Q, K, V, Entries, Lengths, Delta, InvFreq,  # noqa: N803 (Triton pointer arguments)
    OutPart, MPart, LPart, Logits,  # noqa: N803
    scale, chunk,
    stride_qr, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_er, stride_eh,
    stride_lr, stride_lh, stride_lg,
    stride_or, stride_oh, stride_os, stride_og,
    stride_mr, stride_mh, stride_ms,
    PAGE: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr,  # noqa: N803
    D: tl.constexpr, DV: tl.constexpr, HALF: tl.constexpr,  # noqa: N803
    BLOCK_N: tl.constexpr, ROTATE: tl.constexpr, PRECISION: tl.constexpr,  # noqa: N803
    UPCAST: tl.constexpr,  # noqa: N803
):
    r = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    n = tl.load(Lengths + r)
    start = split * chunk
    end = tl.minimum(start + chunk, n)

    offs_g = tl.arange(0, BLOCK_G)
    mask_g = offs_g < G
    q_rows = Q + r * stride_qr + (h * G + offs_g)[:, None] * stride_qh
    if ROTATE:
        offs_half = tl.arange(0, HALF)
        q1 = tl.load(q_rows + offs_half[None, :], mask=mask_g[:, None], other=0.0).to(tl.float32)
        q2 = tl.load(q_rows + HALF + offs_half[None, :], mask=mask_g[:, None], other=0.0).to(tl.float32)
        inv_freq = tl.load(InvFreq + offs_half)
    else:
        offs_d = tl.arange(0, D)
        q = tl.load(q_rows + offs_d[None, :], mask=mask_g[:, None], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
    offs_dv = tl.arange(0, DV)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_G], 0.0, tl.float32)
    acc = tl.full([BLOCK_G, DV], 0.0, tl.float32)
    entry_row = Entries + r * stride_er + h * stride_eh
    logit_rows = Logits + r * stride_lr + h * stride_lh + offs_g[:, None] * stride_lg
    for s0 in range(start, end, BLOCK_N):
        offs_n = s0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        slot = tl.load(entry_row + offs_n, mask=mask_n, other=0).to(tl.int64)
        block = slot // PAGE
        offset = slot % PAGE
        k_rows = K + block * stride_kb + h * stride_kh + offset * stride_ks
        if ROTATE:
            k1 = tl.load(k_rows[:, None] + offs_half[None, :], mask=mask_n[:, None], other=0.0).to(tl.float32)
            k2 = tl.load(k_rows[:, None] + HALF + offs_half[None, :], mask=mask_n[:, None], other=0.0).to(tl.float32)
            turn = tl.load(Delta + r * stride_er + h * stride_eh + offs_n, mask=mask_n, other=0).to(tl.float32)
            angle = turn[:, None] * inv_freq[None, :]
            cos = tl.cos(angle)
            sin = tl.sin(angle)
            qk = tl.dot(q1, tl.trans(k1 * cos - k2 * sin), input_precision=PRECISION)
            qk += tl.dot(q2, tl.trans(k2 * cos + k1 * sin), input_precision=PRECISION)
        else:
            keys = tl.load(k_rows[:, None] + offs_d[None, :], mask=mask_n[:, None], other=0.0)
            if UPCAST:
                keys = keys.to(tl.float32)
            qk = tl.dot(q, tl.trans(keys), input_precision=PRECISION)
        qk = tl.where(mask_n[None, :], qk * scale, float("-inf"))
        tl.store(logit_rows + offs_n[None, :], qk, mask=mask_g[:, None] & mask_n[None, :])

        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_rows = V + block * stride_vb + h * stride_vh + offset * stride_vs
        values = tl.load(v_rows[:, None] + offs_dv[None, :], mask=mask_n[:, None], other=0.0)
        if UPCAST:
            values = values.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values, input_precision=PRECISION)
        m_i = m_new

    out_rows = OutPart + r * stride_or + h * stride_oh + split * stride_os + offs_g[:, None] * stride_og
    tl.store(out_rows + offs_dv[None, :], acc, mask=mask_g[:, None])
    ml = r * stride_mr + h * stride_mh + split * stride_ms + offs_g
    tl.store(MPart + ml, m_i, mask=mask_g)
    tl.store(LPart + ml, l_i, mask=mask_g)


_jitted: dict[bool, Any] = {}


def _kernel() -> Any:
    """The jitted kernel; built on first use so ``TRITON_INTERPRET`` set by then is honoured."""
    import triton

    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if interpret not in _jitted:
        _jitted[interpret] = triton.jit(_decode_split)
    return _jitted[interpret]


def triton_enabled(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pow2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


def decode_attention(
    query: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    entries: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    delta: torch.Tensor | None = None,
    inv_freq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`decode_attention_torch`, computed by the Triton kernel where Triton runs."""
    if not triton_enabled(query.device):
        return decode_attention_torch(query, k, v, entries, lengths, scale, delta, inv_freq)
    num_reqs, num_kv_heads, num_entries = entries.shape
    num_heads, head_size = query.shape[1], query.shape[2]
    head_size_v = v.shape[-1]
    group = num_heads // num_kv_heads
    rotate = delta is not None
    half = inv_freq.numel() if rotate else 0
    if rotate and 2 * half != head_size:
        # Partial rotary leaves dims unrotated; the kernel does not split keys three ways.
        return decode_attention_torch(query, k, v, entries, lengths, scale, delta, inv_freq)
    for name, size in (("head size", head_size), ("value head size", head_size_v)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"TreeKV's Triton kernel needs a power-of-two {name} >= 16, got {size}")
    if k.stride(-1) != 1 or v.stride(-1) != 1 or entries.stride(-1) != 1:
        raise ValueError("TreeKV's Triton kernel needs K, V and entries contiguous in the last dim")
    query = query.contiguous()
    dev = query.device

    chunks_per_row = max(1, -(-num_entries // BLOCK_N))
    splits = min(chunks_per_row, max(1, -(-TARGET_PROGRAMS // (num_reqs * num_kv_heads))))
    chunk = -(-chunks_per_row // splits) * BLOCK_N
    splits = max(1, -(-num_entries // chunk))

    block_g = max(16, _pow2(group))
    out_part = torch.empty(num_reqs, num_kv_heads, splits, group, head_size_v, device=dev, dtype=torch.float32)
    m_part = torch.empty(num_reqs, num_kv_heads, splits, group, device=dev, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    logits = torch.full((num_reqs, num_kv_heads, group, num_entries), float("-inf"), device=dev)
    lengths = lengths.to(dev, torch.int32)
    if rotate:  # delta is read with the strides of entries
        entries = entries.contiguous()
    delta_arg = delta.to(torch.int32).contiguous() if rotate else entries
    freq_arg = inv_freq.to(dev, torch.float32).contiguous() if rotate else m_part
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    # Triton's interpreter multiplies 16-bit floats wrongly (3.9: a bf16 dot is off by 1e10);
    # it computes in float32 instead, which checks everything but the GPU's bf16 dot.
    upcast = not query.is_cuda

    _kernel()[(num_reqs, num_kv_heads, splits)](
        query, k, v, entries, lengths, delta_arg, freq_arg,
        out_part, m_part, l_part, logits,
        float(scale), chunk,
        query.stride(0), query.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        entries.stride(0), entries.stride(1),
        logits.stride(0), logits.stride(1), logits.stride(2),
        out_part.stride(0), out_part.stride(1), out_part.stride(2), out_part.stride(3),
        m_part.stride(0), m_part.stride(1), m_part.stride(2),
        PAGE=k.shape[2], G=group, BLOCK_G=block_g, D=head_size, DV=head_size_v, HALF=max(half, 1),
        BLOCK_N=BLOCK_N, ROTATE=rotate, PRECISION=precision, UPCAST=upcast,
    )
    # Merge the splits: rescale each to the global max (empty splits carry max -inf, sum 0).
    m = m_part.amax(2, keepdim=True)  # [R, Hk, 1, G]
    weight = torch.exp(m_part - m)
    total = (l_part * weight).sum(2)  # [R, Hk, G]
    out = (out_part * weight[..., None]).sum(2) / total[..., None]
    probs = torch.exp(logits - m.squeeze(2)[..., None]) / total[..., None]
    return out.reshape(num_reqs, num_heads, head_size_v).to(query.dtype), probs.mean(2)
