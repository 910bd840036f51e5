"""VQKV's prefill-past kernel (``past.py``, Triton's interpreter) against the torch path
(``past.read_past``) it replaces.

The cache is laid out as the backend lays it out (random codes everywhere, every ring entry written
with ``pack_exact``, shuffled blocks). For pasts that hold only sink tokens, a partial ring, a full
one and one that wrapped several times, and for the default value groups, the paper's single
residual value codebook and groups over shuffled dims, ``past_into`` must write exactly what
``read_past`` returns, rounded to the model dtype, and no row past ``computed``.
"""

from __future__ import annotations

import pytest
import torch

from kvfold.attention_backends.vqkv import past
from kvfold.attention_backends.vqkv.reference import CODEBOOK_SIZE, LayerCodebooks, ResidualCodebook
from test_vqkv_ring import SEQ_LENS, make_step

# (dtype, head size, KV heads, value groups)
CASES = [(torch.float32, 64, 3, 1), (torch.bfloat16, 128, 2, 16), (torch.float32, 64, 2, 4)]


def shuffled_values(books: LayerCodebooks, seed: int) -> LayerCodebooks:
    """The same codebooks with each value group over a random set of dims (not contiguous)."""
    dims = torch.randperm(books.head_size_v, generator=torch.Generator().manual_seed(seed))
    width = books.value[0].dims.numel()
    value = [ResidualCodebook(dims[i * width : (i + 1) * width], b.codewords) for i, b in enumerate(books.value)]
    return LayerCodebooks(books.head_size, books.head_size_v, books.key, value)


def check_past(dtype: torch.dtype, head_size: int, kv_heads: int, groups: int, device: str,
               shuffle: bool = False) -> float:
    """past_into against read_past for every request of the ring test's cache; the largest error."""
    _, _, _, cache, rows, _, layout, books = make_step(dtype, head_size, kv_heads, 1, groups)
    if shuffle:
        books = shuffled_values(books, head_size + groups)
    moved = lambda b: ResidualCodebook(b.dims.to(device), b.codewords.to(device))  # noqa: E731
    books = LayerCodebooks(books.head_size, books.head_size_v, [moved(b) for b in books.key],
                           [moved(b) for b in books.value])
    cache, rows = cache.to(device), rows.to(device)
    assert past.usable(cache, layout, dtype)
    worst = 0.0
    for r, seq_len in enumerate(SEQ_LENS):
        computed = seq_len - 1  # as if one more token were the chunk
        want_k, want_v = past.read_past(cache, rows[r], computed, layout, books)
        got_k = torch.full((computed + 3, kv_heads, head_size), 7.0, dtype=dtype, device=device)
        got_v = torch.full_like(got_k, 7.0)
        past.past_into(cache, rows[r], computed, layout, books, got_k, got_v)
        assert (got_k[computed:] == 7).all() and (got_v[computed:] == 7).all()
        for got, want in ((got_k[:computed], want_k), (got_v[:computed], want_v)):
            # The exact tokens come back bit for bit; codes are float32 sums rounded once to dtype.
            torch.testing.assert_close(got, want.to(dtype), atol=1e-5, rtol=1e-5 if dtype == torch.float32 else 8e-3)
            if computed:
                worst = max(worst, float((got.float() - want).abs().max()))
    return worst


@pytest.mark.triton
@pytest.mark.parametrize("case", CASES)
def test_past_equals_read_past(case) -> None:
    check_past(*case, "cpu")


@pytest.mark.triton
def test_past_with_shuffled_value_groups() -> None:
    check_past(torch.float32, 64, 2, 8, "cpu", shuffle=True)


@pytest.mark.triton
def test_exact_tokens_come_from_the_ring() -> None:
    """Codes zeroed under the ring's positions would change a coded rebuild; the sink and recent
    rows must still be the exact bytes written with pack_exact (here: overwritten with ones)."""
    dtype = torch.float32
    _, _, _, cache, rows, _, layout, books = make_step(dtype, 64, 1, 1, 16)
    computed = 100
    k_exact = torch.ones(layout.ring_entries, 1, 64, dtype=dtype)
    entries = torch.arange(layout.ring_entries)
    from kvfold.attention_backends.vqkv.pages import write_cells

    blocks, slots = layout.ring_cells(rows[0].expand(layout.ring_entries, -1), entries)
    write_cells(cache, blocks, slots, layout.pack_exact(k_exact, 2 * k_exact))
    k = torch.zeros(computed, 1, 64, dtype=dtype)
    v = torch.zeros_like(k)
    past.past_into(cache, rows[0], computed, layout, books, k, v)
    exact = torch.cat([torch.arange(layout.sink), torch.arange(computed - layout.recent, computed)])
    assert (k[exact] == 1).all() and (v[exact] == 2).all()
    coded = torch.ones(computed, dtype=torch.bool)
    coded[exact] = False
    assert not (k[coded] == 1).all(-1).all(-1).any()


def test_unequal_parts_are_refused() -> None:
    parts = [ResidualCodebook(torch.arange(4), torch.zeros(1, CODEBOOK_SIZE, 4)),
             ResidualCodebook(torch.arange(4, 6), torch.zeros(1, CODEBOOK_SIZE, 2))]
    with pytest.raises(ValueError, match="equal width"):
        past.stacked_parts(parts, torch.device("cpu"))


def test_vector_width_finds_aligned_runs() -> None:
    from kvfold.attention_backends.vqkv.reference import rope_branches

    assert past.vector_width(torch.stack(rope_branches(128))) == 8  # runs of 32 at multiples of 32
    assert past.vector_width(torch.arange(64).view(16, 4)) == 4  # groups of 4 dims
    assert past.vector_width(torch.arange(2, 10).view(1, 8)) == 2  # contiguous but not 4-aligned
    assert past.vector_width(torch.tensor([[0, 1, 3, 2]])) == 1  # shuffled


@pytest.mark.triton
def test_sixteen_bit_codebooks_stay_within_a_rounding(monkeypatch) -> None:
    """BOOK_16BIT (a benchmark setting): each codeword rounded to bf16 once more before the float32
    sum, so a coded element may differ from read_past's by a few bf16 roundings of its terms."""
    monkeypatch.setattr(past, "BOOK_16BIT", True)
    _, _, _, cache, rows, _, layout, books = make_step(torch.bfloat16, 128, 2, 1, 16)
    computed = 299
    want_k, want_v = past.read_past(cache, rows[5], computed, layout, books)
    k = torch.empty(computed, 2, 128, dtype=torch.bfloat16)
    v = torch.empty_like(k)
    past.past_into(cache, rows[5], computed, layout, books, k, v)
    for got, want in ((k, want_k), (v, want_v)):
        err = (got.float() - want).abs().max() / want.abs().max()
        assert 0 < err < 2e-2
