"""Reads and writes of vLLM's paged KV cache through ``slot_mapping`` and ``block_table``.

vLLM hands each layer a logical ``[num_blocks, num_heads, block_size, content]`` view whose physical
order depends on the KV-cache layout it resolved (LBHNC, LBNHC, ...). Everything here indexes the
logical dims only, so it is correct for every layout.
"""

from __future__ import annotations

import torch

PAD_SLOT_ID = -1


def write_tokens(cache: torch.Tensor, slot_mapping: torch.Tensor, rows: torch.Tensor) -> None:
    """Store ``rows[t]`` (``[T, H, C]``) at slot ``slot_mapping[t]``; padding slots (-1) are skipped."""
    slots = slot_mapping[: rows.shape[0]]
    rows = rows[: slots.shape[0]]  # padded tokens beyond the slot mapping have no slot
    keep = slots != PAD_SLOT_ID
    if not bool(keep.all()):
        slots, rows = slots[keep], rows[keep]
    block_size = cache.shape[2]
    # Two advanced indices around a slice put the token dim first: cache[b, :, o] is [T, H, C].
    cache[slots // block_size, :, slots % block_size] = rows.to(cache.dtype)


def gather_tokens(cache: torch.Tensor, block_row: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The first ``num_tokens`` entries of one request, in position order: ``[num_tokens, H, C]``."""
    block_size = cache.shape[2]
    num_blocks = -(-num_tokens // block_size)
    pages = cache[block_row[:num_blocks].long()]  # [nb, H, N, C]
    return pages.transpose(1, 2).reshape(num_blocks * block_size, cache.shape[1], -1)[:num_tokens]
