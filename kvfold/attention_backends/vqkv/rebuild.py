"""Rebuilding K/V from codes for a prefill chunk, as two embedding-bag sums.

``LayerCodebooks.decode`` (the specification) gathers and adds one codebook per stage: 32 passes
over a ``[tokens, heads, D]`` float32 tensor for the default 8 + 8 key and 16 value codes. A chunk
of a long prompt rebuilds every earlier token of its request, so those passes were most of VQKV's
prefill time. Here each code indexes one row of a stacked table (codeword ``s`` of code ``j`` is row
``j * 256 + s``, zero outside its branch's dims), and ``embedding_bag(mode="sum")`` adds a token's
rows in one kernel: one read of the codes, one write of the result, the tables in cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvfold.attention_backends.vqkv.kernels import _once, key_codebook_matrix
from kvfold.attention_backends.vqkv.reference import CODEBOOK_SIZE, LayerCodebooks


def value_table(books: LayerCodebooks, device: torch.device) -> torch.Tensor:
    """``[value_codes * 256, Dv]`` float32: row ``j * 256 + s`` is codeword ``s`` of value code ``j``
    (the groups' stages in order), zero outside its group's dims."""

    def make() -> torch.Tensor:
        table = torch.zeros(books.value_codes, CODEBOOK_SIZE, books.head_size_v, device=device)
        start = 0
        for group in books.value:
            rows = table[start : start + group.stages]
            rows[..., group.dims.to(device)] = group.codewords.to(device, torch.float32)
            start += group.stages
        return table.view(-1, books.head_size_v)

    sources = tuple(b.codewords for b in books.value) + tuple(b.dims for b in books.value)
    return _once(sources, device, torch.float32, make)


def key_table(books: LayerCodebooks, device: torch.device) -> torch.Tensor:
    """``[key_codes * 256, D]`` float32, rows as in :func:`value_table` (the decode kernel's key
    matrix, transposed)."""
    matrix = key_codebook_matrix(books, device)
    return _once((matrix,), device, torch.float32, lambda: matrix.T.contiguous())


def rebuild(codes: torch.Tensor, books: LayerCodebooks) -> tuple[torch.Tensor, torch.Tensor]:
    """``[..., num_codes]`` codes -> float32 ``(key [..., D], value [..., Dv])``, equal to
    ``books.decode(codes)`` up to float32 summation order."""
    device, lead = codes.device, codes.shape[:-1]
    flat = codes.reshape(-1, codes.shape[-1]).to(torch.int64)
    split = books.key_codes
    stages = torch.arange(codes.shape[-1], device=device)
    rows = flat + (torch.cat([stages[:split], stages[split:] - split]) * CODEBOOK_SIZE)
    key = F.embedding_bag(rows[:, :split], key_table(books, device), mode="sum")
    value = F.embedding_bag(rows[:, split:], value_table(books, device), mode="sum")
    return key.view(*lead, books.head_size), value.view(*lead, books.head_size_v)
