"""Cache writes through slot_mapping and reads through block_table, for every physical layout."""

import pytest
import torch

from kvfold.attention_backends.paged.cache import gather_tokens, write_tokens

B, H, N, C = 6, 2, 4, 8
# Physical orders vLLM may choose (outermost first) for the logical [B, H, N, C] view.
LAYOUTS = {"BHNC": (0, 1, 2, 3), "BNHC": (0, 2, 1, 3), "HBNC": (1, 0, 2, 3)}


def logical_view(order: tuple[int, ...]) -> torch.Tensor:
    shape = (B, H, N, C)
    storage = torch.zeros([shape[d] for d in order])
    return storage.permute([order.index(d) for d in range(4)])  # logical dims, physical strides


@pytest.mark.parametrize("layout", LAYOUTS)
def test_write_then_gather_follows_block_table(layout: str) -> None:
    cache = logical_view(LAYOUTS[layout])
    assert cache.shape == (B, H, N, C)
    blocks = torch.tensor([4, 1, 3])  # a request's blocks, deliberately out of order
    num_tokens = 10  # crosses two block boundaries, last block partly filled
    positions = torch.arange(num_tokens)
    slots = blocks[positions // N] * N + positions % N
    rows = torch.randn(num_tokens, H, C)
    write_tokens(cache, slots, rows)
    torch.testing.assert_close(gather_tokens(cache, blocks, num_tokens), rows, rtol=0, atol=0)
    # Nothing outside the request's slots was touched.
    untouched = torch.ones(B, N, dtype=torch.bool)
    untouched[slots // N, slots % N] = False
    assert cache.permute(0, 2, 1, 3)[untouched].abs().sum() == 0


def test_padding_slots_are_skipped_and_dtype_is_the_caches() -> None:
    cache = torch.zeros(B, H, N, C, dtype=torch.float16)
    slots = torch.tensor([5, -1, 6, -1])
    rows = torch.randn(4, H, C, dtype=torch.float32)
    write_tokens(cache, slots, rows)
    assert cache[1, :, 1].equal(rows[0].half()) and cache[1, :, 2].equal(rows[2].half())
    assert cache.count_nonzero() == 2 * H * C


def test_slot_mapping_shorter_than_padded_rows() -> None:
    cache = torch.zeros(B, H, N, C)
    rows = torch.randn(8, H, C)  # 8 padded tokens, only 3 have slots
    write_tokens(cache, torch.tensor([0, 1, 2]), rows)
    torch.testing.assert_close(gather_tokens(cache, torch.tensor([0]), 3), rows[:3])
