"""The spectral operations of FourierAttention in exact FFT form, batched over leading dims.

:mod:`reference` states them as sums over the translated-Fourier rows ``f_r(t)`` (``f_2n = cos``,
``f_2n+1 = sin`` of ``2 pi n t / T``). Every one is a real DFT of length ``T`` restricted to the
first ``k`` bins, so a length-``T`` FFT computes it in ``O(T log T)`` instead of ``O(2k L)`` per
signal (for k = 512 and a 31k-token middle, ~30x fewer operations), exactly up to float rounding:

* :func:`analyze` ``a_r = sum_t x_t f_r(start + t)``: coefficients of a signal (compression,
  rank-n updates) and the basis weights ``w = P F^T`` of attention probabilities;
* :func:`synthesize` ``y_t = (1 / k) sum_r a_r f_r(t)``, ``t < length``: the paper's
  reconstruction, and the middle's scores ``z F / k`` once the query is projected onto the
  coefficients (``z = C (q * scale)``).

Both need ``T > 2 (k - 1)`` so that no bin folds onto another (the backend refuses smaller T).
"""

from __future__ import annotations

import torch


def analyze(x: torch.Tensor, window: int, freqs: int, start: int = 0) -> torch.Tensor:
    """``[..., 2k]`` float32: ``sum_t x[..., t] f_r(start + t)`` for ``x`` ``[..., L]``, ``start + L <= T``."""
    length = x.shape[-1]
    if start + length > window:
        raise ValueError(f"positions {start}..{start + length - 1} exceed the Fourier window {window}")
    signal = torch.nn.functional.pad(x.float(), (start, window - start - length))
    bins = torch.fft.rfft(signal, n=window)[..., :freqs]
    # e^{-i theta} = cos - i sin: the real part is the cos row, minus the imaginary part the sin row.
    return torch.stack([bins.real, -bins.imag], -1).flatten(-2)


def synthesize(coef: torch.Tensor, length: int, window: int) -> torch.Tensor:
    """``[..., length]`` float32: ``(1 / k) sum_r coef[..., r] f_r(t)`` at ``t = 0 .. length - 1``."""
    freqs = coef.shape[-1] // 2
    pairs = coef.float().unflatten(-1, (freqs, 2))
    # irfft(Y)[t] = (Y_0 + sum_n 2 Re(Y_n e^{i theta_n t})) / T, and 2 Re((a - i b) e^{i theta}) / T
    # * T / 2 = a cos + b sin: so Y_n = (a_n - i b_n) T / 2, and Y_0 = a_0 T (its sin row is zero).
    # The 1/k scale is applied to the k bins, not to the T outputs: one pass over [..., T] less.
    bins = torch.complex(pairs[..., 0], -pairs[..., 1]) * (window / 2 / freqs)
    bins[..., 0] = pairs[..., 0, 0] * (window / freqs)
    return torch.fft.irfft(bins, n=window)[..., :length]


def reconstruct(coef: torch.Tensor, length: int, window: int) -> torch.Tensor:
    """``[..., length, D]``: :func:`synthesize` of every column of ``coef`` ``[..., 2k, D]``."""
    return synthesize(coef.transpose(-1, -2), length, window).transpose(-1, -2)


def project(x: torch.Tensor, window: int, freqs: int, start: int = 0) -> torch.Tensor:
    """``[..., 2k, D]``: the coefficients of ``x`` ``[..., L, D]`` at middle positions from ``start``."""
    return analyze(x.transpose(-1, -2), window, freqs, start).transpose(-1, -2)
