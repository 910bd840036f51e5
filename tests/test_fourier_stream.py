"""FourierStream, the step-by-step specification, against the authors' cache order and dense attention."""

import math

import torch
from test_fourier_reference import structured

from kvfold.attention_backends.fourier import spectral
from kvfold.attention_backends.fourier.reference import CompressedMiddle
from kvfold.attention_backends.fourier.stream import FourierStream
from kvfold.attention_backends.paged.attention import causal_gqa_attention

SINK, RECENT, FREQS, WINDOW = 4, 64, 32, 2048


def stream(dims: list[torch.Tensor]) -> FourierStream:
    return FourierStream(dims, dims, sink=SINK, recent=RECENT, freqs=FREQS, window=WINDOW, scale=0.25)


def test_prefill_then_decode_is_the_authors_cache() -> None:
    # The authors compress the prompt's middle at prefill (normalisation fitted then) and append
    # each token leaving the window by a rank-1 update, never refitting.
    g = torch.Generator().manual_seed(0)
    keys, values = structured(400, 2, 16, g), structured(400, 2, 16, g)
    dims = [torch.arange(0, 16, 2), torch.arange(5)]
    s = stream(dims)
    s.step(torch.randn(300, 4, 16, generator=g), keys[:300], values[:300])
    for t in range(300, 330):
        s.step(torch.randn(1, 4, 16, generator=g), keys[t : t + 1], values[t : t + 1])
    k, _ = s.visible()
    for h in range(2):
        middle = CompressedMiddle.compress(keys[SINK : 300 - RECENT, h], dims[h], WINDOW, FREQS)
        for t in range(300 - RECENT, 330 - RECENT):
            middle.append(keys[t, h])
        torch.testing.assert_close(k[SINK : 330 - RECENT, h], middle.decoded(), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(k[:SINK, h], keys[:SINK, h])
        torch.testing.assert_close(k[330 - RECENT :, h], keys[330 - RECENT : 330, h])


def test_compression_starts_when_the_middle_outgrows_its_coefficients() -> None:
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(200, 1, 8, generator=g)
    s = stream([torch.arange(8)])
    n = SINK + RECENT + 2 * FREQS
    s.step(torch.randn(n, 2, 8, generator=g), keys[:n], keys[:n])
    assert not s.compressed()
    torch.testing.assert_close(s.visible()[0], keys[:n])  # exact up to sink + recent + 2k
    s.step(torch.randn(1, 2, 8, generator=g), keys[n : n + 1], keys[n : n + 1])
    assert s.compressed()  # the first overflow compresses in decode, fitting the normalisation then
    assert not torch.allclose(s.visible()[0][SINK : n + 1 - RECENT], keys[SINK : n + 1 - RECENT])


def test_one_prefill_step_attends_exactly() -> None:
    # As in the paper, a prompt prefilled in one step attends to itself exactly; its middle is
    # compressed for the steps after it.
    g = torch.Generator().manual_seed(2)
    keys, values = structured(500, 2, 16, g), structured(500, 2, 16, g)
    query = torch.randn(500, 4, 16, generator=g)
    s = stream([torch.arange(8), torch.arange(4, 12)])
    out = s.step(query, keys, values)
    torch.testing.assert_close(out, causal_gqa_attention(query, keys, values, 0.25, 0))
    assert s.compressed()


def test_chunked_prefill_error_on_structured_kv() -> None:
    # Chunks after the first attend to the compressed middle of the earlier ones. On structured K/V
    # with the smooth half compressed, 6 chunks of 200 give 2.6% relative (Frobenius) error over
    # all queries against dense attention, the one-shot formula's order (test_fourier_reference:
    # ~3% for one decode query); compressing the noise-like half instead gives 11.8%. The bound
    # leaves 1.5x room for float differences across platforms, not for a different method.
    g = torch.Generator().manual_seed(3)
    length, size = 1200, 32
    keys, values = structured(length, 2, size, g), structured(length, 2, size, g)
    query = torch.randn(length, 6, size, generator=g)
    dense = causal_gqa_attention(query, keys, values, size**-0.5, 0)

    def error(dims: list[torch.Tensor]) -> float:
        s = FourierStream(dims, dims, sink=4, recent=64, freqs=128, window=2048, scale=size**-0.5)
        out = torch.cat([s.step(query[i : i + 200], keys[i : i + 200], values[i : i + 200])
                         for i in range(0, length, 200)])
        return float((out - dense).norm() / dense.norm())

    smooth, noisy = [torch.arange(size // 2)] * 2, [torch.arange(size // 2, size)] * 2
    assert error(smooth) < 0.04
    assert error(noisy) > 3 * error(smooth)


def test_fft_forms_equal_the_basis_sums() -> None:
    from kvfold.attention_backends.fourier.reference import basis, project, reconstruct

    g = torch.Generator().manual_seed(4)
    x = torch.randn(300, 5, generator=g)
    for start in (0, 57):
        torch.testing.assert_close(spectral.project(x, WINDOW, FREQS, start),
                                   project(x, start, WINDOW, FREQS), atol=1e-3, rtol=1e-4)
    coef = project(x, 0, WINDOW, FREQS)
    torch.testing.assert_close(spectral.reconstruct(coef, 300, WINDOW), reconstruct(coef, 300, WINDOW),
                               atol=1e-4, rtol=1e-4)
    z, p = torch.randn(3, 2 * FREQS, generator=g), torch.rand(3, 300, generator=g)
    f = basis(torch.arange(300), WINDOW, FREQS)
    torch.testing.assert_close(spectral.synthesize(z, 300, WINDOW), z @ f / FREQS, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(spectral.analyze(p, WINDOW, FREQS), p @ f.T, atol=1e-3, rtol=1e-4)
    assert math.isclose(float(spectral.analyze(p, WINDOW, FREQS)[0, 1]), 0.0, abs_tol=1e-4)  # sin(0) row
