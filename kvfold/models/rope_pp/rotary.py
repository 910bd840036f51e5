"""RoPE++ rotary math in pure torch (neox / half-split pairing, as in Llama checkpoints).

Pair n of a head is the complex number z_n = x[n] + i x[n + d/2]. RoPE multiplies z_n by
e^{i t theta_n}, and the usual attention score is Re(sum_n q_n conj(k_n) e^{i (t-s) theta_n}).
RoPE++ adds a second head per query with score Im(...) of the same sum. Multiplying the rotated
query by -i turns Re into Im, and -i z is, in half-split layout, ``cat(x2, -x1)`` = -rotate_half:
so the imaginary head is an ordinary attention head whose query is ``imaginary_query(q_rope)``
against the unchanged rotated keys. No second cache, no extra trigonometry.
"""

from __future__ import annotations

import math

import torch

from kvfold.models.rope_pp.config import RoPEPPConfig

# The authors' YaRN blends each frequency by how many turns it makes over their pre-training
# length (4096 tokens), ramping between 1 and 32 turns. These are constants in their code, not
# read from the config, so they are constants here.
YARN_ORIGINAL_LENGTH = 4096
YARN_LOW_TURNS, YARN_HIGH_TURNS = 1.0, 32.0


def inverse_frequencies(
    head_dim: int, rope_theta: float, rope: RoPEPPConfig
) -> tuple[torch.Tensor, float]:
    """``(inv_freq [head_dim/2] float32, mscale)`` for ``rope``; cos and sin get x mscale."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope_theta**exponents)
    if rope.yarn:
        turns = YARN_ORIGINAL_LENGTH / (2 * math.pi) * inv_freq
        keep = ((turns - YARN_LOW_TURNS) / (YARN_HIGH_TURNS - YARN_LOW_TURNS)).clamp(0.0, 1.0)
        # Fast frequencies (many turns) are kept, slow ones interpolated by `factor`.
        inv_freq = (1 - keep) * inv_freq / rope.factor + keep * inv_freq
        return inv_freq, 0.1 * math.log(rope.factor) + 1.0
    return inv_freq / rope.factor, 1.0


def cos_sin_cache(inv_freq: torch.Tensor, mscale: float, num_positions: int) -> torch.Tensor:
    """``[num_positions, head_dim]``: cos in the first half, sin in the second (vLLM's layout)."""
    t = torch.arange(num_positions, dtype=torch.float)
    freqs = torch.outer(t, inv_freq.float())
    return torch.cat((freqs.cos() * mscale, freqs.sin() * mscale), dim=-1)


def imaginary_query(q_rope: torch.Tensor) -> torch.Tensor:
    """The imaginary head's query from the rotated real query ``[..., head_dim]``: -i * q."""
    half = q_rope.shape[-1] // 2
    return torch.cat((q_rope[..., half:], -q_rope[..., :half]), dim=-1)


def with_imaginary_heads(q_rope: torch.Tensor) -> torch.Tensor:
    """``[tokens, heads, d] -> [tokens, 2*heads, d]`` ordered [h0_re, h0_im, h1_re, h1_im, ...].

    Interleaving (the authors' order) keeps both heads of q head h next to each other, so they
    share h's KV head under GQA's contiguous grouping and stay on one tensor-parallel rank.
    """
    tokens, heads, dim = q_rope.shape
    return torch.stack((q_rope, imaginary_query(q_rope)), dim=2).reshape(tokens, 2 * heads, dim)
