"""A decode step of all decoding requests at once: the codes and the exact tokens.

The kernel attends each request's coded middle ``[min(sink, n), max(n - recent, ...))``; the exact
tokens (sink, recent ring, the new token: at most ``sink + recent + 1`` per request) are one more
split of it where Triton runs (``ring.py``). Elsewhere (the specification, and caches whose bytes
the ring kernel cannot read as elements) the coded kernel returns its log-sum-exp, the exact tokens
are gathered and attended here, and the two softmaxes are merged. No host syncs.
"""

from __future__ import annotations

import torch

from kvfold.attention_backends.vqkv import ring
from kvfold.attention_backends.vqkv.kernels import RingInputs, decode_attention, triton_enabled
from kvfold.attention_backends.vqkv.pages import PageLayout, read_cells
from kvfold.attention_backends.vqkv.reference import LayerCodebooks


def exact_positions(computed: torch.Tensor, layout: PageLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """``[R, sink + recent]`` positions the ring holds for requests with ``computed`` cached tokens
    and whether each is real (a short request has fewer)."""
    sink = torch.arange(layout.sink, device=computed.device)[None, :].expand(computed.shape[0], -1)
    recent = computed[:, None] - layout.recent + torch.arange(layout.recent, device=computed.device)
    positions = torch.cat([sink, recent], 1)
    valid = torch.cat([sink < computed[:, None], recent >= layout.sink], 1) & (positions >= 0)
    return positions.clamp(min=0), valid


def decode_step(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cache: torch.Tensor,
    rows: torch.Tensor,
    seq_lens: torch.Tensor,
    layout: PageLayout,
    books: LayerCodebooks,
    scale: float,
    longest: int | None = None,
) -> torch.Tensor:
    """Outputs ``[R, Hq, Dv]`` (float32) of one new token per request; ``seq_lens`` include it.

    ``longest`` is the longest coded range if known on the host (saves the kernel a device sync).
    """
    num_reqs, num_heads, _ = query.shape
    num_kv_heads = key.shape[1]
    computed = seq_lens - 1
    starts = computed.clamp(max=layout.sink)
    ends = torch.maximum(computed - layout.recent, starts)
    if triton_enabled(query.device) and ring.usable(query, cache, layout):
        out, _ = decode_attention(query, cache, rows, layout.reserved_blocks, starts, ends, books, scale,
                                  longest=longest, ring=RingInputs(key, value, seq_lens, layout))
        return out
    coded_out, coded_lse = decode_attention(
        query, cache, rows, layout.reserved_blocks, starts, ends, books, scale, longest=longest
    )

    positions, valid = exact_positions(computed, layout)
    blocks, slots = layout.ring_cells(rows, layout.ring_index(positions))
    cells = read_cells(cache, blocks, slots)  # [R, E, m, Hk, C]
    k, v = layout.unpack_exact(cells.flatten(0, 1))
    k = torch.cat([k.view(num_reqs, -1, num_kv_heads, k.shape[-1]), key[:, None]], 1).float()
    v = torch.cat([v.view(num_reqs, -1, num_kv_heads, v.shape[-1]), value[:, None]], 1).float()
    valid = torch.cat([valid, valid.new_ones(num_reqs, 1)], 1)
    q = query.float().view(num_reqs, num_kv_heads, num_heads // num_kv_heads, -1)
    scores = torch.einsum("rhgd,rehd->rhge", q, k) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    exact_lse = scores.logsumexp(-1)  # finite: the new token is always there
    exact_out = torch.einsum("rhge,rehd->rhgd", scores.softmax(-1), v).reshape(num_reqs, num_heads, -1)
    exact_lse = exact_lse.reshape(num_reqs, num_heads)

    lse = torch.logaddexp(coded_lse, exact_lse)
    return coded_out * (coded_lse - lse).exp()[..., None] + exact_out * (exact_lse - lse).exp()[..., None]
