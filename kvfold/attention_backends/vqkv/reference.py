"""VQKV, the specification (pure torch, CPU): residual vector quantization of keys and values.

Every cached token of every KV head is stored as one-byte indices into small codebooks:

* the key is split into two RoPE frequency branches (the rotary pairs of the highest frequencies,
  and the rest), because the two halves have very different statistics after rotation: the paper's
  "periodic reconstruction error in key dimensions" comes from mixing them in one codebook;
* each key branch, and each group of value dims, is quantized by ``stages`` residual codebooks of
  ``CODEBOOK_SIZE`` entries: stage ``j`` picks the codeword nearest to what stages ``< j`` left over,
  and the reconstruction is the sum of the picked codewords. The paper quantizes the whole value
  with one residual codebook (one group); more groups of fewer stages each (product quantization of
  residual codes, the same bytes) make a value's rebuild read ``groups`` times fewer codebook
  elements, which is what bounds the decode kernel (``kernels.py``), at some cost in fidelity
  (``docs/vqkv.md``).

What a query sees (:func:`vqkv_attention`): in a step that computes positions ``[s, e)`` the first
``sink`` tokens, the ``recent`` tokens before ``s`` and the step's own tokens are exact; every other
token is its reconstruction from codes. A whole prompt in one step is therefore attended exactly
(as the paper's prefill), and each decode step sees the sink, a recent window and codes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvfold.attention_backends.paged.attention import causal_gqa_attention

CODEBOOK_SIZE = 256  # one byte per index


def rope_branches(head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key dims of the high- and low-frequency RoPE halves (neox layout: ``i`` pairs ``i + D/2``)."""
    if head_size % 4:
        raise ValueError(f"VQKV splits keys into RoPE frequency halves; head size {head_size} % 4 != 0")
    half, quarter = head_size // 2, head_size // 4
    high = torch.cat([torch.arange(0, quarter), torch.arange(half, half + quarter)])
    low = torch.cat([torch.arange(quarter, half), torch.arange(half + quarter, head_size)])
    return high, low


@dataclass
class ResidualCodebook:
    """Residual codebooks for the ``dims`` of a vector: ``codewords`` is ``[stages, S, len(dims)]``."""

    dims: torch.Tensor
    codewords: torch.Tensor

    @property
    def stages(self) -> int:
        return self.codewords.shape[0]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Greedy residual assignment: ``[..., D] -> [..., stages]`` int64 indices."""
        residual = x[..., self.dims.to(x.device)].float().reshape(-1, self.dims.numel())
        books = self.codewords.to(residual.device, torch.float32)
        codes = []
        for book in books:
            # argmin ||r - c||^2 = argmin (||c||^2 - 2 r.c): one GEMM per stage.
            distance = (book * book).sum(-1) - 2.0 * residual @ book.T
            index = distance.argmin(-1)
            residual = residual - book[index]
            codes.append(index)
        return torch.stack(codes, -1).reshape(*x.shape[:-1], self.stages)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``[..., stages]`` indices -> ``[..., len(dims)]`` float32 reconstruction."""
        books = self.codewords.to(codes.device, torch.float32)
        out = torch.zeros(*codes.shape[:-1], books.shape[-1], device=codes.device)
        for j, book in enumerate(books):
            out += book[codes[..., j].long()]
        return out


def value_groups(head_size_v: int, groups: int) -> list[torch.Tensor]:
    """Dims of ``groups`` equal, contiguous groups of a value of ``head_size_v`` dims."""
    if groups < 1 or head_size_v % groups:
        raise ValueError(f"a value of {head_size_v} dims cannot be split into {groups} equal groups")
    return list(torch.arange(head_size_v).view(groups, -1))


def _decode_into(out: torch.Tensor, books: list[ResidualCodebook], codes: torch.Tensor) -> int:
    """Adds each book's reconstruction of its codes (consecutive columns of ``codes``) into its dims
    of ``out``; returns the number of codes read."""
    start = 0
    for book in books:
        out[..., book.dims.to(codes.device)] = book.decode(codes[..., start : start + book.stages])
        start += book.stages
    return start


@dataclass
class LayerCodebooks:
    """One attention layer's codebooks (shared by its KV heads): key branches, then value groups.

    ``value`` is a list of residual codebooks over disjoint dims (one, the whole value, is the
    paper's scheme); a single :class:`ResidualCodebook` is taken as that one group."""

    head_size: int
    head_size_v: int
    key: list[ResidualCodebook]
    value: list[ResidualCodebook]

    def __post_init__(self) -> None:
        if isinstance(self.value, ResidualCodebook):
            self.value = [self.value]

    @property
    def key_codes(self) -> int:
        return sum(b.stages for b in self.key)

    @property
    def value_codes(self) -> int:
        return sum(b.stages for b in self.value)

    @property
    def num_codes(self) -> int:
        """Bytes per token and KV head in the cache: one byte per index."""
        return self.key_codes + self.value_codes

    def encode(self, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``[..., D]``, ``[..., Dv]`` -> ``[..., num_codes]`` uint8 (key branches, then value groups)."""
        parts = [b.encode(key) for b in self.key] + [b.encode(value) for b in self.value]
        return torch.cat(parts, -1).to(torch.uint8)

    def decode(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[..., num_codes]`` -> float32 ``(key [..., D], value [..., Dv])``."""
        key = torch.zeros(*codes.shape[:-1], self.head_size, device=codes.device)
        value = torch.zeros(*codes.shape[:-1], self.head_size_v, device=codes.device)
        start = _decode_into(key, self.key, codes)
        _decode_into(value, self.value, codes[..., start:])
        return key, value

    def reconstruct(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the cache gives back for exact ``key``/``value``: decode(encode(.))."""
        return self.decode(self.encode(key, value))


def fit_residual(
    vectors: torch.Tensor,
    stages: int,
    iterations: int = 20,
    size: int = CODEBOOK_SIZE,
    seed: int = 0,
) -> torch.Tensor:
    """Residual k-means: ``[M, d]`` samples -> ``[stages, size, d]`` codewords, stage by stage.

    Each stage is Lloyd's algorithm on what the previous stages left, started from ``size``
    distinct samples; an empty cluster is re-seeded with the sample its stage fits worst, so no
    codeword is wasted.
    """
    if vectors.shape[0] < size:
        raise ValueError(f"fitting {size} codewords needs at least {size} samples, got {vectors.shape[0]}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    residual = vectors.float().clone()
    books = []
    for _ in range(stages):
        pick = torch.randperm(residual.shape[0], generator=generator)[:size].to(residual.device)
        book = residual[pick].clone()
        for _ in range(iterations):
            distance = (book * book).sum(-1) - 2.0 * residual @ book.T
            index = distance.argmin(-1)
            sums = torch.zeros_like(book).index_add_(0, index, residual)
            counts = torch.bincount(index, minlength=size).to(book.dtype)
            filled = counts > 0
            book[filled] = sums[filled] / counts[filled, None]
            empty = (~filled).nonzero().flatten()
            if empty.numel():
                error = (residual - book[index]).square().sum(-1)
                book[empty] = residual[error.topk(empty.numel()).indices]
        distance = (book * book).sum(-1) - 2.0 * residual @ book.T
        residual = residual - book[distance.argmin(-1)]
        books.append(book)
    return torch.stack(books)


def exact_mask(num_keys: int, step_start: int, sink: int, recent: int) -> torch.Tensor:
    """Which of ``num_keys`` positions a step starting at ``step_start`` sees exactly (bool)."""
    positions = torch.arange(num_keys)
    return (positions < sink) | (positions >= step_start - recent)


def vqkv_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    books: LayerCodebooks,
    step_starts: Sequence[int],
    scale: float,
    sink: int,
    recent: int,
) -> torch.Tensor:
    """Outputs ``[T, Hq, Dv]`` of one request whose ``T`` tokens were computed in steps.

    ``step_starts`` are the first positions of the steps (``0`` first, increasing); the last step
    ends at ``T``. Keys/values are ``[T, Hk, D(v)]`` exact; the cache's reconstruction is derived.
    """
    if not step_starts or step_starts[0] != 0:
        raise ValueError("the first step starts at position 0")
    num_tokens = query.shape[0]
    approx_k, approx_v = books.reconstruct(key, value)
    bounds = list(step_starts) + [num_tokens]
    out = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        exact = exact_mask(end, start, sink, recent).to(key.device)[:, None, None]
        k = torch.where(exact, key[:end].float(), approx_k[:end])
        v = torch.where(exact, value[:end].float(), approx_v[:end])
        out.append(causal_gqa_attention(query[start:end], k, v, scale, start))
    return torch.cat(out)


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """``||approx - exact|| / ||exact||`` over the whole tensor."""
    return float((approx.float() - exact.float()).norm() / exact.float().norm())
