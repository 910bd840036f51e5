"""Dense causal attention with grouped-query heads: the math every kvfold method is compared to."""

from __future__ import annotations

import torch


def causal_gqa_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    num_computed: int,
) -> torch.Tensor:
    """Attention of ``query`` ``[Tq, Hq, D]`` over ``key``/``value`` ``[Tk, Hk, D(v)]``, in float32.

    Query token ``i`` sits at position ``num_computed + i`` and sees keys ``0 .. num_computed + i``
    (chunked prefill and decode are the same computation with ``num_computed > 0``). Query head
    ``h`` reads KV head ``h // (Hq // Hk)``, as in vLLM's GQA layout.
    """
    num_q, num_heads, _ = query.shape
    num_k, num_kv_heads, head_size_v = value.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads cannot share {num_kv_heads} KV heads")
    if num_computed + num_q != num_k:
        raise ValueError(f"{num_computed} cached + {num_q} new tokens != {num_k} keys")
    group = num_heads // num_kv_heads
    q = query.float().view(num_q, num_kv_heads, group, -1)
    scores = torch.einsum("qhgd,khd->hgqk", q, key.float()) * scale
    q_pos = torch.arange(num_q, device=query.device)[:, None] + num_computed
    k_pos = torch.arange(num_k, device=query.device)[None, :]
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("hgqk,khd->qhgd", probs, value.float())
    return out.reshape(num_q, num_heads, head_size_v)
