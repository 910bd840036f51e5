"""The reference attention against PyTorch's SDPA, and chunked prefill against whole prefill."""

import pytest
import torch
import torch.nn.functional as F

from kvfold.attention_backends.paged.attention import causal_gqa_attention


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=scale
    )
    return out.transpose(0, 1)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (9, 3)])
def test_prefill_matches_sdpa(heads: int, kv_heads: int) -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(33, heads, 64), torch.randn(33, kv_heads, 64), torch.randn(33, kv_heads, 64)
    torch.testing.assert_close(causal_gqa_attention(q, k, v, 0.125, 0), sdpa(q, k, v, 0.125))


def test_chunks_and_decode_equal_whole_prefill() -> None:
    torch.manual_seed(1)
    q, k, v = torch.randn(40, 8, 32), torch.randn(40, 2, 32), torch.randn(40, 2, 32)
    whole = causal_gqa_attention(q, k, v, 0.2, 0)
    for start, end in [(0, 16), (16, 39), (39, 40)]:  # two prefill chunks, then one decode step
        chunk = causal_gqa_attention(q[start:end], k[:end], v[:end], 0.2, start)
        torch.testing.assert_close(chunk, whole[start:end])


def test_inconsistent_shapes_are_refused() -> None:
    q, k = torch.randn(4, 6, 8), torch.randn(4, 4, 8)
    with pytest.raises(ValueError, match="cannot share"):
        causal_gqa_attention(q, k, k, 1.0, 0)
    with pytest.raises(ValueError, match="cached"):
        causal_gqa_attention(q, torch.randn(5, 2, 8), torch.randn(5, 2, 8), 1.0, 0)
