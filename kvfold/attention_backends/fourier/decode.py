"""A decode step of all decoding requests of a layer at once, through :mod:`kernels` (CUDA, or the
Triton interpreter): the batched form of ``paged.write_request`` + attention over the new cache.

Per request the new token's kept dims go to its slot and its compressed dims to the ring, after
the token leaving the recent window was read from the same ring row; that token updates the
running statistics and either the exact pre-compression middle or, inside the kernels, the
coefficients. A request whose middle is compressed for the first time in this step, or whose
first token this is, takes the per-request path (``write.write_heads``) for its write.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvfold.attention_backends.fourier import kernels, spectral
from kvfold.attention_backends.fourier.arena import CacheArena
from kvfold.attention_backends.fourier.layout import KINDS, STAT_ROWS, FourierLayout, Item
from kvfold.attention_backends.fourier.paged import MAX, MIN, OFFSET, SCALE, SUM
from kvfold.attention_backends.paged.transfer import to_device

UPDATE, COMPRESSED = 1, 2  # request flags of the kernels


@dataclass
class HeadTables:
    """One layer's per-KV-head addressing, as tensors on the cache's device."""

    table: torch.Tensor  # [H, kernels.TABLE_COLUMNS] int64
    kept: dict[str, torch.Tensor]  # [H, W] dims kept per token (padded with the head size)
    compressed: dict[str, torch.Tensor]  # [H, Dc] compressed dims (padded with the head size)
    kept_flat: dict[str, torch.Tensor]  # [sum W] element offsets of every kept dim from a slot
    kept_cols: dict[str, torch.Tensor]  # [sum W] the same dims as columns of [H * D]
    width: dict[str, int]  # widest kept segment / compressed set of the layer, per kind ("kk", "ck", ...)
    items: dict[tuple[str, bool], tuple[torch.Tensor, ...]]  # (kind, coef): [1, H, 1] first page,
    # rows per page, row bytes; shaped to broadcast over [R, H, rows]
    valid: dict[str, torch.Tensor]  # [H, Dc]: which padded compressed dims a head really has
    dummy: int  # a byte address nothing reads (vLLM's null block 0): where masked lanes go

    @classmethod
    def build(cls, arena: CacheArena, layer: int) -> HeadTables:
        layout = arena.layout
        dev = arena.base.device
        heads = layout.num_kv_heads
        rows = []
        for h in range(heads):
            row = []
            for kind in KINDS:
                seg = layout.segments[layer][kind][h]
                row += [int(arena.base[seg.view]) + seg.offset, seg.width]
            for items in (layout.ring, layout.coef):
                for kind in KINDS:
                    item: Item | None = items[layer][kind][h]
                    # A head without compressed dims has no item: every row maps to page 0,
                    # read masked (width 0), so no address leaves the arena.
                    row += [0, 1 << 40, 0, 0] if item is None else [
                        item.first_page, item.rows_per_page, item.row_bytes, item.width]
            rows.append(row)
        sizes = {"k": layout.head_size, "v": layout.head_size_v}
        kept, compressed, kept_flat, kept_cols, width = {}, {}, {}, {}, {}
        for kind in KINDS:
            for name, table, store in (("k", layout.kept, kept), ("c", layout.compressed, compressed)):
                dims = table[layer][kind]
                wide = max(d.numel() for d in dims)
                width[name + kind] = wide
                store[kind] = torch.stack([torch.nn.functional.pad(d, (0, wide - d.numel()), value=sizes[kind])
                                           for d in dims]).to(dev)
            flat, cols = [], []
            for h, dims in enumerate(layout.kept[layer][kind]):
                seg = layout.segments[layer][kind][h]
                start = (int(arena.base[seg.view]) + seg.offset) // layout.elem
                flat.append(start + torch.arange(seg.width))
                cols.append(h * sizes[kind] + dims)
            kept_flat[kind], kept_cols[kind] = torch.cat(flat).to(dev), torch.cat(cols).to(dev)
        table = torch.tensor(rows, dtype=torch.int64, device=dev)
        items, valid = {}, {}
        for kind in KINDS:
            for coef in (False, True):
                start = (kernels.COEF_K if kind == "k" else kernels.COEF_V) if coef else \
                    (kernels.RING_K if kind == "k" else kernels.RING_V)
                items[(kind, coef)] = tuple(table[None, :, start + i, None] for i in range(3))
            ring = kernels.RING_K if kind == "k" else kernels.RING_V
            valid[kind] = torch.arange(width["c" + kind], device=dev)[None, :] < table[:, ring + 3, None]
        return cls(table, kept, compressed, kept_flat, kept_cols, width, items, valid, int(arena.base[0]))


def row_addresses(arena: CacheArena, tables: HeadTables, kind: str, coef: bool, rows: torch.Tensor,
                  which: torch.Tensor) -> torch.Tensor:
    """Byte addresses ``[R, H, m]`` of state rows ``which`` (``[R, H, m]`` or broadcastable) of every head."""
    first, per_page, row_bytes = tables.items[(kind, coef)]
    page = first + which // per_page
    # Rows past an item (of requests a caller masks out) would name pages past the arena.
    view = (page // arena.layout.reserved_blocks).clamp(max=arena.layout.num_layers - 1)
    column = page % arena.layout.reserved_blocks
    blocks = rows.gather(1, column.flatten(1)).view(column.shape).long()
    return arena.base[view] + blocks * arena.block_stride + (which % per_page) * row_bytes


def gather_dims(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` ``[R, H, (G,) D]`` at per-head dims ``index`` ``[H, W]`` (pads read zero)."""
    padded = torch.nn.functional.pad(x, (0, 1))
    if x.dim() == 4:
        return padded.gather(-1, index[None, :, None, :].expand(x.shape[0], -1, x.shape[2], -1))
    return padded.gather(-1, index[None].expand(x.shape[0], -1, -1))


# The step's shapes and launch grids follow the longest request rounded up to this many tokens,
# so a CUDA graph of the step serves this many steps of growth.
LONGEST_STEP = 1024


@dataclass(frozen=True)
class StepPlan:
    """A decode batch as the host sees it: who writes alone, the per-request scalars the device
    needs (``[4, R]``: KV length, batched write, compressed before the step, kernel flags) and
    the static sizes the step's shapes depend on (:func:`decode_core`'s keywords)."""

    alone: list[int]
    per_request: torch.Tensor
    static: dict[str, int]


def plan_step(layout: FourierLayout, seq_lens: list[int], window: int, padded: int | None = None) -> StepPlan:
    """``seq_lens`` include the new token. ``padded``: the batch size the step runs at; the extra
    requests hold one token, write nothing and have no compressed middle (their outputs are
    discarded), and the sizes are rounded up (:data:`LONGEST_STEP`) so that steps share shapes."""
    was = [layout.is_compressed(n - 1) for n in seq_lens]
    now = [layout.is_compressed(n) for n in seq_lens]
    alone = [n == 1 or (c and not w) for n, w, c in zip(seq_lens, was, now)]
    pad = (padded or len(seq_lens)) - len(seq_lens)
    per_request = torch.tensor(
        [seq_lens + [1] * pad, [not a for a in alone] + [False] * pad, was + [False] * pad,
         [UPDATE * (w and not a) + COMPRESSED * c for w, c, a in zip(was, now, alone)] + [0] * pad])
    longest = max(seq_lens)
    if padded is not None:
        # Never past the window's reach: the middle's FFT covers `window` positions.
        longest = min(-(-longest // LONGEST_STEP) * LONGEST_STEP, window + layout.sink + layout.recent)
    exact = layout.sink + layout.recent
    if not all(now):  # a middle not yet compressed is read exactly too
        exact = min(longest, exact + 2 * layout.freqs) if padded is not None else \
            max(n for n, c in zip(seq_lens, now) if not c)
    static = {"longest": longest, "exact": exact,
              "middle_end": layout.sink + layout.middle_length(longest) if any(now) else 0}
    return StepPlan([i for i, a in enumerate(alone) if a], per_request, static)


def decode_step(
    arena: CacheArena,
    tables: HeadTables,
    layer: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rows: torch.Tensor,
    seq_lens: list[int],
    *,
    scale: float,
    window: int,
) -> torch.Tensor:
    """Outputs ``[R, Hq, Dv]`` (float32) of one new token per request; ``seq_lens`` include it.
    Eager: the backend replays :func:`decode_core` as a CUDA graph instead (``step.attend_step``)."""
    plan = plan_step(arena.layout, seq_lens, window)
    write_alone(arena, tables, plan, rows, key, value, seq_lens, window)
    return decode_core(arena, tables, layer, query, key, value, rows, to_device(plan.per_request, query.device),
                       scale=scale, window=window, **plan.static)


def write_alone(arena: CacheArena, tables: HeadTables, plan: StepPlan, rows: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, seq_lens: list[int], window: int) -> None:
    """Requests whose middle is compressed for the first time in this step, or whose first token
    this is, store it through the per-request path (``write.write_heads``)."""
    from kvfold.attention_backends.fourier.write import write_heads  # write imports this module

    for i in plan.alone:
        write_heads(arena, tables, rows[i], key[i : i + 1], value[i : i + 1], seq_lens[i] - 1,
                    prefill=False, window=window)


def decode_core(
    arena: CacheArena,
    tables: HeadTables,
    layer: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rows: torch.Tensor,
    per_request: torch.Tensor,
    *,
    scale: float,
    window: int,
    longest: int,
    exact: int,
    middle_end: int,
) -> torch.Tensor:
    """The step on the device alone, free of host syncs: its shapes follow the keywords only
    (:class:`StepPlan`), so it can be captured and replayed as a CUDA graph."""
    layout = arena.layout
    sink, recent, freqs = layout.sink, layout.recent, layout.freqs
    dev = query.device
    num_reqs, num_heads, _ = query.shape
    heads = layout.num_kv_heads
    group = num_heads // heads
    n, batched, flags = per_request[0], per_request[1].bool(), per_request[3].to(torch.int32)
    enter = write_batched(arena, tables, layer, key, value, rows, n, batched, per_request[2].bool())

    stats = {kind: read_stats(arena, tables, kind, rows, SCALE, 2) for kind in KINDS}
    q = query.float().view(num_reqs, heads, group, -1)
    q_c = gather_dims(q, tables.compressed["k"])  # [R, H, G, Dc]
    q_k = gather_dims(q, tables.kept["k"])
    seq = n.to(torch.int32)
    cache32 = arena.typed(torch.float32)
    common = dict(reserved=layout.reserved_blocks, block_stride=arena.block_stride, sink=sink,
                  recent=recent, window=window)
    weights = (q_c * stats["k"][:, :, None, 0]).reshape(num_reqs, num_heads, -1)
    z = kernels.coef_pass(cache32, rows, arena.base, tables.table, seq, flags, enter["k"],
                          pad_to(weights, kernels.pow2(weights.shape[-1])), item=kernels.COEF_K,
                          group=group, rows=2 * freqs, width=tables.width["ck"], project=True, **common)
    const = (q_c * stats["k"][:, :, None, 1]).sum(-1).reshape(num_reqs, num_heads)
    middle = layout.middle_length(longest)
    log2 = kernels.scaled_log2(scale)
    # The kernel wants scores times log2(e) * scale; scaling z and const (not the [R, Hq, L] scores)
    # saves a pass over the step's largest tensor.
    spec = torch.zeros(num_reqs, num_heads, kernels.round_up(longest, max(64, kernels.BLOCK_N)), device=dev)
    if middle:
        spec[..., sink : sink + middle] = spectral.synthesize(z * log2, middle, window) + (const * log2)[..., None]
    p, tile_max, acc_k, acc_c, m, l = kernels.decode_pass(  # noqa: E741
        arena.typed(layout.dtype), rows, arena.base, tables.table, seq, flags,
        pad_to(q_k.reshape(num_reqs, num_heads, -1) * log2, kernels.pow2(tables.width["kk"])),
        pad_to(q_c.reshape(num_reqs, num_heads, -1) * log2, kernels.pow2(tables.width["ck"])),
        spec, group=group, longest=longest, reserved=layout.reserved_blocks,
        longest_middle_end=middle_end, longest_exact=exact,
        block_size=layout.block_size, block_stride=arena.block_stride, slot_stride=arena.slot_stride,
        sink=sink, recent=recent, per=layout.middle_per_row,
        widths=(tables.width["kk"], tables.width["ck"], tables.width["kv"], tables.width["cv"]))

    top = m.amax(-1)
    alpha = torch.exp2(m - top[..., None])
    total = (l * alpha).sum(-1)
    kept_out = (acc_k * alpha[..., None]).sum(2) / total[..., None]
    exact_out = (acc_c * alpha[..., None]).sum(2) / total[..., None]
    # Each exported probability is relative to its tile's running max: rescaled per tile through a
    # view, without a [R, Hq, L] tensor of factors.
    tiles = p.shape[-1] // kernels.BLOCK_N
    factor = torch.exp2(tile_max[..., :tiles] - top[..., None]) / total[..., None]
    probs = (p.view(num_reqs, num_heads, tiles, kernels.BLOCK_N) * factor[..., None]).flatten(2)[..., sink : sink + middle]
    spectral_out = torch.zeros(num_reqs, num_heads, tables.width["cv"], device=dev)
    if middle:
        w = spectral.analyze(probs, window, freqs)
        coeffed = kernels.coef_pass(cache32, rows, arena.base, tables.table, seq, flags, enter["v"], w,
                                    item=kernels.COEF_V, group=group, rows=2 * freqs,
                                    width=tables.width["cv"], project=False, **common)
        shape = (num_reqs, heads, group, -1)
        spectral_out = (coeffed.view(shape) / freqs * stats["v"][:, :, None, 0]
                        + probs.sum(-1).view(shape) * stats["v"][:, :, None, 1]).reshape(num_reqs, num_heads, -1)
    # A request not compressed (yet) has no spectral part; its statistics rows hold other data.
    spectral_out = torch.where(((flags & COMPRESSED) != 0)[:, None, None], spectral_out, 0.0)
    compressed_out = exact_out[..., : tables.width["cv"]] + spectral_out
    out = torch.zeros(num_reqs, heads, group, layout.head_size_v + 1, device=dev)
    for kind_out, index, width in ((kept_out, tables.kept["v"], tables.width["kv"]),
                                   (compressed_out, tables.compressed["v"], tables.width["cv"])):
        out.scatter_(-1, index[None, :, None, :].expand(num_reqs, -1, group, -1),
                     kind_out[..., :width].reshape(num_reqs, heads, group, width))
    return out[..., :-1].reshape(num_reqs, num_heads, -1)


def pad_to(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[-1])).contiguous()


def read_stats(arena: CacheArena, tables: HeadTables, kind: str, rows: torch.Tensor, first: int,
               count: int) -> torch.Tensor:
    """``[R, H, count, Dc]`` statistics rows ``first ..`` of every head (zeros beyond a head's dims)."""
    # arange, not a copy of host numbers: a CUDA graph would replay a copy from a freed host buffer.
    idx = torch.arange(2 * arena.layout.freqs + first, 2 * arena.layout.freqs + first + count,
                       device=rows.device)[None, None, :]
    addr = row_addresses(arena, tables, kind, True, rows, idx.expand(rows.shape[0], tables.table.shape[0], -1))
    return gather_state(arena.typed(torch.float32), addr // 4, tables, kind)


def gather_state(flat: torch.Tensor, start: torch.Tensor, tables: HeadTables, kind: str) -> torch.Tensor:
    """``[..., Dc]`` float32 from element offsets ``start`` ``[R, H, ...]``; a head's padding reads 0."""
    width = tables.width["c" + kind]
    index = start[..., None] + torch.arange(width, device=start.device)
    mask = tables.valid[kind].view(1, -1, *(1,) * (start.dim() - 2), width)
    dummy = tables.dummy // flat.element_size()
    return torch.where(mask, flat[torch.where(mask, index, dummy)].float(), 0.0)


def _scatter(flat: torch.Tensor, start: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
             dummy: int) -> None:
    """``flat[start + d] = values[..., d]`` where ``mask``; the other lanes write to ``dummy``."""
    index = start[..., None] + torch.arange(values.shape[-1], device=start.device)
    flat[torch.where(mask, index, dummy // flat.element_size())] = values.to(flat.dtype)


def write_batched(
    arena: CacheArena,
    tables: HeadTables,
    layer: int,
    key: torch.Tensor,
    value: torch.Tensor,
    rows: torch.Tensor,
    n: torch.Tensor,
    batched: torch.Tensor,
    was: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Store the new tokens of ``batched`` requests; returns each kind's entering token ``[R, H, Dc]``
    (float32, zero where none), which the kernels add to the coefficients of compressed requests."""
    layout = arena.layout
    sink, recent, freqs = layout.sink, layout.recent, layout.freqs
    num_reqs, heads = key.shape[0], layout.num_kv_heads
    position = n - 1
    slots = arena.slot_bytes(rows, position)
    flat = arena.typed(layout.dtype)
    flat32 = arena.typed(torch.float32)
    ring_row = layout.ring_index(position)
    entering = position - recent
    takes = batched & (entering >= sink)
    middle = (entering - sink).clamp(min=0)  # before the first compression: exact, in the coef rows
    per = layout.middle_per_row
    stat_rows = torch.arange(2 * freqs + SUM, 2 * freqs + MAX + 1, device=n.device)[None, None, :].expand(num_reqs, heads, -1)
    enter = {}
    for kind, x in zip(KINDS, (key, value)):
        kept = x.reshape(num_reqs, -1)[:, tables.kept_cols[kind]]
        cells = (slots // layout.elem)[:, None] + tables.kept_flat[kind][None, :]
        flat[torch.where(batched[:, None], cells, tables.dummy // layout.elem)] = kept.to(flat.dtype)
        valid = tables.valid[kind][None]
        ring = row_addresses(arena, tables, kind, False, rows, ring_row[:, None, None].expand(-1, heads, 1))[..., 0]
        entered = gather_state(flat, ring // layout.elem, tables, kind)  # the leaving token, read first
        entered = torch.where(takes[:, None, None], entered, 0.0)  # other rows may hold garbage
        enter[kind] = entered
        new = gather_dims(x.float(), tables.compressed[kind])
        _scatter(flat, ring // layout.elem, new, valid & batched[:, None, None], tables.dummy)
        addr = row_addresses(arena, tables, kind, True, rows, stat_rows)
        stats = gather_state(flat32, addr // 4, tables, kind)  # [R, H, 3, Dc]
        stats[:, :, 0] += entered
        stats[:, :, 1] = torch.minimum(stats[:, :, 1], entered)
        stats[:, :, 2] = torch.maximum(stats[:, :, 2], entered)
        _scatter(flat32, addr // 4, stats, (valid[:, :, None] & takes[:, None, None, None]).expand_as(stats),
                 tables.dummy)
        addr = row_addresses(arena, tables, kind, True, rows, (middle // per)[:, None, None].expand(-1, heads, 1))[..., 0]
        addr = addr + (middle % per)[:, None] * tables.table[None, :, (kernels.COEF_K if kind == "k" else kernels.COEF_V) + 3] * layout.elem
        _scatter(flat, addr // layout.elem, entered, valid & (takes & ~was)[:, None, None], tables.dummy)
    return enter


assert len(STAT_ROWS) == 5 and (SUM, MIN, MAX, SCALE, OFFSET) == (0, 1, 2, 3, 4)  # rows read as ranges
