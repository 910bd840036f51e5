"""A request's new tokens stored for every KV head at once: the batched form of ``paged.write_request``.

``paged.write_request`` (the specification's arithmetic) loops over kinds and heads, about 480 small
operations per head and kind: at Llama-3.1-8B's 8 KV heads, ~7,700 per layer for each prefill
chunk, which on an H100 is tens of milliseconds of kernel launches per layer (a 32k prompt took
~100 s to prefill at 8B shape). Here each kind takes a fixed number of operations over all heads,
addressed through the per-head tables of the decode kernels (:class:`decode.HeadTables`); heads
with fewer compressed dims than the layer's widest read zeros and write nowhere (masked lanes go
to vLLM's null block). The cache it leaves equals ``write_request``'s.
"""

from __future__ import annotations

import torch

from kvfold.attention_backends.fourier import kernels, spectral
from kvfold.attention_backends.fourier.arena import CacheArena
from kvfold.attention_backends.fourier.decode import HeadTables, _scatter, gather_dims, gather_state, row_addresses
from kvfold.attention_backends.fourier.layout import KINDS, STAT_ROWS
from kvfold.attention_backends.fourier.paged import MAX, MIN, SUM, fit_normalization, initial_stats


def write_heads(
    arena: CacheArena,
    tables: HeadTables,
    row: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    n_old: int,
    *,
    prefill: bool,
    window: int,
) -> None:
    """Store one request's new tokens ``key``/``value`` ``[n, Hk, D]`` (its block-table ``row``);
    ``tables`` are the layer's."""
    layout = arena.layout
    sink, recent, freqs, elem = layout.sink, layout.recent, layout.freqs, layout.elem
    n_new = n_old + key.shape[0]
    dev = key.device
    heads = layout.num_kv_heads
    slots = arena.slot_bytes(row.expand(n_new - n_old, -1), torch.arange(n_old, n_new, device=dev))
    # The same host-side ranges as write_request.
    first, last = max(sink, n_old - recent), max(max(sink, n_old - recent), n_new - recent)
    entering_old = torch.arange(first, max(first, min(last, n_old)), device=dev)
    entering_new = torch.arange(max(first, n_old), max(last, n_old), device=dev) - n_old
    ringed = torch.cat([torch.arange(n_old, max(n_old, min(sink, n_new)), device=dev),
                        torch.arange(min(max(n_old, n_new - recent, sink), n_new), n_new, device=dev)])
    was, now = layout.is_compressed(n_old), layout.is_compressed(n_new)
    rows = row[None]
    flat, flat32 = arena.typed(layout.dtype), arena.typed(torch.float32)
    dummy = tables.dummy

    def rows_of(kind: str, coef: bool, which: torch.Tensor) -> torch.Tensor:
        """Byte addresses ``[1, H, m]`` of state rows ``which`` ``[m]`` of every head."""
        return row_addresses(arena, tables, kind, coef, rows, which[None, None, :].expand(1, heads, -1))

    def middle_cells(kind: str, middle: torch.Tensor) -> torch.Tensor:
        """Element offsets ``[1, H, m]`` of exact middle tokens ``middle`` in the coefficient rows."""
        per = layout.middle_per_row
        width = tables.table[None, :, (kernels.COEF_K if kind == "k" else kernels.COEF_V) + 3, None]
        return (rows_of(kind, True, middle // per) + (middle % per)[None, None, :] * width * elem) // elem

    for kind, x in zip(KINDS, (key, value)):
        kept = x.reshape(x.shape[0], -1)[:, tables.kept_cols[kind]]
        flat[(slots // elem)[:, None] + tables.kept_flat[kind][None, :]] = kept.to(flat.dtype)
        width = tables.width["c" + kind]
        if width == 0:
            continue
        valid = tables.valid[kind]  # [H, Dc]
        new = gather_dims(x.float(), tables.compressed[kind]).transpose(0, 1)  # [H, n, Dc]
        stat_addr = rows_of(kind, True, torch.arange(2 * freqs, 2 * freqs + len(STAT_ROWS), device=dev)) // 4
        if n_old == 0:
            stats = initial_stats(width, dev).expand(heads, -1, -1).clone()
        else:
            stats = gather_state(flat32, stat_addr, tables, kind)[0]  # [H, 5, Dc]
        if last > first:
            old = gather_state(flat, rows_of(kind, False, layout.ring_index(entering_old)) // elem, tables, kind)[0]
            enter = torch.cat([old, new[:, entering_new]], 1)  # [H, m, Dc]
            stats[:, SUM] += enter.sum(1)
            stats[:, MIN] = torch.minimum(stats[:, MIN], enter.amin(1))
            stats[:, MAX] = torch.maximum(stats[:, MAX], enter.amax(1))
            start = first - sink
            if now:
                coef_addr = rows_of(kind, True, torch.arange(2 * freqs, device=dev)) // 4
                if was:
                    coef = gather_state(flat32, coef_addr, tables, kind)[0] + spectral.project(enter, window, freqs, start)
                else:  # the middle outgrows 2k: the exact pre-compression middle is projected whole
                    before = gather_state(flat, middle_cells(kind, torch.arange(start, device=dev)), tables, kind)[0]
                    coef = spectral.project(torch.cat([before, enter], 1), window, freqs)
                _scatter(flat32, coef_addr, coef[None], valid[None, :, None, :], dummy)
                if prefill or not was:
                    fit_normalization(stats, coef, layout.middle_length(n_new), window)
            else:
                cells = middle_cells(kind, torch.arange(first, last, device=dev) - sink)
                _scatter(flat, cells, enter[None], valid[None, :, None, :], dummy)
        _scatter(flat32, stat_addr, stats[None], valid[None, :, None, :], dummy)
        if ringed.numel():
            cells = rows_of(kind, False, layout.ring_index(ringed)) // elem
            _scatter(flat, cells, new[:, ringed - n_old][None], valid[None, :, None, :], dummy)
