"""VQKV's exact-token kernel (``ring.py``, Triton's interpreter) against the decode step's torch path.

A decode step over a paged cache laid out as the backend lays it out: random codes everywhere, the
ring entries written with ``pack_exact`` for every request, and requests whose ring is empty (one
token: a padded batch row), holds only sink tokens, is partly filled, full, or has wrapped several
times. The Triton step (codes and ring in one merge) must equal the specification's step (codes in
the kernel, ring gathered and attended in float32 torch, softmaxes merged).
"""

from __future__ import annotations

import pytest
import torch

from kvfold.attention_backends.vqkv import decode as vq_decode
from kvfold.attention_backends.vqkv import ring
from kvfold.attention_backends.vqkv.pages import PageLayout, write_cells
from kvfold.attention_backends.vqkv.reference import CODEBOOK_SIZE, LayerCodebooks, ResidualCodebook, rope_branches

BLOCK = 16
SEQ_LENS = [1, 3, 9, 40, 75, 300]  # with sink 4 and recent 28: empty, sink only, partial, full, wrapped


def books_for(head_size: int, groups: int, g: torch.Generator) -> LayerCodebooks:
    key = [ResidualCodebook(d, torch.randn(2, CODEBOOK_SIZE, d.numel(), generator=g) * 0.5)
           for d in rope_branches(head_size)]
    value = [ResidualCodebook(d, torch.randn(16 // groups, CODEBOOK_SIZE, d.numel(), generator=g) * 0.5)
             for d in torch.arange(head_size).view(groups, -1)]
    return LayerCodebooks(head_size, head_size, key, value)


def make_step(dtype: torch.dtype, head_size: int, kv_heads: int, group: int, groups: int):
    g = torch.Generator().manual_seed(head_size + group)
    books = books_for(head_size, groups, g)
    layout = PageLayout(books.num_codes, head_size, head_size, dtype, 4, 28, BLOCK)
    per_req = layout.reserved_blocks + -(-max(SEQ_LENS) // BLOCK)
    num_reqs = len(SEQ_LENS)
    cache = torch.randint(0, CODEBOOK_SIZE, (1 + num_reqs * per_req, kv_heads, BLOCK, layout.num_codes),
                          dtype=torch.uint8, generator=g)
    # Each request owns a shuffled set of blocks, so a wrong block lookup shows.
    order = (1 + torch.randperm(num_reqs * per_req, generator=g)).to(torch.int32)
    rows = order.view(num_reqs, per_req)
    entries = torch.arange(layout.ring_entries)
    blocks, slots = layout.ring_cells(rows, entries.expand(num_reqs, -1))
    k = torch.randn(num_reqs * layout.ring_entries, kv_heads, head_size, generator=g).to(dtype)
    write_cells(cache, blocks, slots, layout.pack_exact(k, torch.randn(k.shape, generator=g).to(dtype)))
    query = torch.randn(num_reqs, kv_heads * group, head_size, generator=g).to(dtype)
    key = torch.randn(num_reqs, kv_heads, head_size, generator=g).to(dtype)
    value = torch.randn(num_reqs, kv_heads, head_size, generator=g).to(dtype)
    seq_lens = torch.tensor(SEQ_LENS)
    return query, key, value, cache, rows, seq_lens, layout, books


# (dtype, head size, KV heads, query group, value groups)
CASES = [(torch.float32, 64, 3, 3, 1), (torch.bfloat16, 128, 2, 4, 16), (torch.float32, 64, 1, 8, 4)]


def torch_step(*args, **kwargs) -> torch.Tensor:
    """The decode step with the exact tokens gathered and attended in torch (the specification)."""
    usable = ring.usable
    ring.usable = lambda *a: False
    try:
        return vq_decode.decode_step(*args, **kwargs)
    finally:
        ring.usable = usable


def check_case(case: tuple, device: str) -> float:
    """The Triton step against the torch step on ``device``; returns the largest difference."""
    dtype, head_size = case[:2]
    query, key, value, cache, rows, seq_lens, layout, books = make_step(*case)
    moved = lambda b: ResidualCodebook(b.dims.to(device), b.codewords.to(device))  # noqa: E731
    books = LayerCodebooks(books.head_size, books.head_size_v, [moved(b) for b in books.key],
                           [moved(b) for b in books.value])
    args = [t.to(device) for t in (query, key, value, cache, rows, seq_lens)] + [layout, books, head_size**-0.5]
    assert ring.usable(args[0], args[3], layout)
    got = vq_decode.decode_step(*args)
    want = torch_step(*args)
    assert got.shape == want.shape and torch.isfinite(got).all()
    # float32: the same sums in another order. bfloat16: the coded kernel reads bf16 codewords (and
    # on the GPU rounds p and values to bf16 for its tensor-core dots, as the ring kernel does).
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want, atol=tol * float(want.abs().max()), rtol=tol)
    return float((got - want).abs().max())


@pytest.mark.triton
@pytest.mark.parametrize("case", CASES)
def test_ring_split_equals_the_torch_step(case) -> None:
    check_case(case, "cpu")


@pytest.mark.triton
def test_ring_alone_is_the_exact_attention() -> None:
    """No coded tokens at all (every request within sink + recent): the result is the ring's own
    softmax, equal to dense attention over the request's tokens."""
    query, key, value, cache, rows, seq_lens, layout, books = make_step(torch.float32, 64, 2, 2, 1)
    seq_lens = seq_lens.clamp(max=layout.ring_entries + 1)
    got = vq_decode.decode_step(query, key, value, cache, rows, seq_lens, layout, books, 0.125, longest=0)
    want = torch_step(query, key, value, cache, rows, seq_lens, layout, books, 0.125)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_unaligned_caches_are_left_to_torch() -> None:
    query, _, _, cache, _, _, layout, _ = make_step(torch.bfloat16, 64, 1, 2, 1)
    raw = torch.zeros(cache.shape[0], cache.shape[1], cache.shape[2], layout.num_codes + 1, dtype=torch.uint8)
    assert not ring.usable(query, raw[..., : layout.num_codes], layout)  # odd strides
    assert not ring.usable(query.float(), cache, layout)  # query in another dtype than the ring


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ring_write_equals_pack_and_scatter(dtype) -> None:
    """write_ring puts each kept token's K and V bytes where pack_exact + write_cells put them, and
    touches no other byte (the pad after an entry's K/V bytes excepted: it is never read)."""
    query, _, _, cache, rows, _, layout, _ = make_step(dtype, 64, 2, 2, 1)
    g = torch.Generator().manual_seed(7)
    positions = torch.tensor([0, 3, 4, 30, 31, 32, 77, 299, 5])  # sinks, ring entries, wrapped ones
    request = torch.tensor([0, 1, 2, 3, 4, 5, 5, 5, 0])
    kept = torch.tensor([0, 1, 3, 5, 6, 7])  # indices of the tokens the ring keeps this step
    key = torch.randn(len(positions), 2, 64, generator=g).to(dtype)
    value = torch.randn(len(positions), 2, 64, generator=g).to(dtype)
    got = cache.clone()
    ring.write_ring(got, rows, request, positions, kept, key, value, layout)
    want = cache.clone()
    blocks, slots = layout.ring_cells(rows[request[kept]], layout.ring_index(positions[kept]))
    packed = layout.pack_exact(key[kept], value[kept])
    write_cells(want, blocks, slots, packed)
    # Which cache bytes are an entry's padding after its K/V bytes: the same scatter of a marker.
    is_pad = torch.zeros(layout.cells_per_entry * layout.num_codes, dtype=torch.bool)
    is_pad[layout.exact_bytes :] = True
    pad = torch.zeros_like(cache, dtype=torch.bool)
    write_cells(pad, blocks, slots, is_pad.view(1, -1, 1, layout.num_codes).expand_as(packed))
    assert not torch.equal(got, cache)
    assert torch.equal(got[~pad], want[~pad])
