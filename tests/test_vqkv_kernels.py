"""VQKV's decode attention over codes: the torch specification against a dense computation, and the
Triton kernel (in Triton's interpreter on CPU) against the specification.

The cache is a strided view (cells of a [blocks, slot, head, bytes] buffer with spare bytes), filled
with random bytes wherever no code was written, so a wrong cell address shows; the block table has a
``reserved_blocks`` column offset and rows built from a random permutation of the blocks. Ranges
cover an empty one, one not aligned to blocks, one whole block and a single position; the cases a
query group of 3 (SmolLM2's 9/3 heads), 4 and 8, head sizes 64 and 128, float32 and bfloat16
queries, 6 to 64 codes per token, and the value as one residual codebook or as 2 to 16 groups of
dims (codes read per group and broadcast, or per dim).
"""

import pytest
import torch

from kvfold.attention_backends.paged.attention import causal_gqa_attention
from kvfold.attention_backends.vqkv.kernels import (
    decode_attention,
    decode_attention_torch,
    key_codebook_matrix,
    key_tables,
    table_dtype,
    value_codebook,
    value_layout,
)
from kvfold.attention_backends.vqkv.reference import (
    CODEBOOK_SIZE,
    LayerCodebooks,
    ResidualCodebook,
    rope_branches,
)

BLOCK_SIZE, RESERVED = 16, 2
RANGES = [(5, 203), (37, 37), (16, 32), (130, 131)]  # [start, end) per request
# (query dtype, head size, KV heads, query group, key stages per branch, value stages per group,
# value groups)
CASES = [
    (torch.float32, 64, 3, 3, 2, 4, 1),
    (torch.float32, 64, 3, 3, 8, 16, 1),
    (torch.bfloat16, 128, 2, 4, 2, 4, 1),
    (torch.bfloat16, 128, 2, 4, 8, 16, 1),
    (torch.float32, 64, 1, 8, 16, 32, 1),  # 64 codes per token
    (torch.float32, 64, 3, 3, 8, 1, 16),  # product quantization: one stage per group of 4 dims
    (torch.bfloat16, 128, 2, 4, 8, 1, 16),
    (torch.bfloat16, 128, 2, 4, 2, 2, 4),
]


def make_books(head_size: int, key_stages: int, value_stages: int, g: torch.Generator,
               groups: int = 1, shuffle: bool = False) -> LayerCodebooks:
    # Plain normal codewords (no decay over stages), so every stage counts at the tolerances used.
    key = [ResidualCodebook(dims, torch.randn(key_stages, CODEBOOK_SIZE, dims.numel(), generator=g))
           for dims in rope_branches(head_size)]
    dims = torch.randperm(head_size, generator=g) if shuffle else torch.arange(head_size)
    value = [ResidualCodebook(d, torch.randn(value_stages, CODEBOOK_SIZE, d.numel(), generator=g))
             for d in dims.view(groups, -1)]
    return LayerCodebooks(head_size, head_size, key, value)


def make_problem(case: tuple, device: str, ranges=RANGES, shuffle: bool = False):
    """Books, per-request codes ``[end, Hk, C]``, the paged cache, block table, ranges and query."""
    dtype, head_size, num_kv_heads, group, key_stages, value_stages, groups = case
    g = torch.Generator().manual_seed(0)
    books = make_books(head_size, key_stages, value_stages, g, groups, shuffle)
    num_codes = books.num_codes
    widths = [RESERVED + -(-end // BLOCK_SIZE) for _, end in ranges]
    num_blocks = sum(widths) + 5
    raw = torch.randint(0, 256, (num_blocks, BLOCK_SIZE, num_kv_heads, num_codes + 3), generator=g,
                        dtype=torch.uint8)
    cache = raw.permute(0, 2, 1, 3)[..., :num_codes]  # [blocks, Hk, block_size, C], strided
    width = max(widths) + 1
    block_table = torch.randint(0, num_blocks, (len(ranges), width), generator=g, dtype=torch.int32)
    free = torch.randperm(num_blocks, generator=g).tolist()
    codes = []
    for r, (_, end) in enumerate(ranges):
        for column in range(widths[r]):
            block_table[r, column] = free.pop()
        tokens = torch.randint(0, 256, (end, num_kv_heads, num_codes), generator=g, dtype=torch.uint8)
        for p in range(end):
            cache[block_table[r, RESERVED + p // BLOCK_SIZE], :, p % BLOCK_SIZE] = tokens[p]
        codes.append(tokens)
    starts = torch.tensor([s for s, _ in ranges])
    ends = torch.tensor([e for _, e in ranges])
    query = torch.randn(len(ranges), num_kv_heads * group, head_size, generator=g).to(dtype)
    return books, codes, cache.to(device), block_table.to(device), starts.to(device), ends.to(device), \
        query.to(device)


def dense_attention(query, codes, ranges, books, scale):
    """Per request: decode its range's codes, then plain causal softmax attention of its last token."""
    num_reqs, num_heads, head_size = query.shape
    out = torch.zeros(num_reqs, num_heads, books.head_size_v)
    lse = torch.full((num_reqs, num_heads), float("-inf"))
    for r, (start, end) in enumerate(ranges):
        if end <= start:
            continue
        key, value = books.decode(codes[r][start:end])
        out[r] = causal_gqa_attention(query[r : r + 1].float().cpu(), key, value, scale, end - start - 1)[0]
        num_kv_heads = key.shape[1]
        q = query[r].float().cpu().view(num_kv_heads, -1, head_size)
        lse[r] = torch.logsumexp(torch.einsum("hgd,lhd->hgl", q, key) * scale, -1).reshape(-1)
    return out, lse


@pytest.mark.parametrize("case", CASES)
def test_specification_equals_dense_attention(case) -> None:
    books, codes, cache, table, starts, ends, query = make_problem(case, "cpu")
    scale = case[1] ** -0.5
    out, lse = decode_attention_torch(query, cache, table, RESERVED, starts, ends, books, scale)
    want_out, want_lse = dense_attention(query, codes, RANGES, books, scale)
    torch.testing.assert_close(out, want_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, want_lse, atol=1e-4, rtol=1e-5)
    assert (out[1] == 0).all() and (lse[1] == float("-inf")).all()


def test_key_tables_score_the_decoded_keys() -> None:
    books, codes, *_, query = make_problem(CASES[1], "cpu")
    tables = key_tables(query, books)  # [R, Hq, key_codes, 256]
    assert tables.shape == (len(RANGES), query.shape[1], books.key_codes, CODEBOOK_SIZE)
    tokens = codes[0][:50, 0]  # KV head 0, whose group is query heads 0..2
    key, _ = books.decode(tokens)
    index = tokens[:, : books.key_codes].long()  # [L, key_codes]
    scores = tables[0, 0].gather(-1, index.T).sum(0)  # sum_j table[j, code_j]
    torch.testing.assert_close(scores, key @ query[0, 0].float(), atol=1e-4, rtol=1e-5)


def test_codebooks_made_in_inference_mode_are_converted_once() -> None:
    # In an engine the codebooks reach the device inside vLLM's forward (inference mode), and
    # inference tensors have no version counter: the first decode step beyond the window on an
    # H200 died on reading it ("Inference tensors do not track version counter").
    with torch.inference_mode():
        books = make_books(64, 2, 4, torch.Generator().manual_seed(5))
    cpu = torch.device("cpu")
    matrix = key_codebook_matrix(books, cpu)
    assert key_codebook_matrix(books, cpu) is matrix
    assert value_codebook(books, cpu, torch.bfloat16) is value_codebook(books, cpu, torch.bfloat16)
    query = torch.randn(64)
    key, _ = books.decode(torch.zeros(1, books.num_codes, dtype=torch.uint8))
    column = (query @ matrix).view(books.key_codes, CODEBOOK_SIZE)[:, 0].sum()
    torch.testing.assert_close(column, key[0] @ query, atol=1e-4, rtol=1e-5)


def test_log_sum_exp_merges_ranges() -> None:
    """What the caller does with exact tokens: merging two ranges by their lse gives the union."""
    case = CASES[0]
    books, _, cache, table, starts, ends, query = make_problem(case, "cpu")
    mid = torch.tensor([100, 37, 20, 130])
    parts = [decode_attention_torch(query, cache, table, RESERVED, a, b, books, 0.125)
             for a, b in ((starts, mid), (mid, ends), (starts, ends))]
    (out_a, lse_a), (out_b, lse_b), (want, want_lse) = parts
    lse = torch.logaddexp(lse_a, lse_b)
    weight_a = torch.exp(lse_a - lse).nan_to_num(0.0)[..., None]
    weight_b = torch.exp(lse_b - lse).nan_to_num(0.0)[..., None]
    torch.testing.assert_close(weight_a * out_a + weight_b * out_b, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, want_lse)


def check_case(case: tuple, device: str, num_splits: int | None = None,
               shuffle: bool = False) -> tuple[float, float]:
    """Kernel vs specification on ``device``; returns the largest (output, lse) differences."""
    books, _, cache, table, starts, ends, query = make_problem(case, device, shuffle=shuffle)
    scale = case[1] ** -0.5
    out, lse = decode_attention(query, cache, table, RESERVED, starts, ends, books, scale, num_splits=num_splits)
    want_out, want_lse = decode_attention_torch(query, cache, table, RESERVED, starts, ends, books, scale)
    # float32: the same sums in another order (scores as per-stage table sums, base-2 softmax,
    # split merging): ~1e-6 relative. bfloat16: the kernel reads the value codebook in bfloat16
    # (each codeword rounded, 2^-9 relative) and on the GPU also rounds p and the rebuilt values to
    # bfloat16 for the tensor-core dot; an output is a convex mix of values, so its error stays
    # within ~1% of the largest value. Scores and lse: float32 tables for float32 models; for
    # 16-bit models each table entry is rounded to float16 (2^-11 relative), so a score is off by
    # at most 2^-11 times the sum of its entries' magnitudes, and so is the log-sum-exp.
    tol = 1e-4 if case[0] == torch.float32 else 1e-2
    magnitude = float(want_out.abs().max())
    torch.testing.assert_close(out, want_out, atol=tol * magnitude, rtol=tol)
    lse_tol = 1e-4
    if table_dtype(query.dtype) == torch.float16:
        entries = key_tables(query, books).abs().amax(-1).sum(-1) * scale  # [R, Hq]: bound per score
        lse_tol = max(lse_tol, 2.0**-11 * float(entries.max()))
    torch.testing.assert_close(lse, want_lse, atol=lse_tol, rtol=1e-4)
    assert (out[1] == 0).all() and (lse[1] == float("-inf")).all()
    finite = torch.isfinite(want_lse)
    return float((out - want_out).abs().max()), float((lse[finite] - want_lse[finite]).abs().max())


@pytest.mark.triton
@pytest.mark.parametrize("case", CASES)
def test_kernel_equals_the_torch_specification(case) -> None:
    check_case(case, "cpu")


@pytest.mark.triton
@pytest.mark.parametrize("num_splits", [1, 7])
def test_kernel_split_counts(num_splits) -> None:
    """One split: programs loop over several tiles; 7: splits that end mid-range or hold nothing."""
    check_case(CASES[2], "cpu", num_splits)


@pytest.mark.triton
@pytest.mark.parametrize(("vector", "exact_rows", "heads_inner"),
                         [(True, True, True), (True, True, False), (False, False, False)])
def test_value_groups_in_any_dim_order(vector, exact_rows, heads_inner,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Groups over shuffled dims: the kernel's columns come out in group order and are put back;
    values gathered per (token, group) as vectors or per (token, dim); scores gathered for the
    group's heads at once (tables heads-inner), per real query row, or for all padded rows."""
    from kvfold.attention_backends.vqkv import kernels

    monkeypatch.setattr(kernels, "VECTOR_GATHER", vector)
    monkeypatch.setattr(kernels, "EXACT_KEY_ROWS", exact_rows)
    monkeypatch.setattr(kernels, "HEADS_INNER", heads_inner)
    check_case((torch.float32, 64, 2, 4, 2, 2, 4), "cpu", shuffle=True)


def test_value_groups_of_unequal_shape_are_refused() -> None:
    books = make_books(64, 2, 1, torch.Generator().manual_seed(1), groups=4)
    books.value[1] = ResidualCodebook(books.value[1].dims, books.value[1].codewords.repeat(2, 1, 1))
    with pytest.raises(ValueError, match="equal width and stage count"):
        value_layout(books)
