"""One TreeKV decode step for every decoding request of a batch at once, in slot space.

The per-request path (``backend.TreeKVImpl._request_step``) reads a request's entries into a dense
cache, runs the reference and writes the kept ones back: exact, but a few dozen small operations per
request and layer. A decode step changes little: one new token per head, one eviction per head,
and, once per block of steps, the entries of the block leaving the window move into free slots.
This module does that for all decoding requests with batched tensor operations over the requests'
live slots, and the attention in :func:`kernels.decode_attention` (Triton on the GPU). It must keep
the same entries in the same slots as the per-request path; the tests hold it to that.

Slots that belong to no request (padding of the batched index tensors) are redirected to slot 0 of
block 0, vLLM's null block, which no request owns: writes there are harmless and never read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvfold.attention_backends.paged.transfer import to_device
from kvfold.attention_backends.treekv.kernels import decode_attention
from kvfold.attention_backends.treekv.options import TreeKVOptions
from kvfold.attention_backends.treekv.pages import PageViews

NULL_SLOT = 0


@dataclass
class DecodeBatch:
    """The decoding requests of a step and their live slots; the same for every layer of a step."""

    rows: torch.Tensor  # [R] token rows of query/key/value (on the device)
    seq_lens: torch.Tensor  # [R] KV length after the step (on the device)
    new_slots: torch.Tensor  # [R] where vLLM put each request's new token
    slots: torch.Tensor  # [R, S] slots of the blocks vLLM still holds, in natural order
    natural: torch.Tensor  # [R, S] their positions in the sequence
    in_range: torch.Tensor  # [R, S] positions below the sequence length

    @classmethod
    def build(
        cls,
        rows: list[int],
        seq_lens: list[int],
        block_table: torch.Tensor,
        slot_mapping: torch.Tensor,
        budget: int,
        block_size: int,
        min_width: int,
        padded: int | None = None,
    ) -> DecodeBatch:
        """``block_table`` ``[R, max_blocks]`` holds the decoding requests' rows.

        ``S`` is fixed by the budget (at least ``min_width``, so the pair at the cursor can always
        be indexed), and the batch is padded to ``padded`` requests of length 0 (row 0, every slot
        the null slot), so a step's shapes depend only on ``padded``: the step can be replayed as a
        CUDA graph. Sizes come from the host copies, so building costs no device sync.
        """
        dev = block_table.device
        num_reqs = len(rows)
        padded = max(padded or num_reqs, num_reqs)
        seq = torch.tensor(list(seq_lens) + [0] * (padded - num_reqs), dtype=torch.long)
        # The window manager released the blocks lying wholly more than `budget` behind num_old,
        # so at most budget + block_size positions are live.
        first = ((seq - 1 - budget).clamp(min=0) // block_size) * block_size
        width = max(budget + block_size, min_width)
        first, seq = to_device(first, dev), to_device(seq, dev)
        natural = first[:, None] + torch.arange(width, device=dev)
        in_range = natural < seq[:, None]
        table = torch.zeros(padded, block_table.shape[1], dtype=block_table.dtype, device=dev)
        table[:num_reqs] = block_table
        column = (natural // block_size).clamp(max=block_table.shape[1] - 1)
        blocks = table.long().gather(1, column)
        slots = torch.where(in_range, blocks * block_size + natural % block_size, NULL_SLOT)
        rows_t = to_device(torch.tensor(list(rows) + [0] * (padded - num_reqs)), dev)
        new_slots = torch.where(torch.arange(padded, device=dev) < num_reqs,
                                slot_mapping[rows_t].long(), NULL_SLOT)
        return cls(rows_t, seq, new_slots, slots, natural, in_range)

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """What :func:`decode_batch` reads of the batch, in :meth:`of` order."""
        return self.seq_lens, self.new_slots, self.slots, self.natural, self.in_range


def decode_batch(
    pages: PageViews,
    batch: DecodeBatch,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    options: TreeKVOptions,
    scale: float,
    inv_freq: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attend and evict for ``R`` decoding requests (``query`` ``[R, Hq, D]``, ``key`` ``[R, Hk, D]``).

    Returns the attention output ``[R, Hq, Dv]`` and, per request, whether a token was evicted
    (per KV head, so the number of tokens evicted is its sum).
    """
    heads = pages.position.shape[1]
    block_size = pages.position.shape[2]
    dev = query.device
    h = torch.arange(heads, device=dev)[None, :, None]
    seq = batch.seq_lens

    # 1. Store the new token for every head.
    nb, no = batch.new_slots.long() // block_size, batch.new_slots.long() % block_size
    pages.k[nb, :, no] = key.to(pages.k.dtype)
    pages.v[nb, :, no] = value.to(pages.v.dtype)
    pages.position[nb, :, no] = (seq - 1).to(torch.int32)[:, None]
    # Assigned values are device tensors: a Python scalar would be copied from the host, which a
    # CUDA graph cannot capture.
    zero = torch.zeros((), device=dev)
    pages.score_sum[nb, :, no] = zero
    pages.count[nb, :, no] = zero

    # 2. Each head's entries among the live slots, oldest first (their rank order).
    slots, natural, in_range = batch.slots, batch.natural, batch.in_range
    sb, so = (slots // block_size)[:, None, :], (slots % block_size)[:, None, :]
    position = pages.position[sb, h, so]  # [R, Hk, S]
    valid = in_range[:, None, :] & (position >= 0)
    sentinel = torch.iinfo(torch.int32).max
    ordered_pos, order = torch.where(valid, position, sentinel).sort(dim=-1)
    entries = slots[:, None, :].expand_as(order).gather(-1, order)
    lengths = valid[:, 0].sum(-1)  # every head holds the same number of entries
    ranks = torch.arange(order.shape[-1], device=dev)
    held = ranks < lengths[:, None, None]
    entries = torch.where(held, entries, NULL_SLOT)

    # 3. Attention (rank positions: key at rank j sits j - (n - 1) from the query).
    delta = None
    if options.positions == "rank":
        delta = (seq[:, None, None] - 1 - ordered_pos.long()) - (lengths[:, None, None] - 1 - ranks)
        delta = torch.where(held, delta, 0)
    out, probs = decode_attention(
        query, pages.k, pages.v, entries.to(torch.int32), lengths, scale, delta, inv_freq
    )

    # 4. Attention received, then the pair rule at the cursor where the cache overflows.
    eb, eo = entries // block_size, entries % block_size
    score = torch.where(held, pages.score_sum[eb, h, eo] + probs, 0.0)
    count = torch.where(held, pages.count[eb, h, eo] + 1.0, 0.0)
    pages.score_sum[eb, h, eo] = score
    pages.count[eb, h, eo] = count
    over = lengths > options.budget  # [R]
    cursor = pages.cursor[eb[:, 0, 0], 0, eo[:, 0, 0]].long().clamp(0, options.tree - 1)
    cursor = torch.where(over, cursor, 0) if over.numel() else cursor
    left = (options.sink + cursor)[:, None, None].expand(-1, heads, 1)
    average = score / count.clamp(min=1.0)
    pair = average.gather(-1, left), average.gather(-1, left + 1)
    dropped = torch.where(pair[0] > pair[1], left + 1, left)  # [R, Hk, 1] rank of the dropped entry
    dropped_slot = torch.where(over[:, None, None], entries.gather(-1, dropped), NULL_SLOT)
    pages.position[dropped_slot // block_size, h, dropped_slot % block_size] = torch.full(
        (), -1, dtype=torch.int32, device=dev)
    kept = held & ~((ranks == dropped) & over[:, None, None])
    next_cursor = torch.where(over, (cursor + 1) % options.tree, cursor)
    # The cursor is read from a head's oldest entry; the two oldest carry it (the oldest may be
    # the one dropped when there is no sink). Moves copy it along with the entry.
    first = torch.where(kept[..., :2], eb[..., :2] * block_size + eo[..., :2], NULL_SLOT)
    pages.cursor[first // block_size, h, first % block_size] = next_cursor[:, None, None].to(torch.int32)

    # 5. Entries in the block the next step releases move to free slots of surviving blocks,
    #    the k-th mover (in rank order) to the k-th free slot (in natural order). That block is
    #    the only one between the live and the surviving range, so at most block_size entries per
    #    head move: only those columns are copied.
    boundary = ((seq - options.budget).clamp(min=0) // block_size) * block_size  # first surviving
    surviving = in_range & (natural >= boundary[:, None])  # [R, S]
    natural_order = natural[:, None, :].expand_as(order).gather(-1, order)
    movers = kept & (natural_order < boundary[:, None, None])
    position_after = torch.where(valid, position, -1)
    dropped_column = order.gather(-1, dropped)  # where the dropped entry sits in natural order
    position_after.scatter_(-1, dropped_column, torch.where(
        over[:, None, None], -1, position_after.gather(-1, dropped_column)))
    free = surviving[:, None, :] & (position_after < 0)
    free_first = (~free).to(torch.int8).argsort(dim=-1, stable=True)
    mover_rank = (movers.cumsum(-1) - 1).clamp(min=0)
    width = min(block_size, movers.shape[-1])
    columns = (~movers).to(torch.int8).argsort(dim=-1, stable=True)[..., :width]  # movers first
    moving = movers.gather(-1, columns)
    target_column = free_first.gather(-1, mover_rank.gather(-1, columns))
    slots_h = slots[:, None, :].expand(-1, heads, -1)
    target = torch.where(moving, slots_h.gather(-1, target_column), NULL_SLOT)
    source = torch.where(moving, entries.gather(-1, columns), NULL_SLOT)
    tb, to = target // block_size, target % block_size
    fb, fo = source // block_size, source % block_size
    pages.raw[tb, h, to] = pages.raw[fb, h, fo]
    pages.position[fb, h, fo] = torch.where(moving, -1, pages.position[fb, h, fo])
    return out, over
