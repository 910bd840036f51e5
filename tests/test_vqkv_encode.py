"""VQKV's encode kernel (Triton, in the interpreter on CPU; tests/gpu/check_cuda.py runs it on CUDA)
against the specification ``LayerCodebooks.encode``.

Keys and values are strided views (slices of a fused qkv-like buffer, as vLLM hands them over),
the row counts are not multiples of the kernel's blocks (small and large), and the cases cover float32 and bfloat16
inputs, head sizes 64 and 128 (branch widths 32/64, value 64/128), a width that is not a power of
two (48: branches of 24), and 4 to 32 stages.
"""

import pytest
import torch

from kvfold.attention_backends.vqkv.encode import encode_triton
from kvfold.attention_backends.vqkv.reference import LayerCodebooks, ResidualCodebook, rope_branches

# (dtype, head size, KV heads, tokens, key stages per branch, value stages; -n: n value groups of one)
CASES = [
    (torch.float32, 64, 3, 37, 2, 4),
    (torch.bfloat16, 128, 2, 70, 8, 16),
    (torch.float32, 48, 2, 5, 4, 8),
    (torch.bfloat16, 64, 2, 2100, 2, 2),  # > SMALL_ROWS rows: the prefill's larger programs
    (torch.bfloat16, 128, 2, 70, 8, -16),  # negative: 16 value groups of one stage each
]


def books_for(head_size: int, key_stages: int, value_stages: int, seed: int) -> LayerCodebooks:
    # Stage j's codewords shrink as residuals do, so later stages choose among close codewords.
    g = torch.Generator().manual_seed(seed)
    shrink = lambda n: (0.6 ** torch.arange(n, dtype=torch.float32))[:, None, None]  # noqa: E731
    key = [ResidualCodebook(dims, torch.randn(key_stages, 256, dims.numel(), generator=g) * shrink(key_stages))
           for dims in rope_branches(head_size)]
    value_dims = torch.randperm(head_size, generator=g)  # any column order, as a codebook may list
    groups, stages = (-value_stages, 1) if value_stages < 0 else (1, value_stages)
    value = [ResidualCodebook(d, torch.randn(stages, 256, d.numel(), generator=g) * shrink(stages))
             for d in value_dims.view(groups, -1)]
    return LayerCodebooks(head_size, head_size, key, value)


def check_case(case, device: str) -> float:
    """Asserts the kernel's codes match the specification's; returns the fraction that differs."""
    dtype, head_size, heads, tokens, key_stages, value_stages = case
    books = books_for(head_size, key_stages, value_stages, seed=head_size + tokens)
    g = torch.Generator().manual_seed(tokens)
    fused = torch.randn(tokens, 3 * heads, head_size, generator=g).to(dtype)
    key, value = fused[:, heads : 2 * heads], fused[:, 2 * heads :]  # strided like vLLM's split

    want = books.encode(key.float(), value.float())
    got = encode_triton(key.to(device), value.to(device), _moved(books, device)).cpu()
    assert got.shape == want.shape and got.dtype == torch.uint8
    # Float32 distances summed in another order may pick the other of two (near-)equidistant
    # codewords; after such a flip the residuals, and later stages, legitimately differ. Rare, and
    # the reconstruction must be as good.
    differs = float((got != want).any(-1).float().mean())
    assert differs <= 0.02, f"{differs:.1%} of (token, head) rows encode differently"
    exact = torch.cat([key.float(), value.float()], -1)
    error = lambda codes: float((torch.cat(books.decode(codes), -1) - exact).pow(2).mean())  # noqa: E731
    assert error(got) == pytest.approx(error(want), rel=1e-3)
    return differs


def _moved(books: LayerCodebooks, device: str) -> LayerCodebooks:
    move = lambda b: ResidualCodebook(b.dims.to(device), b.codewords.to(device))  # noqa: E731
    return LayerCodebooks(books.head_size, books.head_size_v, [move(b) for b in books.key],
                          [move(b) for b in books.value])


@pytest.mark.triton
@pytest.mark.parametrize("case", CASES)
def test_kernel_encodes_as_the_specification(case) -> None:
    check_case(case, "cpu")


@pytest.mark.triton
def test_no_tokens_give_no_codes() -> None:
    books = books_for(64, 2, 4, seed=0)
    codes = encode_triton(torch.empty(0, 2, 64), torch.empty(0, 2, 64), books)
    assert codes.shape == (0, 2, books.num_codes)


@pytest.mark.triton
def test_encode_into_the_cache_writes_each_tokens_cell() -> None:
    """encode_into's cells hold what encode_triton's codes scattered to the same cells hold, and no
    other cell changes."""
    from kvfold.attention_backends.vqkv.encode import encode_into
    from kvfold.attention_backends.vqkv.pages import write_cells

    books = books_for(128, 8, -16, seed=3)
    g = torch.Generator().manual_seed(4)
    reserved, page = 2, 16
    cache = torch.randint(0, 256, (40, 2, page, books.num_codes), dtype=torch.uint8, generator=g)
    table = (1 + torch.randperm(39, generator=g)[:12]).view(2, 6).to(torch.int32)  # 2 + 4 columns each
    request = torch.tensor([0, 0, 1, 1, 1])
    positions = torch.tensor([0, 15, 16, 17, 63])
    key = torch.randn(5, 2, 128, generator=g).to(torch.bfloat16)
    value = torch.randn(5, 2, 128, generator=g).to(torch.bfloat16)
    got = cache.clone()
    encode_into(got, table, request, positions, reserved, key, value, books)
    want = cache.clone()
    blocks = table[request, reserved + positions // page].long()
    write_cells(want, blocks, positions % page, encode_triton(key, value, books))
    assert not torch.equal(got, cache) and torch.equal(got, want)
