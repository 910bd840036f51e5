"""Which head dims FourierAttention compresses: the paper's offline, per-layer selection.

For calibration text, each layer's ``k_proj``/``v_proj`` outputs (pre-RoPE, as the authors' search
hooks them) are split into sink / middle / recent, the middle of every dim is compressed and rebuilt
(:class:`reference.CompressedMiddle`, window = the middle's length), and the per-dim mean squared
error is averaged over sequences. Per layer, the lowest-error fraction of all ``KV heads x D`` dims
is compressed, so heads of a layer may compress different numbers of dims.

The fractions follow the paper's schedule for 32-layer Llama-3.1-8B ("inverted pyramid": more in V
and in early layers): layers 0-3 K 90% / V 95%, layers 20-27 K 50% / V 70%, the rest 80% / 80%,
about 76% of the KV overall. A model of another depth maps its layer ``i`` to ``i * 32 // layers``.
"""

from __future__ import annotations

import torch

from kvfold.attention_backends.fourier.reference import CompressedMiddle

PAPER_LAYERS = 32


def paper_fractions(layer: int, num_layers: int) -> tuple[float, float]:
    """(key, value) fraction of dims compressed in ``layer`` of a ``num_layers``-layer model."""
    position = layer * PAPER_LAYERS // num_layers
    if position < 4:
        return 0.90, 0.95
    if 20 <= position < 28:
        return 0.50, 0.70
    return 0.80, 0.80


def dim_errors(x: torch.Tensor, sink: int, recent: int, freqs: int) -> torch.Tensor:
    """``[Hk, D]`` mean squared error per dim of compressing the middle of ``x`` ``[L, Hk, D]``."""
    num_tokens, num_heads, size = x.shape
    middle = x[sink : num_tokens - recent].float()
    if middle.shape[0] < 2:
        raise ValueError(f"{num_tokens} tokens leave no middle after {sink} sink and {recent} recent")
    every = torch.arange(size)
    errors = torch.empty(num_heads, size)
    for h in range(num_heads):
        rebuilt = CompressedMiddle.compress(middle[:, h], every, middle.shape[0], freqs).decoded()
        errors[h] = ((rebuilt - middle[:, h]) ** 2).mean(0)
    return errors


def select(errors: torch.Tensor, fraction: float) -> list[torch.Tensor]:
    """Per head, the sorted dims among the layer's ``fraction`` lowest-error ``[Hk, D]`` entries."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction {fraction} is not in [0, 1]")
    num_heads, size = errors.shape
    chosen = errors.flatten().argsort()[: round(fraction * errors.numel())]
    return [torch.sort(chosen[chosen // size == h] % size).values for h in range(num_heads)]
