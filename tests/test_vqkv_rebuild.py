"""VQKV's prefill rebuild (two embedding-bag sums) against the specification's stage-by-stage decode."""

from __future__ import annotations

import pytest
import torch

from kvfold.attention_backends.vqkv.rebuild import rebuild
from kvfold.attention_backends.vqkv.reference import CODEBOOK_SIZE, LayerCodebooks, ResidualCodebook, rope_branches


def books_of(head_size: int, key_stages: int, value_stages: int, seed: int, groups: int = 1) -> LayerCodebooks:
    g = torch.Generator().manual_seed(seed)
    key = [ResidualCodebook(dims, torch.randn(key_stages, CODEBOOK_SIZE, dims.numel(), generator=g))
           for dims in rope_branches(head_size)]
    # Groups over shuffled dims: each group's rows must land on its own dims.
    dims = torch.randperm(head_size, generator=g) if groups > 1 else torch.arange(head_size)
    value = [ResidualCodebook(d, torch.randn(value_stages, CODEBOOK_SIZE, d.numel(), generator=g))
             for d in dims.view(groups, -1)]
    return LayerCodebooks(head_size, head_size, key, value)


@pytest.mark.parametrize(("head_size", "key_stages", "value_stages", "tokens", "groups"),
                         [(64, 2, 4, 37, 1), (128, 8, 16, 300, 1), (64, 4, 8, 0, 1),
                          (128, 8, 1, 300, 16), (64, 2, 3, 20, 4)])
def test_rebuild_equals_the_specification(head_size, key_stages, value_stages, tokens, groups) -> None:
    books = books_of(head_size, key_stages, value_stages, seed=head_size + tokens, groups=groups)
    codes = torch.randint(0, CODEBOOK_SIZE, (tokens, 3, books.num_codes),
                          generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    key, value = rebuild(codes, books)
    want_key, want_value = books.decode(codes)
    assert key.shape == want_key.shape == (tokens, 3, head_size) and value.shape == want_value.shape
    torch.testing.assert_close(key, want_key, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(value, want_value, atol=1e-5, rtol=1e-5)


def test_rebuild_reads_codes_of_the_last_stage_and_branch() -> None:
    # A code that only the last value stage (or the second key branch) may read, so an offset
    # error between stacked codebooks cannot pass unseen.
    books = books_of(64, 2, 4, seed=3)
    codes = torch.zeros(1, books.num_codes, dtype=torch.uint8)
    codes[0, -1] = 255
    codes[0, books.key_codes - 1] = 200
    key, value = rebuild(codes, books)
    want_key, want_value = books.decode(codes)
    torch.testing.assert_close(key, want_key, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(value, want_value, atol=1e-5, rtol=1e-5)
