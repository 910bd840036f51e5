"""Fourier-VLM's compression as two small matrix products: what the vLLM models run.

Cropping the orthonormal DCT of a length-N axis to its first n coefficients and applying the
orthonormal inverse DCT of length n is one linear map, ``B = IDCT_n @ DCT_N[:n, :]`` (n x N). The
2-D op on an H x W grid is then ``B_h @ X @ B_w^T`` per channel: exactly the FFT op of
:mod:`kvfold.models.fourier_vlm.dct`, in a form that is two batched GEMMs on any device and dtype
path, with the (tiny) matrices built once in float64 and cached per device.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from kvfold.models.fourier_vlm.dct import Norm, check_sizes, norm_gain


def dct_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The orthonormal DCT-II matrix D (n x n): ``dct(x) == D @ x`` and ``D^-1 == D^T``."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * k * (2 * i + 1) / (2 * n)) * math.sqrt(2 / n)
    d[0] /= math.sqrt(2)
    return d.to(dtype)


def resize_matrix(size: int, keep: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``B = IDCT_keep @ DCT_size[:keep, :]`` (keep x size): one axis of the compression."""
    return (dct_matrix(keep).T @ dct_matrix(size)[:keep]).to(dtype)


@lru_cache(maxsize=64)
def _factors(
    grid: tuple[int, int], keep: tuple[int, int], norm: Norm, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    check_sizes(grid, keep)
    rows = resize_matrix(grid[0], keep[0]) * norm_gain(grid, keep, norm)
    cols = resize_matrix(grid[1], keep[1])
    return rows.to(device, torch.float32), cols.to(device, torch.float32)


def compress_tokens(
    tokens: torch.Tensor, grid: tuple[int, int], keep: tuple[int, int], norm: Norm = "ortho"
) -> torch.Tensor:
    """Same contract as :func:`kvfold.models.fourier_vlm.dct.compress_tokens`, computed in float32.

    ``tokens``: ``[..., H*W, C]`` in row-major grid order; returns ``[..., h*w, C]``.
    """
    gh, gw = grid
    if tokens.shape[-2] != gh * gw:
        raise ValueError(f"{tokens.shape[-2]} tokens do not form a {gh}x{gw} grid")
    rows, cols = _factors(tuple(grid), tuple(keep), norm, tokens.device)
    lead, channels = tokens.shape[:-2], tokens.shape[-1]
    x = tokens.reshape(-1, gh, gw, channels).float()
    x = torch.matmul(rows, x.reshape(-1, gh, gw * channels))  # [B, h, W*C]
    x = x.reshape(-1, keep[0], gw, channels).transpose(-2, -3)  # [B, W, h, C] -> rows over W
    x = torch.matmul(cols, x.reshape(-1, gw, keep[0] * channels))  # [B, w, h*C]
    x = x.reshape(-1, keep[1], keep[0], channels).transpose(-2, -3)  # [B, h, w, C]
    return x.reshape(*lead, keep[0] * keep[1], channels).to(tokens.dtype)
