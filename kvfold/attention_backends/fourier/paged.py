"""A FourierAttention step on vLLM's paged cache, in torch: the rules of :mod:`stream` on the arena.

For a request going from ``n_old`` to ``n_new`` cached tokens in a layer, :func:`write_request`

1. stores every new token's kept dims in its own slot;
2. takes the tokens that leave the recent window (positions ``[max(sink, n_old - recent),
   n_new - recent)``, old ones from the ring, new ones from the step) into the middle: their
   compressed dims update the running ``sum, min, max`` and either the exact pre-compression middle
   or the coefficients, by a rank-n update (or, the first time the middle outgrows ``2k``, the
   projection of the whole middle);
3. refits the re-normalisation after a prefill chunk or the first compression;
4. stores the new tokens that stay in the sink or the recent window in the ring.

:func:`visible` rebuilds what attention sees of a request's ``n`` cached tokens (float32).
The decode fast path reads the same data without rebuilding it (:mod:`kernels`).
"""

from __future__ import annotations

import torch

from kvfold.attention_backends.fourier import spectral
from kvfold.attention_backends.fourier.arena import CacheArena
from kvfold.attention_backends.fourier.layout import KINDS, STAT_ROWS

SUM, MIN, MAX, SCALE, OFFSET = range(len(STAT_ROWS))


def initial_stats(width: int, device: torch.device) -> torch.Tensor:
    """``[5, width]``: empty running statistics, identity normalisation."""
    stats = torch.zeros(len(STAT_ROWS), width, device=device)
    stats[MIN], stats[MAX], stats[SCALE] = float("inf"), float("-inf"), 1.0
    return stats


def fit_normalization(stats: torch.Tensor, coef: torch.Tensor, length: int, window: int) -> None:
    """Set ``stats``' (``[..., 5, D]``) scale and offset rows: the authors' map from the reconstruction's mean and
    max absolute deviation to the original middle's (from the running sum, min and max)."""
    avg_u = stats[..., SUM, :] / length
    dev_u = torch.maximum(stats[..., MAX, :] - avg_u, avg_u - stats[..., MIN, :])
    recon = spectral.reconstruct(coef, length, window)  # [..., length, D]
    avg_d = recon.mean(-2)
    # max |recon - avg_d| without two more copies of recon: rounding of x - a is monotonic in x,
    # so this equals the elementwise form bit for bit.
    dev_d = torch.maximum(recon.amax(-2) - avg_d, avg_d - recon.amin(-2))
    # A constant reconstruction carries no shape to rescale: keep it, moved to the mean.
    scale = torch.where(dev_d > 0, dev_u / dev_d.clamp(min=torch.finfo(torch.float32).tiny), 1.0)
    stats[..., SCALE, :], stats[..., OFFSET, :] = scale, avg_u - avg_d * scale


def write_request(
    arena: CacheArena,
    layer: int,
    row: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    n_old: int,
    *,
    prefill: bool,
    window: int,
) -> None:
    """Store one request's new tokens ``key``/``value`` ``[n, Hk, D]`` (its block-table ``row``)."""
    layout = arena.layout
    sink, recent, freqs = layout.sink, layout.recent, layout.freqs
    n_new = n_old + key.shape[0]
    dev = key.device
    positions = torch.arange(n_old, n_new, device=dev)
    slots = arena.slot_bytes(row.expand(positions.numel(), -1), positions)
    # Position ranges from host ints: boolean indexing of device tensors would wait for the GPU
    # several times per head and layer.
    first, last = max(sink, n_old - recent), max(max(sink, n_old - recent), n_new - recent)
    entering_old = torch.arange(first, max(first, min(last, n_old)), device=dev)
    entering_new = torch.arange(max(first, n_old), max(last, n_old), device=dev) - n_old  # step rows
    ringed = torch.cat([torch.arange(n_old, max(n_old, min(sink, n_new)), device=dev),
                        torch.arange(min(max(n_old, n_new - recent, sink), n_new), n_new, device=dev)])
    was, now = layout.is_compressed(n_old), layout.is_compressed(n_new)
    rows = row[None]
    stat_rows = torch.arange(2 * freqs, 2 * freqs + len(STAT_ROWS), device=dev)[None]
    coef_rows = torch.arange(2 * freqs, device=dev)[None]
    kept_dims, compressed_dims = layout.dims_on(dev)
    for kind, x in zip(KINDS, (key, value)):
        for h in range(layout.num_kv_heads):
            arena.write_kept(layer, kind, h, slots, x[:, h, kept_dims[layer][kind][h]])
            coef_item, ring_item = layout.coef[layer][kind][h], layout.ring[layer][kind][h]
            if coef_item is None:
                continue
            dims = compressed_dims[layer][kind][h]
            new = x[:, h, dims]
            if n_old == 0:
                stats = initial_stats(dims.numel(), dev)
            else:
                stats = arena.read_rows(coef_item, rows, stat_rows, torch.float32)[0]
            if last > first:
                parts = [arena.read_rows(ring_item, rows, layout.ring_index(entering_old)[None], layout.dtype)[0],
                         new[entering_new]]
                enter = torch.cat(parts).float()
                stats[SUM] += enter.sum(0)
                stats[MIN] = torch.minimum(stats[MIN], enter.amin(0))
                stats[MAX] = torch.maximum(stats[MAX], enter.amax(0))
                start = first - sink
                if now:
                    if was:
                        coef = arena.read_rows(coef_item, rows, coef_rows, torch.float32)[0]
                        coef += spectral.project(enter, window, freqs, start)
                    else:  # the middle outgrows 2k: the exact pre-compression middle is projected whole
                        middle = torch.arange(start, device=dev)[None]
                        before = arena.read_middle(coef_item, rows, middle)[0].float()
                        coef = spectral.project(torch.cat([before, enter]), window, freqs)
                    arena.write_rows(coef_item, rows, coef_rows, coef[None])
                    if prefill or not was:
                        fit_normalization(stats, coef, layout.middle_length(n_new), window)
                else:
                    entering = torch.arange(first, last, device=dev)
                    arena.write_middle(coef_item, rows, (entering - sink)[None], enter[None])
            arena.write_rows(coef_item, rows, stat_rows, stats[None])
            if ringed.numel():
                arena.write_rows(ring_item, rows, layout.ring_index(ringed)[None],
                                 new[ringed - n_old][None].to(layout.dtype))


def visible(arena: CacheArena, layer: int, row: torch.Tensor, n: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[n, Hk, D]`` (float32) attention sees of a request's ``n`` cached tokens."""
    layout = arena.layout
    sink, freqs = layout.sink, layout.freqs
    dev = row.device
    sizes = {"k": layout.head_size, "v": layout.head_size_v}
    out = {kind: torch.zeros(n, layout.num_kv_heads, sizes[kind], device=dev) for kind in KINDS}
    if n == 0:
        return out["k"], out["v"]
    positions = torch.arange(n, device=dev)
    slots = arena.slot_bytes(row.expand(n, -1), positions)
    exact = torch.cat([torch.arange(min(sink, n), device=dev),
                       torch.arange(min(max(sink, n - layout.recent), n), n, device=dev)])
    length = layout.middle_length(n)
    rows = row[None]
    kept_dims, compressed_dims = layout.dims_on(dev)
    for kind in KINDS:
        for h in range(layout.num_kv_heads):
            head = out[kind][:, h]
            head[:, kept_dims[layer][kind][h]] = arena.read_kept(layer, kind, h, slots).float()
            coef_item, ring_item = layout.coef[layer][kind][h], layout.ring[layer][kind][h]
            if coef_item is None:
                continue
            dims = compressed_dims[layer][kind][h]
            head[exact[:, None], dims[None, :]] = arena.read_rows(
                ring_item, rows, layout.ring_index(exact)[None], layout.dtype)[0].float()
            if not length:
                continue
            if layout.is_compressed(n):
                stored = arena.read_rows(coef_item, rows, torch.arange(2 * freqs + len(STAT_ROWS), device=dev)[None],
                                         torch.float32)[0]
                coef, stats = stored[: 2 * freqs], stored[2 * freqs :]
                middle = spectral.reconstruct(coef, length, window) * stats[SCALE] + stats[OFFSET]
            else:
                middle = arena.read_middle(coef_item, rows, torch.arange(length, device=dev)[None])[0].float()
            head[sink : sink + length, dims] = middle
    return out["k"], out["v"]
