"""Dense causal attention with grouped-query heads: the math every kvfold method is compared to."""

from __future__ import annotations

from functools import lru_cache

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


def prefill_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, computed: int
) -> torch.Tensor:
    """Causal GQA attention of a chunk over its past and itself.

    For methods whose chunks attend to K/V they rebuilt from compressed pages. CPU: the float32
    reference. CUDA, 16-bit models: vLLM's flash attention on the contiguous rebuilt K/V (the
    causal mask is bottom-right aligned, which is exactly "the chunk's rows are the last rows"), so
    memory stays O(context): torch SDPA with an explicit mask and GQA falls back to its math
    kernel and holds ``[Hq, chunk, context]`` scores, which ran a 32k-token
    prefill on an H100 out of memory. float32 models (GPU checks of tiny models) use SDPA.
    """
    if query.device.type != "cuda":
        return causal_gqa_attention(query, key, value, scale, computed)
    num_q, num_k = query.shape[0], key.shape[0]
    if query.dtype in (torch.float16, torch.bfloat16):
        from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func

        # [0, n] made on the device: a host list copied there would wait for the stream each layer.
        cu_q = torch.arange(2, dtype=torch.int32, device=query.device) * num_q
        cu_k = torch.arange(2, dtype=torch.int32, device=query.device) * num_k
        return flash_attn_varlen_func(
            q=query.contiguous(), k=key.to(query.dtype), v=value.to(query.dtype),
            max_seqlen_q=num_q, cu_seqlens_q=cu_q, max_seqlen_k=num_k, cu_seqlens_k=cu_k,
            softmax_scale=scale, causal=True, fa_version=_fa_version(query.shape[-1]),
        )
    mask = torch.arange(num_k, device=query.device)[None, :] <= (
        torch.arange(num_q, device=query.device)[:, None] + computed)
    out = torch.nn.functional.scaled_dot_product_attention(
        query.transpose(0, 1), key.to(query.dtype).transpose(0, 1), value.to(query.dtype).transpose(0, 1),
        attn_mask=mask, scale=scale, enable_gqa=True,
    )
    return out.transpose(0, 1)


@lru_cache(maxsize=None)
def _fa_version(head_size: int) -> int | None:
    from vllm.v1.attention.backends.fa_utils import get_flash_attn_version

    return get_flash_attn_version(head_size=head_size)
