"""FourierAttention, the specification (arXiv 2506.11886 and the authors' code), in plain torch.

A request's K/V are split in time into ``sink`` initial tokens, a middle, and ``recent`` local
tokens. Initial and local tokens stay exact. In the middle, each KV head's *compressed* dims
(chosen offline, :mod:`kvfold.attention_backends.fourier.selection`) are kept only as ``2 k``
translated-Fourier coefficients over a window of ``T`` middle positions (fp32); its *kept* dims stay
per token. A token leaving the local window adds a rank-1 update ``f_t x_t^T`` to the coefficients.

* Basis: ``F[2k, T]`` with rows ``1, 0, cos(2 pi n t / T), sin(2 pi n t / T)`` for ``n = 1..k-1``
  (:func:`basis`; the second row is the identically zero ``sin(0)``, kept so row ``2n`` / ``2n + 1``
  is frequency ``n`` as in the paper).
* Reconstruction: ``x_hat = (1 / k) F^T C`` (the paper's eq. 6; not the exact inverse DFT), then the
  affine re-normalisation the authors' code adds: per compressed dim, ``(x_hat - avg_d) * dev_u /
  dev_d + avg_u`` where ``avg``/``dev`` are the mean and the max absolute deviation of the original
  (``u``) and reconstructed (``d``) middle, taken once when the middle is first compressed.
* Attention over a middle token uses exact kept dims and reconstructed compressed dims.

Everything a decode step needs from the compressed dims is linear in ``C``, so the query can be
projected onto the coefficients instead of rebuilding ``|compressed dims|`` signals per token
(:func:`middle_scores`, :func:`middle_values`): ``O(2k * L)`` per head rather than
``O(2k * L * |dims|)``, and exact. The authors' kernel rebuilds; kvfold's does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def basis(positions: torch.Tensor, window: int, freqs: int) -> torch.Tensor:
    """``[2 * freqs, len(positions)]`` float32: the translated-Fourier rows at middle ``positions``."""
    t = positions.to(torch.float64)[None, :]
    n = torch.arange(freqs, dtype=torch.float64, device=positions.device)[:, None]
    angle = 2.0 * math.pi * n * t / window
    rows = torch.stack([torch.cos(angle), torch.sin(angle)], 1)  # [freqs, 2, L]
    return rows.reshape(2 * freqs, -1).float()


def project(x: torch.Tensor, start: int, window: int, freqs: int) -> torch.Tensor:
    """Coefficients ``[2k, D]`` of ``x`` ``[L, D]`` at middle positions ``start .. start + L - 1``."""
    positions = torch.arange(start, start + x.shape[0], device=x.device)
    return basis(positions, window, freqs) @ x.float()


def reconstruct(coef: torch.Tensor, length: int, window: int) -> torch.Tensor:
    """``[length, D]``: ``(1 / k) F^T C`` at middle positions ``0 .. length - 1`` (before normalisation)."""
    freqs = coef.shape[0] // 2
    positions = torch.arange(length, device=coef.device)
    return basis(positions, window, freqs).T @ coef / freqs


@dataclass
class Normalization:
    """Per compressed dim: ``x -> (x - avg_d) * scale + avg_u`` with ``scale = dev_u / dev_d``."""

    avg_u: torch.Tensor
    avg_d: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def fit(cls, original: torch.Tensor, recon: torch.Tensor) -> Normalization:
        avg_u, avg_d = original.float().mean(0), recon.mean(0)
        dev_u = (original.float() - avg_u).abs().amax(0)
        dev_d = (recon - avg_d).abs().amax(0)
        # A constant reconstruction carries no shape to rescale: keep it, moved to the mean.
        scale = torch.where(dev_d > 0, dev_u / dev_d.clamp(min=torch.finfo(torch.float32).tiny), 1.0)
        return cls(avg_u, avg_d, scale)

    def apply(self, recon: torch.Tensor) -> torch.Tensor:
        return (recon - self.avg_d) * self.scale + self.avg_u

    @property
    def offset(self) -> torch.Tensor:
        """``avg_u - avg_d * scale``: the normalisation is ``x * scale + offset``."""
        return self.avg_u - self.avg_d * self.scale


@dataclass
class CompressedMiddle:
    """One KV head's middle for one of K or V: coefficients of the compressed dims, the kept dims."""

    dims: torch.Tensor  # [Dc] indices of the compressed dims
    kept_dims: torch.Tensor  # [Dk] the others
    coef: torch.Tensor  # [2k, Dc] float32
    norm: Normalization
    kept: torch.Tensor  # [L, Dk] per-token kept dims
    window: int

    @classmethod
    def compress(cls, x: torch.Tensor, dims: torch.Tensor, window: int, freqs: int) -> CompressedMiddle:
        """The first compression of a middle ``x`` ``[L, D]`` (prefill, or the first overflow)."""
        if x.shape[0] > window:
            raise ValueError(f"a middle of {x.shape[0]} tokens does not fit a Fourier window of {window}")
        kept_dims = complement(dims, x.shape[1])
        coef = project(x[:, dims], 0, window, freqs)
        norm = Normalization.fit(x[:, dims], reconstruct(coef, x.shape[0], window))
        return cls(dims, kept_dims, coef, norm, x[:, kept_dims].float(), window)

    @property
    def length(self) -> int:
        return self.kept.shape[0]

    @property
    def freqs(self) -> int:
        return self.coef.shape[0] // 2

    def append(self, x: torch.Tensor) -> None:
        """A token ``x`` ``[D]`` leaving the local window: rank-1 update, kept dims appended."""
        t = self.length
        if t >= self.window:
            raise ValueError(f"the middle is full: {self.window} positions (the request outgrew its window)")
        f = basis(torch.tensor([t], device=x.device), self.window, self.freqs)  # [2k, 1]
        self.coef += f @ x[self.dims].float()[None, :]
        self.kept = torch.cat([self.kept, x[self.kept_dims].float()[None, :]])

    def decoded(self) -> torch.Tensor:
        """``[L, D]``: what attention sees of the middle (kept dims exact, the rest rebuilt)."""
        out = torch.empty(self.length, self.dims.numel() + self.kept_dims.numel())
        out[:, self.kept_dims] = self.kept
        out[:, self.dims] = self.norm.apply(reconstruct(self.coef, self.length, self.window))
        return out


def complement(dims: torch.Tensor, size: int) -> torch.Tensor:
    """The dims of ``0 .. size - 1`` not in ``dims`` (the ones a head keeps per token), sorted."""
    mask = torch.ones(size, dtype=torch.bool)
    mask[dims] = False
    return torch.arange(size)[mask]


def middle_scores(q: torch.Tensor, middle: CompressedMiddle) -> torch.Tensor:
    """``q . k_t`` ``[G, L]`` for query rows ``q`` ``[G, D]`` over the middle's keys, from the
    coefficients: ``z = C (q_c * scale)`` (``[G, 2k]``), then ``(1 / k) z F`` plus the constant."""
    qc = q[:, middle.dims].float()
    z = (qc * middle.norm.scale) @ middle.coef.T  # [G, 2k]
    f = basis(torch.arange(middle.length), middle.window, middle.freqs)  # [2k, L]
    const = qc @ middle.norm.offset  # [G]
    return z @ f / middle.freqs + const[:, None] + q[:, middle.kept_dims].float() @ middle.kept.T


def middle_values(p: torch.Tensor, middle: CompressedMiddle) -> torch.Tensor:
    """``sum_t p_t v_t`` ``[G, D]`` for weights ``p`` ``[G, L]`` over the middle's values:
    ``w = p F^T`` (``[G, 2k]``), then ``scale * (1 / k) w C + offset * sum(p)``."""
    f = basis(torch.arange(middle.length), middle.window, middle.freqs)
    w = p.float() @ f.T
    out = torch.empty(p.shape[0], middle.dims.numel() + middle.kept_dims.numel())
    out[:, middle.dims] = (w @ middle.coef / middle.freqs) * middle.norm.scale + \
        p.float().sum(1, keepdim=True) * middle.norm.offset
    out[:, middle.kept_dims] = p.float() @ middle.kept
    return out


def fourier_decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    key_dims: list[torch.Tensor],
    value_dims: list[torch.Tensor],
    *,
    sink: int,
    recent: int,
    window: int,
    freqs: int,
    scale: float,
) -> torch.Tensor:
    """The last token's attention output ``[Hq, Dv]`` over a request's ``keys``/``values``
    ``[L, Hk, D]`` (post-RoPE), its middle compressed at once: FourierAttention as a dense reference.

    ``key_dims[h]``/``value_dims[h]`` are KV head ``h``'s compressed dims. A request no longer than
    ``sink + recent`` attends exactly.
    """
    num_tokens, num_kv_heads, _ = keys.shape
    group = query.shape[0] // num_kv_heads
    middle_end = max(sink, num_tokens - recent)
    out = []
    for h in range(num_kv_heads):
        q = query[h * group : (h + 1) * group].float()
        k, v = keys[:, h].float(), values[:, h].float()
        parts_k = [k[:sink], k[middle_end:]]
        parts_v = [v[:sink], v[middle_end:]]
        if middle_end > sink:
            mk = CompressedMiddle.compress(k[sink:middle_end], key_dims[h], window, freqs).decoded()
            mv = CompressedMiddle.compress(v[sink:middle_end], value_dims[h], window, freqs).decoded()
            parts_k.insert(1, mk)
            parts_v.insert(1, mv)
        probs = torch.softmax(q @ torch.cat(parts_k).T * scale, -1)
        out.append(probs @ torch.cat(parts_v))
    return torch.cat(out)
