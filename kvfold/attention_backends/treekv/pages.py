"""The TreeKV page: per slot and KV head ``K | V | position | score_sum | count | cursor``.

All TreeKV state lives in vLLM's KV memory, in the request's own blocks: the entries a head keeps,
their original positions (``-1`` marks a free slot), the attention they received, and the tree
cursor (stored with every entry, so any entry of a head tells it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

META_BYTES = 16  # position int32, score_sum f32, count f32, cursor int32


def content_bytes(head_size: int, head_size_v: int, dtype: torch.dtype) -> int:
    return (head_size + head_size_v) * dtype.itemsize + META_BYTES


@dataclass
class PageViews:
    """Typed views of a uint8 ``[blocks, heads, slots, content]`` cache; indexing writes through."""

    raw: torch.Tensor  # the cache itself: moving an entry copies its whole content row
    k: torch.Tensor
    v: torch.Tensor
    position: torch.Tensor
    score_sum: torch.Tensor
    count: torch.Tensor
    cursor: torch.Tensor

    @classmethod
    def of(cls, cache: torch.Tensor, head_size: int, head_size_v: int, dtype: torch.dtype) -> PageViews:
        k_end = head_size * dtype.itemsize
        v_end = k_end + head_size_v * dtype.itemsize
        meta = cache[..., v_end : v_end + META_BYTES]
        return cls(
            raw=cache,
            k=cache[..., :k_end].view(dtype),
            v=cache[..., k_end:v_end].view(dtype),
            position=meta[..., 0:4].view(torch.int32)[..., 0],
            score_sum=meta[..., 4:8].view(torch.float32)[..., 0],
            count=meta[..., 8:12].view(torch.float32)[..., 0],
            cursor=meta[..., 12:16].view(torch.int32)[..., 0],
        )
