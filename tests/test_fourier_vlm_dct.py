"""Fourier-VLM's compression op: the FFT DCT against scipy, the matrix form against the FFT form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.fft
import torch

from kvfold.models.fourier_vlm import dct as fft_op
from kvfold.models.fourier_vlm import spectral_resize as mm_op

SIZES = [1, 2, 3, 5, 8, 12, 24, 27, 37]  # odd, even, prime; 24 = LLaVA-1.5's CLIP grid


@pytest.mark.parametrize("n", SIZES)
def test_dct_and_idct_equal_scipy_orthonormal(n: int) -> None:
    x = torch.randn(6, 3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    want = scipy.fft.dct(x.numpy(), type=2, norm="ortho", axis=-1)
    want_inv = scipy.fft.idct(x.numpy(), type=2, norm="ortho", axis=-1)
    assert np.abs(fft_op.dct(x).numpy() - want).max() < 1e-12
    assert np.abs(fft_op.idct(x).numpy() - want_inv).max() < 1e-12
    assert torch.allclose(fft_op.idct(fft_op.dct(x)), x, atol=1e-12)


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_dct_along_any_dim(dim: int) -> None:
    x = torch.randn(5, 7, 4, dtype=torch.float64)
    want = scipy.fft.dct(x.numpy(), type=2, norm="ortho", axis=dim)
    assert np.abs(fft_op.dct(x, dim).numpy() - want).max() < 1e-12
    assert torch.allclose(fft_op.idct(fft_op.dct(x, dim), dim), x, atol=1e-12)


def test_dct2_equals_scipy_dctn() -> None:
    x = torch.randn(2, 24, 18, 5, dtype=torch.float64)
    want = scipy.fft.dctn(x.numpy(), type=2, norm="ortho", axes=(1, 2))
    assert np.abs(fft_op.dct2(x, dims=(1, 2)).numpy() - want).max() < 1e-12
    assert torch.allclose(fft_op.idct2(fft_op.dct2(x, (1, 2)), (1, 2)), x, atol=1e-12)


def scipy_compress(grid: np.ndarray, keep: tuple[int, int]) -> np.ndarray:
    """The authors' recipe written with scipy: dct2, crop the low block, idct2 of the small size."""
    coeffs = scipy.fft.dctn(grid, type=2, norm="ortho", axes=(-3, -2))[..., : keep[0], : keep[1], :]
    return scipy.fft.idctn(coeffs, type=2, norm="ortho", axes=(-3, -2))


@pytest.mark.parametrize("grid,keep", [((24, 24), (12, 12)), ((24, 24), (8, 8)),
                                       ((24, 24), (16, 16)), ((6, 8), (4, 5)), ((7, 3), (1, 1)),
                                       ((5, 9), (5, 9))])
def test_compress_equals_scipy_and_matrix_form(grid, keep) -> None:
    g = torch.Generator().manual_seed(sum(grid) + sum(keep))
    tokens = torch.randn(3, grid[0] * grid[1], 16, dtype=torch.float64, generator=g)
    ours = fft_op.compress_tokens(tokens, grid, keep)
    want = scipy_compress(tokens.reshape(3, *grid, 16).numpy(), keep).reshape(3, -1, 16)
    assert ours.shape == (3, keep[0] * keep[1], 16)
    assert np.abs(ours.numpy() - want).max() < 1e-12
    fast = mm_op.compress_tokens(tokens.float(), grid, keep)
    assert fast.dtype == torch.float32
    scale = ours.abs().max().item()
    assert (fast.double() - ours).abs().max().item() < 1e-5 * scale


def test_keeping_the_whole_grid_is_the_identity() -> None:
    tokens = torch.randn(2, 5 * 9, 4, dtype=torch.float64)
    assert torch.allclose(fft_op.compress_tokens(tokens, (5, 9), (5, 9)), tokens, atol=1e-12)
    assert torch.allclose(mm_op.compress_tokens(tokens.float(), (5, 9), (5, 9)).double(), tokens,
                          atol=1e-5)


def test_resize_matrix_is_the_crop_of_the_dct_then_the_small_idct() -> None:
    x = torch.randn(24, 7, dtype=torch.float64)
    b = mm_op.resize_matrix(24, 12)
    want = fft_op.idct(fft_op.dct(x, 0)[:12], 0)
    assert torch.allclose(b @ x, want, atol=1e-12)
    # Rows of B are orthonormal: the kept coefficients' energy is preserved exactly.
    assert torch.allclose(b @ b.T, torch.eye(12, dtype=torch.float64), atol=1e-12)


def test_low_frequency_content_survives_and_high_frequency_is_removed() -> None:
    # A smooth grid (two lowest cosines) is reproduced exactly at the small size, up to the
    # orthonormal gain; basis images at frequencies >= 12 in either axis vanish.
    d = mm_op.dct_matrix(24)
    smooth = (3 * d[0][:, None] * d[0][None, :] + d[1][:, None] * d[0][None, :])[..., None]
    out = fft_op.compress_grid(smooth, (12, 12))
    small = mm_op.dct_matrix(12)
    assert torch.allclose(out[..., 0], 3 * small[0][:, None] * small[0][None, :]
                          + small[1][:, None] * small[0][None, :], atol=1e-12)
    high = (d[23][:, None] * d[23][None, :] + d[12][:, None] * d[0][None, :]
            + d[3][:, None] * d[12][None, :])[..., None]
    assert fft_op.compress_grid(high, (12, 12)).abs().max() < 1e-12
    assert fft_op.compress_grid(high + smooth, (12, 12)).sub(out).abs().max() < 1e-12


@pytest.mark.parametrize("impl", [fft_op.compress_tokens, mm_op.compress_tokens])
def test_norms(impl) -> None:
    grid, keep = (24, 24), (12, 12)
    constant = torch.full((1, 576, 3), 2.5)
    # "ortho" (the authors') keeps energy: a constant grid comes back scaled by sqrt(576/144) = 2.
    assert torch.allclose(impl(constant, grid, keep, "ortho"), torch.full((1, 144, 3), 5.0),
                          atol=1e-5)
    assert torch.allclose(impl(constant, grid, keep, "mean"), torch.full((1, 144, 3), 2.5),
                          atol=1e-5)
    assert fft_op.norm_gain(grid, keep, "mean") == pytest.approx(0.5)
    tokens = torch.randn(2, 576, 8)
    energy = (fft_op.dct2(tokens.reshape(2, 24, 24, 8).double(), (1, 2))[:, :12, :12] ** 2).sum()
    assert (impl(tokens, grid, keep, "ortho").double() ** 2).sum() == pytest.approx(
        energy.item(), rel=1e-5)


@pytest.mark.parametrize("impl", [fft_op.compress_tokens, mm_op.compress_tokens])
def test_dtype_and_leading_dims(impl) -> None:
    tokens = torch.randn(2, 3, 36, 8).to(torch.bfloat16)
    out = impl(tokens, (6, 6), (4, 3))
    assert out.shape == (2, 3, 12, 8) and out.dtype == torch.bfloat16
    want = fft_op.compress_tokens(tokens.double(), (6, 6), (4, 3))
    assert (out.double() - want).abs().max() < 0.05 * want.abs().max()


@pytest.mark.parametrize("impl", [fft_op.compress_tokens, mm_op.compress_tokens])
def test_refuses_a_kept_size_larger_than_the_grid(impl) -> None:
    with pytest.raises(ValueError, match=r"cannot keep 25x25 frequencies of a 24x24 token grid"):
        impl(torch.zeros(1, 576, 4), (24, 24), (25, 25))
    with pytest.raises(ValueError, match="do not form a 24x24 grid"):
        impl(torch.zeros(1, 577, 4), (24, 24), (12, 12))
    with pytest.raises(ValueError, match="must be positive"):
        impl(torch.zeros(1, 576, 4), (24, 24), (0, 12))


def test_matrix_form_is_batched_over_images_like_the_fft_form() -> None:
    tokens = torch.randn(5, 576, 32)
    together = mm_op.compress_tokens(tokens, (24, 24), (8, 8))
    one_by_one = torch.stack([fft_op.compress_tokens(t, (24, 24), (8, 8)) for t in tokens])
    assert torch.allclose(together, one_by_one, atol=1e-5)
    assert math.isclose(together.shape[1], 64)
