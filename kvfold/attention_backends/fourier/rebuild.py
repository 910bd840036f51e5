"""What a prefill chunk sees of a request's cached tokens, rebuilt for every KV head at once.

:func:`paged.visible` (the specification's arithmetic) rebuilds the past head by head and kind by
kind: about 15 small operations each, 16 pairs per layer at Llama-3.1-8B's 8 KV heads, for every
chunk of a long prompt. Here each kind takes one gather of every head's kept dims, one of the exact
ring's compressed dims, one of the coefficient (or pre-compression middle) rows, and one batched
inverse FFT, addressed through the same per-head tables as the decode kernels
(:class:`decode.HeadTables`). The result equals :func:`paged.visible`.
"""

from __future__ import annotations

import torch

from kvfold.attention_backends.fourier import kernels, spectral
from kvfold.attention_backends.fourier.arena import CacheArena
from kvfold.attention_backends.fourier.decode import HeadTables, gather_state, row_addresses
from kvfold.attention_backends.fourier.layout import KINDS, STAT_ROWS
from kvfold.attention_backends.fourier.paged import OFFSET, SCALE


def visible_heads(arena: CacheArena, tables: HeadTables, row: torch.Tensor, n: int,
                  window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[n, Hk, D]`` (float32) attention sees of a request's ``n`` cached tokens,
    ``row`` its block-table row; ``tables`` are the layer's."""
    layout = arena.layout
    sink, recent, freqs = layout.sink, layout.recent, layout.freqs
    heads = layout.num_kv_heads
    dev = row.device
    sizes = {"k": layout.head_size, "v": layout.head_size_v}
    if n == 0:
        return tuple(torch.zeros(0, heads, sizes[kind], device=dev) for kind in KINDS)
    slots = arena.slot_bytes(row.expand(n, -1), torch.arange(n, device=dev))
    exact = torch.cat([torch.arange(min(sink, n), device=dev),
                       torch.arange(min(max(sink, n - recent), n), n, device=dev)])
    length = layout.middle_length(n)
    rows = row[None]
    flat, flat32 = arena.typed(layout.dtype), arena.typed(torch.float32)
    out = []
    for kind in KINDS:
        size, coef_column = sizes[kind], kernels.COEF_K if kind == "k" else kernels.COEF_V
        full = torch.zeros(n, heads * size, device=dev)
        full[:, tables.kept_cols[kind]] = flat[(slots // layout.elem)[:, None]
                                               + tables.kept_flat[kind][None, :]].float()
        # Compressed dims, [n, H, Dc] in each head's padded order, scattered into place at the end.
        compressed = torch.zeros(n, heads, tables.width["c" + kind], device=dev)
        ring = layout.ring_index(exact)[None, None, :].expand(1, heads, -1)
        addr = row_addresses(arena, tables, kind, False, rows, ring)
        compressed[exact] = gather_state(flat, addr // layout.elem, tables, kind)[0].transpose(0, 1)
        if length and layout.is_compressed(n):
            which = torch.arange(2 * freqs + len(STAT_ROWS), device=dev)[None, None, :].expand(1, heads, -1)
            stored = gather_state(flat32, row_addresses(arena, tables, kind, True, rows, which) // 4, tables, kind)[0]
            coef, stats = stored[:, : 2 * freqs], stored[:, 2 * freqs :]
            middle = (spectral.reconstruct(coef, length, window) * stats[:, None, SCALE]
                      + stats[:, None, OFFSET])  # [H, length, Dc]
            compressed[sink : sink + length] = middle.transpose(0, 1)
        elif length:  # the exact middle, ``middle_per_row`` tokens per coefficient row
            middle = torch.arange(length, device=dev)
            per = layout.middle_per_row
            addr = row_addresses(arena, tables, kind, True, rows,
                                 (middle // per)[None, None, :].expand(1, heads, -1))
            addr = addr + (middle % per)[None, None, :] * tables.table[None, :, coef_column + 3, None] * layout.elem
            compressed[sink : sink + length] = gather_state(flat, addr // layout.elem, tables, kind)[0].transpose(0, 1)
        placed = torch.zeros(n, heads, size + 1, device=dev)  # column `size` takes the padding
        placed.scatter_(-1, tables.compressed[kind][None].expand(n, -1, -1), compressed)
        out.append(full.view(n, heads, size) + placed[..., :size])
    return out[0], out[1]
