"""Fourier-VLM's compression op in pure torch, computed with FFTs: the readable specification.

Fourier-VLM (Wang et al., arXiv 2508.06038) treats one image's vision tokens as a grid of C-channel
features, takes the orthonormal 2-D DCT-II of every channel, keeps the top-left ``h x w`` block of
low-frequency coefficients and applies the orthonormal inverse DCT *of the smaller size* to that
block. The result is a smaller spatial grid, ``h * w`` new tokens: a spectral resize, with no
parameters. The DCT is computed with an FFT of the same length (Makhoul's even/odd reordering and a
quarter-sample twiddle), so any grid size works, not only powers of two.

:func:`compress_tokens` is the reference the vLLM models are tested against; they run the
identical linear map as two small matrix products (:mod:`kvfold.models.fourier_vlm.spectral_resize`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Norm = Literal["ortho", "mean"]


def _move_last(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x if dim in (-1, x.ndim - 1) else x.movedim(dim, -1)


def _twiddle(n: int, sign: int, x: torch.Tensor) -> torch.Tensor:
    k = torch.arange(n, device=x.device, dtype=x.dtype)
    return torch.polar(torch.ones_like(k), sign * math.pi * k / (2 * n))


def dct(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Orthonormal DCT-II along ``dim`` (scipy's ``dct(x, type=2, norm="ortho")``); float input."""
    v = _move_last(x, dim)
    n = v.shape[-1]
    # Even samples ascending, odd samples descending: the DCT-II of x is the real part of the
    # FFT of this sequence times exp(-i pi k / 2N) (Makhoul 1980).
    reordered = torch.cat([v[..., ::2], v[..., 1::2].flip(-1)], dim=-1)
    spectrum = torch.fft.fft(reordered, dim=-1)
    out = 2 * (spectrum * _twiddle(n, -1, v)).real
    scale = torch.full((n,), math.sqrt(1 / (2 * n)), device=v.device, dtype=v.dtype)
    scale[0] = math.sqrt(1 / (4 * n))
    out = out * scale
    return out if dim in (-1, x.ndim - 1) else out.movedim(-1, dim)


def idct(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`dct` (orthonormal DCT-III) along ``dim``."""
    c = _move_last(x, dim)
    n = c.shape[-1]
    scale = torch.full((n,), math.sqrt(2 * n), device=c.device, dtype=c.dtype)
    scale[0] = math.sqrt(4 * n)
    half = c * scale / 2  # C_k = Re(W_k V_k) of the forward transform
    # With V the FFT of a real sequence, W_k V_k = C_k - i C_{N-k} (C_N = 0).
    shifted = torch.cat([torch.zeros_like(half[..., :1]), half[..., 1:].flip(-1)], dim=-1)
    spectrum = torch.complex(half, -shifted) * _twiddle(n, +1, c)
    reordered = torch.fft.ifft(spectrum, dim=-1).real
    out = torch.empty_like(reordered)
    even = (n + 1) // 2
    out[..., ::2] = reordered[..., :even]
    out[..., 1::2] = reordered[..., even:].flip(-1)
    return out if dim in (-1, x.ndim - 1) else out.movedim(-1, dim)


def dct2(x: torch.Tensor, dims: tuple[int, int] = (-2, -1)) -> torch.Tensor:
    """Orthonormal 2-D DCT-II over ``dims``."""
    return dct(dct(x, dims[1]), dims[0])


def idct2(x: torch.Tensor, dims: tuple[int, int] = (-2, -1)) -> torch.Tensor:
    """Inverse of :func:`dct2`."""
    return idct(idct(x, dims[0]), dims[1])


def norm_gain(grid: tuple[int, int], keep: tuple[int, int], norm: Norm) -> float:
    """The factor ``norm`` applies on top of the orthonormal crop-and-invert.

    "ortho" (the authors' code) keeps the energy of the kept coefficients, so a constant grid of
    value c comes back as c * sqrt(H W / (h w)); "mean" divides that out, so a constant grid stays c
    (the values the projector saw during pre-training, for weights not trained with compression).
    """
    if norm == "ortho":
        return 1.0
    if norm == "mean":
        return math.sqrt(keep[0] * keep[1] / (grid[0] * grid[1]))
    raise ValueError(f"unknown norm {norm!r}; expected 'ortho' or 'mean'")


def check_sizes(grid: tuple[int, int], keep: tuple[int, int]) -> None:
    """Refuse a kept block that is empty or larger than the grid (nothing to low-pass)."""
    (gh, gw), (kh, kw) = grid, keep
    if min(gh, gw, kh, kw) < 1:
        raise ValueError(f"grid {gh}x{gw} and kept size {kh}x{kw} must be positive")
    if kh > gh or kw > gw:
        raise ValueError(
            f"Fourier-VLM cannot keep {kh}x{kw} frequencies of a {gh}x{gw} token grid: the kept "
            "size must be at most the grid size"
        )


def compress_grid(
    grid: torch.Tensor, keep: tuple[int, int], norm: Norm = "ortho"
) -> torch.Tensor:
    """``[..., H, W, C] -> [..., h, w, C]``: low-pass in the DCT domain, inverse DCT of size h x w.

    Computed in float32 or float64 (float64 input stays float64), returned in the input dtype.
    """
    gh, gw = grid.shape[-3], grid.shape[-2]
    check_sizes((gh, gw), keep)
    work = grid if grid.dtype == torch.float64 else grid.float()
    coeffs = dct2(work, dims=(-3, -2))[..., : keep[0], : keep[1], :]
    out = idct2(coeffs, dims=(-3, -2)) * norm_gain((gh, gw), keep, norm)
    return out.to(grid.dtype)


def compress_tokens(
    tokens: torch.Tensor, grid: tuple[int, int], keep: tuple[int, int], norm: Norm = "ortho"
) -> torch.Tensor:
    """``[..., H*W, C]`` tokens in row-major grid order -> ``[..., h*w, C]``, same order."""
    gh, gw = grid
    if tokens.shape[-2] != gh * gw:
        raise ValueError(f"{tokens.shape[-2]} tokens do not form a {gh}x{gw} grid")
    lead = tokens.shape[:-2]
    out = compress_grid(tokens.reshape(*lead, gh, gw, tokens.shape[-1]), keep, norm)
    return out.reshape(*lead, keep[0] * keep[1], tokens.shape[-1])
