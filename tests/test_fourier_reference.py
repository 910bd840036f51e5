"""FourierAttention's torch specification: the basis and coefficients against numpy's FFT, the
rank-1 decode update against a batch projection, the query-projection form against rebuilding, the
attention against dense attention on structured K/V, and the offline dim selection."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kvfold.attention_backends.fourier.reference import (
    CompressedMiddle,
    basis,
    fourier_decode_attention,
    middle_scores,
    middle_values,
    project,
)
from kvfold.attention_backends.fourier.selection import dim_errors, paper_fractions, select


def test_coefficients_are_the_dft_bins_the_authors_code_keeps() -> None:
    # Their code: torch.fft.fft(x, n=T) over time, first k bins, stored as (real, -imag).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=g, dtype=torch.float64)
    window, freqs = 512, 64
    coef = project(x.float(), 0, window, freqs)
    spectrum = np.fft.fft(x.numpy(), n=window, axis=0)[:freqs]
    want = np.stack([spectrum.real, -spectrum.imag], 1).reshape(2 * freqs, 5)
    np.testing.assert_allclose(coef.numpy(), want, rtol=1e-4, atol=1e-3)
    assert (basis(torch.arange(10), window, freqs)[1] == 0).all()  # sin(0): the paper's zero row


def test_rank_one_updates_equal_the_batch_projection() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 16, generator=g)
    dims = torch.tensor([0, 3, 4, 9, 15])
    middle = CompressedMiddle.compress(x[:120], dims, window=256, freqs=32)
    for row in x[120:]:
        middle.append(row)
    torch.testing.assert_close(middle.coef, project(x[:, dims], 0, 256, 32), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(middle.kept, x[:, middle.kept_dims])
    with pytest.raises(ValueError, match="middle is full"):
        for row in x[:57]:
            middle.append(row)


def test_normalisation_restores_mean_and_range_and_more_frequencies_help() -> None:
    # The paper's 1/k scale is not the inverse DFT (DC comes back doubled, the other bins right
    # only when the window is the middle's length); the re-normalisation puts each dim's mean and
    # max deviation back exactly. White noise over 64 positions: all 32 frequencies leave 16%
    # relative error (the Nyquist bin and the doubled DC), 16 frequencies ~80%.
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 8, generator=g)
    errors = {}
    for freqs in (32, 16):
        rebuilt = CompressedMiddle.compress(x, torch.arange(8), window=64, freqs=freqs).decoded()
        torch.testing.assert_close(rebuilt.mean(0), x.mean(0), atol=1e-5, rtol=0)
        torch.testing.assert_close((rebuilt - rebuilt.mean(0)).abs().amax(0), (x - x.mean(0)).abs().amax(0))
        errors[freqs] = float((rebuilt - x).norm() / x.norm())
    assert errors[32] < 0.2 < 0.6 < errors[16]


def test_query_projection_equals_rebuilding_the_middle() -> None:
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(700, 64, generator=g), torch.randn(700, 64, generator=g)
    dims = torch.randperm(64, generator=g)[:48]
    mk = CompressedMiddle.compress(k[:500], dims, window=1024, freqs=128)
    mv = CompressedMiddle.compress(v[:500], dims[:40], window=1024, freqs=128)
    for t in range(500, 700):
        mk.append(k[t])
        mv.append(v[t])
    q = torch.randn(4, 64, generator=g)
    scores = middle_scores(q, mk)
    torch.testing.assert_close(scores, q @ mk.decoded().T, rtol=1e-4, atol=1e-3)
    p = torch.softmax(scores / 8, -1)
    torch.testing.assert_close(middle_values(p, mv), p @ mv.decoded(), rtol=1e-4, atol=1e-4)


def structured(length: int, heads: int, size: int, g: torch.Generator) -> torch.Tensor:
    """Slowly varying dims (smooth in time, what FourierAttention compresses well) plus fast ones."""
    t = torch.arange(length, dtype=torch.float32)[:, None, None]
    freq = torch.rand(1, heads, size, generator=g)
    slow = torch.cos(2 * math.pi * t * freq[..., : size // 2] / length * 4 + freq[..., : size // 2] * 6)
    fast = torch.randn(length, heads, size - size // 2, generator=g)
    return torch.cat([3 * slow, fast], -1)


def test_attention_error_on_structured_kv() -> None:
    g = torch.Generator().manual_seed(4)
    heads, size, length = 2, 32, 1500
    keys, values = structured(length, heads, size, g), structured(length, heads, size, g)
    query = torch.randn(heads * 3, size, generator=g)
    dense = torch.cat([torch.softmax(query[h * 3:(h + 1) * 3] @ keys[:, h].T / size**0.5, -1) @ values[:, h]
                       for h in range(heads)])

    def run(dims: list[torch.Tensor]) -> float:
        out = fourier_decode_attention(query, keys, values, dims, dims, sink=4, recent=64, window=2048,
                                       freqs=128, scale=size**-0.5)
        return float((out - dense).norm() / dense.norm())

    smooth = [torch.arange(size // 2)] * heads  # the slowly varying half
    noisy = [torch.arange(size // 2, size)] * heads
    # Compressing the smooth dims costs ~3% relative error (it barely falls with more frequencies:
    # 3.5% at 64, 1.8% at 512; the 1/k scale and the max-deviation re-normalisation are only
    # approximately the inverse), compressing the noise-like dims 13%: the selection matters.
    assert run(smooth) < 0.05
    assert run(noisy) > 3 * run(smooth)
    # A request inside sink + recent is exact.
    short = fourier_decode_attention(query, keys[:60], values[:60], noisy, noisy, sink=4, recent=64,
                                     window=2048, freqs=128, scale=size**-0.5)
    want = torch.cat([torch.softmax(query[h * 3:(h + 1) * 3] @ keys[:60, h].T / size**0.5, -1) @ values[:60, h]
                      for h in range(heads)])
    torch.testing.assert_close(short, want)


def test_selection_prefers_smooth_dims_and_follows_the_schedule() -> None:
    g = torch.Generator().manual_seed(5)
    x = structured(1200, 2, 16, g)
    errors = dim_errors(x, sink=4, recent=100, freqs=64)
    chosen = select(errors, 0.5)
    assert [c.tolist() for c in chosen] == [list(range(8))] * 2
    assert sum(c.numel() for c in select(errors, 0.8)) == round(0.8 * 32)
    assert [paper_fractions(i, 32) for i in (0, 3, 4, 19, 20, 27, 28, 31)] == [
        (0.9, 0.95), (0.9, 0.95), (0.8, 0.8), (0.8, 0.8), (0.5, 0.7), (0.5, 0.7), (0.8, 0.8), (0.8, 0.8)]
    assert paper_fractions(19, 30) == (0.5, 0.7)  # SmolLM2's 30 layers map onto the 32-layer schedule
    with pytest.raises(ValueError, match="no middle"):
        dim_errors(x[:100], sink=4, recent=100, freqs=64)
    with pytest.raises(ValueError, match="not in"):
        select(errors, 1.5)
