"""TreeKV's Triton decode kernel against its torch specification, in Triton's interpreter on CPU.

The pages are strided views into a packed uint8 cache, as the backend passes them; the cases cover
a query group that is not a power of two (SmolLM2's 3), rank-position re-rotation, bfloat16, one
request with a single entry, and entry lists long enough to be split across programs.
"""

import pytest
import torch

from kvfold.attention_backends.treekv.kernels import decode_attention, decode_attention_torch
from kvfold.attention_backends.treekv.pages import PageViews, content_bytes


@pytest.mark.triton
@pytest.mark.parametrize(("dtype", "group", "head_size", "rotate"), [
    (torch.float32, 3, 64, False), (torch.float32, 2, 64, True), (torch.bfloat16, 4, 128, False),
    (torch.bfloat16, 1, 64, True)])
def test_kernel_equals_the_torch_specification(dtype, group, head_size, rotate) -> None:
    check_case(dtype, group, head_size, rotate, "cpu")


CASES = [(torch.float32, 3, 64, False), (torch.float32, 2, 64, True), (torch.bfloat16, 4, 128, False),
         (torch.bfloat16, 1, 64, True)]


def check_case(dtype: torch.dtype, group: int, head_size: int, rotate: bool, device: str) -> float:
    """Kernel vs specification on ``device``; returns the largest output difference."""
    g = torch.Generator().manual_seed(0)
    heads, block_size, blocks, reqs, width = 2, 16, 40, 3, 150
    cache = torch.zeros(blocks, heads, block_size, content_bytes(head_size, head_size, dtype), dtype=torch.uint8,
                        device=device)
    pages = PageViews.of(cache, head_size, head_size, dtype)
    pages.k.copy_(torch.randn(pages.k.shape, generator=g).to(device))
    pages.v.copy_(torch.randn(pages.v.shape, generator=g).to(device))
    entries = torch.stack([
        torch.stack([torch.randperm(blocks * block_size, generator=g)[:width] for _ in range(heads)])
        for _ in range(reqs)
    ]).to(device, torch.int32)
    lengths = torch.tensor([width, 70, 1], device=device)
    query = torch.randn(reqs, heads * group, head_size, generator=g).to(device, dtype)
    delta = inv_freq = None
    if rotate:
        delta = torch.randint(-3000, 3000, (reqs, heads, width), generator=g).to(device)
        inv_freq = 1.0 / 10000 ** (torch.arange(0, head_size, 2).float() / head_size)

    out, probs = decode_attention(query, pages.k, pages.v, entries, lengths, 0.125, delta, inv_freq)
    want_out, want_probs = decode_attention_torch(query, pages.k, pages.v, entries, lengths, 0.125, delta, inv_freq)

    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output is rounded to bf16
    torch.testing.assert_close(out.float(), want_out.float(), atol=tol, rtol=tol)
    # On the GPU, bf16 with rotation scores rotated float32 keys with TF32 dots (~1e-3 relative).
    ptol = 2e-4 if dtype == torch.bfloat16 and device != "cpu" else 1e-6
    torch.testing.assert_close(probs, want_probs, atol=ptol, rtol=1e-3 if ptol > 1e-6 else 1e-5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(reqs, heads, device=device))
    assert (probs[1, :, 70:] == 0).all() and (probs[2, :, 1:] == 0).all()
    return float((out.float() - want_out.float()).abs().max())
