"""Encode-on-write: a step's new keys and values to codes in one Triton kernel per codebook.

``LayerCodebooks.encode`` (the specification) runs each residual stage as its own GEMM, argmin,
gather and subtraction: with the default 8 + 8 key and 16 value stages that is about 200 kernel
launches per layer and step, which made the host, not the GPU, the limit of every VQKV step in
eager mode. Here one program takes ``BLOCK_M`` (token, KV head) rows of one codebook (a key branch
or a value group), keeps their residual in registers and runs all the stages: distances to the 256
codewords in tiles of ``BLOCK_S`` (``||c||^2 - 2 r.c``, the specification's formula, float32 IEEE
dots), the first index of the minimum, then the residual minus the chosen codeword.

Float32 sums in another order can flip a choice between two codewords at (near) equal distance;
the tests bound how often that happens and that it does not change the reconstruction error.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton.language as tl

from kvfold.attention_backends.vqkv.kernels import _once, _pow2, triton_enabled
from kvfold.attention_backends.vqkv.reference import CODEBOOK_SIZE, LayerCodebooks, ResidualCodebook

BLOCK_M = 64  # (token, head) rows per program
# A program's stages run one after another, so a decode step's few rows (8 tokens x 8 KV heads)
# finish sooner spread over more, smaller programs: 1.2 ms per layer in one 64-row program each.
SMALL_BLOCK_M, SMALL_ROWS = 16, 4096
# Codewords per distance tile. H100, 8B shape, prefill chunks of 1,024 / 4,096 tokens: 128 takes
# 0.41 / 1.42 ms against 0.55 / 1.94 at 64 (256: 0.97 / 4.86); decode steps' few rows: 64 (0.168 ms
# at 64 tokens, 0.176 at 128). Codes identical in every setting.
BLOCK_S = 128
SMALL_BLOCK_S = 64  # with SMALL_BLOCK_M
NUM_WARPS = 4


def _encode_residual(
    X, Dims, Book, Norms, Codes,  # noqa: N803 (Triton pointer arguments)
    Table, Request, Positions,  # noqa: N803 (TO_CACHE only)
    num_rows, num_heads, code_offset, reserved,
    stride_xt, stride_xh, stride_ct, stride_ch, stride_cs, stride_tab,
    STAGES: tl.constexpr, DB: tl.constexpr, BLOCK_D: tl.constexpr,  # noqa: N803
    BOOK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,  # noqa: N803
    TO_CACHE: tl.constexpr, PAGE: tl.constexpr,  # noqa: N803
):
    # Axis 1: one of several codebooks of the same shape (the key branches, the value groups),
    # stacked, whose codes follow each other.
    b = tl.program_id(1)
    Dims += b * DB
    Book += b * STAGES * BOOK * DB
    Norms += b * STAGES * BOOK
    code_offset += b * STAGES
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_r = rows < num_rows
    token = (rows // num_heads).to(tl.int64)
    head = rows % num_heads
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < DB
    dims = tl.load(Dims + offs_d, mask=mask_d, other=0)
    x_rows = X + token[:, None] * stride_xt + head[:, None] * stride_xh
    residual = tl.load(x_rows + dims[None, :], mask=mask_r[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    if TO_CACHE:  # Codes is the paged cache: token t's cell is at its position's block and slot
        request = tl.load(Request + token, mask=mask_r, other=0).to(tl.int64)
        position = tl.load(Positions + token, mask=mask_r, other=0).to(tl.int64)
        mask_r = mask_r & (position >= 0)  # a padded batch's filler tokens
        block = tl.load(Table + request * stride_tab + reserved + position // PAGE, mask=mask_r, other=0)
        code_rows = (Codes + block.to(tl.int64) * stride_ct + head * stride_ch + (position % PAGE) * stride_cs
                     + code_offset)
    else:
        code_rows = Codes + token * stride_ct + head * stride_ch + code_offset
    for s in range(STAGES):
        best = tl.full([BLOCK_M], float("inf"), tl.float32)
        best_i = tl.full([BLOCK_M], 0, tl.int32)
        for c0 in range(0, BOOK, BLOCK_S):
            offs_c = c0 + tl.arange(0, BLOCK_S)
            words = tl.load(Book + (s * BOOK + offs_c[:, None]) * DB + offs_d[None, :],
                            mask=mask_d[None, :], other=0.0)
            dots = tl.dot(residual, tl.trans(words), input_precision="ieee")  # [BLOCK_M, BLOCK_S]
            distance = tl.load(Norms + s * BOOK + offs_c)[None, :] - 2.0 * dots
            tile_min = tl.min(distance, 1)
            tile_arg = tl.argmin(distance, 1).to(tl.int32) + c0
            better = tile_min < best  # strict: the earlier tile wins a tie, as torch's argmin
            best = tl.where(better, tile_min, best)
            best_i = tl.where(better, tile_arg, best_i)
        tl.store(code_rows + s, best_i.to(tl.uint8), mask=mask_r)
        chosen = tl.load(Book + (s * BOOK + best_i[:, None]) * DB + offs_d[None, :], mask=mask_d[None, :], other=0.0)
        residual -= chosen


_jitted: dict[bool, Any] = {}


def _kernel() -> Any:
    import triton

    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if interpret not in _jitted:
        _jitted[interpret] = triton.jit(_encode_residual)
    return _jitted[interpret]


def _prepared(books: list[ResidualCodebook], device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same-shape codebooks stacked: (dims int32 ``[n, d]``, codewords float32 ``[n, stages, 256, d]``,
    their squared norms ``[n, stages, 256]``), all contiguous."""
    sources = tuple(b.codewords for b in books)
    words = _once(sources, device, torch.float32,
                  lambda: torch.stack([w.to(device, torch.float32) for w in sources]).contiguous(),
                  tag="encode.words")
    norms = _once(sources, device, torch.float32, lambda: (words * words).sum(-1).contiguous(),
                  tag="encode.norms")
    dim_sources = tuple(b.dims for b in books)
    dims = _once(dim_sources, device, torch.int32,
                 lambda: torch.stack([d.to(device, torch.int32) for d in dim_sources]).contiguous(),
                 tag="encode.dims")
    return dims, words, norms


def _same_shape_runs(books: list[ResidualCodebook]) -> list[list[ResidualCodebook]]:
    """Consecutive codebooks of equal stage count and width, one launch each."""
    runs: list[list[ResidualCodebook]] = []
    for book in books:
        if runs and (runs[-1][0].stages, runs[-1][0].dims.numel()) == (book.stages, book.dims.numel()):
            runs[-1].append(book)
        else:
            runs.append([book])
    return runs


def encode_triton(key: torch.Tensor, value: torch.Tensor, books: LayerCodebooks) -> torch.Tensor:
    """``books.encode(key, value)`` by the Triton kernel: ``[T, H, D]``, ``[T, H, Dv]`` (strided
    views are fine) -> ``[T, H, num_codes]`` uint8."""
    num_tokens, num_heads = key.shape[:2]
    codes = torch.empty(num_tokens, num_heads, books.num_codes, dtype=torch.uint8, device=key.device)
    _launch(key, value, books, codes, None)
    return codes


def encode_into(cache: torch.Tensor, table: torch.Tensor, request: torch.Tensor, positions: torch.Tensor,
                reserved_blocks: int, key: torch.Tensor, value: torch.Tensor, books: LayerCodebooks) -> None:
    """Encodes ``key``/``value [T, H, D]`` straight into their cells of the paged ``cache``
    ``[blocks, H, block_size, C]`` uint8: token ``t`` (of request ``request[t]`` at ``positions[t]``)
    goes to slot ``p % block_size`` of block ``table[request[t], reserved_blocks + p // block_size]``;
    a token at a negative position is not written (the filler of a batch padded for a CUDA graph).
    No codes tensor and no scatter: one launch per shape of codebook, where the host time of the
    step's write mattered (eager decode steps)."""
    if cache.stride(-1) != 1:
        raise ValueError("encode_into needs a cache whose cells' bytes are contiguous")
    _launch(key, value, books, cache, (table, request, positions, int(reserved_blocks)))


def _launch(key: torch.Tensor, value: torch.Tensor, books: LayerCodebooks, out: torch.Tensor,
            paged: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None) -> None:
    if any(b.codewords.shape[1] != CODEBOOK_SIZE for b in books.key + books.value):
        raise ValueError(f"VQKV's encode kernel needs {CODEBOOK_SIZE}-entry codebooks")
    num_tokens, num_heads = key.shape[:2]
    num_rows = num_tokens * num_heads
    if num_rows == 0:
        return
    if paged is None:
        table = request = positions = out
        reserved, stride_cs, stride_tab, page = 0, 0, 0, 1
    else:
        table, request, positions, reserved = paged
        stride_cs, stride_tab, page = out.stride(2), table.stride(0), out.shape[2]
    offset = 0
    small = num_rows <= SMALL_ROWS
    block_m, block_s = (SMALL_BLOCK_M, SMALL_BLOCK_S) if small else (BLOCK_M, BLOCK_S)
    for source, run in [(key, r) for r in _same_shape_runs(books.key)] + \
                       [(value, r) for r in _same_shape_runs(books.value)]:
        if source.stride(-1) != 1:
            source = source.contiguous()
        dims, words, norms = _prepared(run, key.device)
        stages, width = run[0].stages, dims.shape[1]
        _kernel()[(-(-num_rows // block_m), len(run))](
            source, dims, words, norms, out,
            table, request, positions,
            num_rows, num_heads, offset, reserved,
            source.stride(0), source.stride(1), out.stride(0), out.stride(1), stride_cs, stride_tab,
            STAGES=stages, DB=width, BLOCK_D=max(16, _pow2(width)),
            BOOK=CODEBOOK_SIZE, BLOCK_M=block_m, BLOCK_S=block_s,
            TO_CACHE=paged is not None, PAGE=page, num_warps=NUM_WARPS,
        )
        offset += stages * len(run)


def encode(key: torch.Tensor, value: torch.Tensor, books: LayerCodebooks) -> torch.Tensor:
    """The step's codes: the Triton kernel where Triton runs, else the specification."""
    if triton_enabled(key.device):
        return encode_triton(key, value, books)
    return books.encode(key, value)
