"""``write.write_heads`` (all KV heads at once) leaves the cache ``paged.write_request`` (the
specification's per-head arithmetic) leaves: checked through what attention sees after every step."""

import pytest
import torch

from kvfold.attention_backends.fourier.arena import CacheArena
from kvfold.attention_backends.fourier.decode import HeadTables
from kvfold.attention_backends.fourier.layout import FourierLayout
from kvfold.attention_backends.fourier.paged import visible, write_request
from kvfold.attention_backends.fourier.write import write_heads

HEADS, SIZE, BLOCK = 3, 16, 4
SINK, RECENT, FREQS, WINDOW = 2, 6, 4, 64


def dims(*counts: int, seed: int) -> list[torch.Tensor]:
    """Per head, ``count`` compressed dims at random (0: a head with none)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.sort(torch.randperm(SIZE, generator=g)[:c]).values for c in counts]


def make(dtype: torch.dtype, blocks: int) -> tuple[CacheArena, list[torch.Tensor]]:
    # Heads of different widths, one head without compressed keys, one layer with none in a head.
    layout = FourierLayout([dims(8, 0, 3, seed=1), dims(5, 16, 1, seed=2)],
                           [dims(2, 9, 12, seed=3), dims(0, 4, 7, seed=4)],
                           head_size=SIZE, head_size_v=SIZE, dtype=dtype, block_size=BLOCK,
                           sink=SINK, recent=RECENT, freqs=FREQS)
    raw = torch.zeros(layout.num_layers, blocks, 1, BLOCK, layout.cell_bytes, dtype=torch.uint8)
    return CacheArena([raw[layer] for layer in range(layout.num_layers)], layout), [raw]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunks", [
    [20, 1, 1, 7, 1, 13, 1, 1],  # the middle compressed by the first chunk, then rank-n updates
    [3, 5, 1, 1, 1, 2, 1, 1, 6, 1, 1, 9, 1],  # exact middle first, compressed later (by a decode token)
], ids=["compress-at-once", "exact-middle-first"])
def test_write_heads_equals_the_per_head_specification(dtype: torch.dtype, chunks: list[int]) -> None:
    total = sum(chunks)
    spec, _ = make(dtype, blocks=64)
    fast, _ = make(dtype, blocks=64)
    layout = spec.layout
    g = torch.Generator().manual_seed(0)
    # Block 0 is vLLM's null block, where the masked lanes of write_heads go: never in a row.
    row = (1 + torch.randperm(63, generator=g))[: layout.reserved_blocks + -(-total // BLOCK)].to(torch.int32)
    tables = [HeadTables.build(fast, layer) for layer in range(layout.num_layers)]
    n = 0
    compressed_seen = False
    for m in chunks:
        for layer in range(layout.num_layers):
            key = torch.randn(m, HEADS, SIZE, generator=g).to(dtype)
            value = torch.randn(m, HEADS, SIZE, generator=g).to(dtype)
            write_request(spec, layer, row, key, value, n, prefill=m > 1, window=WINDOW)
            write_heads(fast, tables[layer], row, key, value, n, prefill=m > 1, window=WINDOW)
        n += m
        compressed_seen |= bool(layout.is_compressed(n))
        for layer in range(layout.num_layers):
            for want, got in zip(visible(spec, layer, row, n, WINDOW), visible(fast, layer, row, n, WINDOW)):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert compressed_seen and n > SINK + RECENT + 2 * FREQS
