"""TreeKV on a dense per-request cache: the specification the paged vLLM backend must reproduce.

Per layer and KV head the cache holds at most ``budget`` tokens: ``sink`` first tokens, a tree region
of ``budget - sink - recent`` slots, and the ``recent`` newest tokens (the paper's LM setup:
4 + 512 + 508). Each decode step appends one token; when the cache overflows, the token leaving the
recent window has entered the tree region, and the tree region drops one of the adjacent pair at its
cursor, the one with the lower *average* attention received (the paper's S/C), then the cursor moves
one slot right, wrapping (the paper prints ``idx = (idx+1) mod c + 1``, which skips a slot; its text
and figure cycle 1, 2, 3, ...). Repeated sweeps halve the density of older context: recent context
dense, distant context sparse, with a smooth transition.

Prefill of a prompt longer than the budget applies the same schedule to blocks of
``prefill_block`` tokens, scored by the attention of the prompt's last block (the observation
window). vLLM prefills long prompts in chunks, so a prefill chunk is applied to the cache left by
the previous chunks: its entries (old and new) form the blocks. A single chunk is the paper's rule.
Choices the paper leaves open, made here:

* the middle (neither sink nor recent) is cut into blocks from its newest end; the ``m mod b``
  oldest middle tokens that do not fill a block are dropped (they are the context the tree keeps
  sparsest), so every head keeps the same number of tokens;
* decode starts its cursor at the tree's first slot after a prefill;
* GQA: a KV head's score is the mean over the query heads that read it;
* ``positions="rank"`` re-rotates stored keys (vLLM stores them after RoPE) so that a token's
  position is its rank in the cache, as the paper does with keys stored before RoPE;
  ``positions="original"`` keeps every token's own position.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from kvfold.attention_backends.treekv.options import TreeKVOptions


def rope_rotate(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Advance neox-style rotary pairs of ``x`` ``[..., n, D]`` by ``delta`` ``[..., n]`` positions.

    Rotations compose, so a key already rotated to position ``p`` moves to ``p + delta``. Dims past
    ``2 * len(inv_freq)`` (partial rotary) are left as they are.
    """
    half = inv_freq.numel()
    angles = delta[..., None].to(torch.float32) * inv_freq.to(x.device, torch.float32)
    cos, sin = angles.cos(), angles.sin()
    x = x.float()
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def evict_one(avg: torch.Tensor, cursor: int) -> torch.Tensor:
    """Per head, which of the pair (cursor, cursor + 1) of ``avg`` ``[H, n]`` to drop.

    The right one only if the left one scored strictly higher: ties drop the left one.
    """
    left, right = avg[:, cursor], avg[:, cursor + 1]
    return torch.where(left > right, cursor + 1, cursor)


def _sweep_blocks(block_avg: np.ndarray, capacity: int) -> np.ndarray:
    """Block indices ``[H, min(n, capacity)]`` each head keeps after the tree sweep over ``n`` blocks.

    The decode rule at block granularity: blocks enter one by one; when ``capacity`` is exceeded the
    lower-scored block of the pair at the cursor goes (ties: the left one), and the cursor advances.
    """
    heads, num_blocks = block_avg.shape
    rows = np.arange(heads)
    kept = np.empty((heads, 0), dtype=np.int64)
    cursor = 0
    for b in range(num_blocks):
        kept = np.concatenate([kept, np.full((heads, 1), b)], axis=1)
        if kept.shape[1] > capacity:
            left = block_avg[rows, kept[:, cursor]]
            right = block_avg[rows, kept[:, cursor + 1]]
            keep = np.ones(kept.shape, dtype=bool)
            keep[rows, cursor + (left > right)] = False
            kept = kept[keep].reshape(heads, -1)
            cursor = (cursor + 1) % capacity
    return kept


class TreeSchedule:
    """The cursor of a tree region of ``capacity`` slots, shared by every head of a layer."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.cursor = 0

    def evict(self, avg: torch.Tensor) -> torch.Tensor:
        """``avg`` holds ``capacity + 1`` entries per head; returns the index each head drops."""
        if avg.shape[1] != self.capacity + 1:
            raise ValueError(f"tree region holds {avg.shape[1]} entries, expected {self.capacity + 1}")
        dropped = evict_one(avg, self.cursor)
        self.cursor = (self.cursor + 1) % self.capacity
        return dropped


@dataclass
class LayerCache:
    """One request's cache in one layer. Every KV head holds the same number of tokens, each its own."""

    keys: torch.Tensor  # [Hk, n, D], rotated to each token's original position
    values: torch.Tensor  # [Hk, n, Dv]
    positions: torch.Tensor  # [Hk, n] original positions, increasing along n
    score_sum: torch.Tensor  # [Hk, n] attention received (mean over the group's query heads)
    count: torch.Tensor  # [Hk, n] queries that contributed to score_sum

    @property
    def size(self) -> int:
        return self.positions.shape[1]

    def average(self) -> torch.Tensor:
        return self.score_sum / self.count.clamp(min=1)

    def take(self, index: torch.Tensor) -> LayerCache:
        """The entries ``index`` ``[Hk, m]`` of each head, in that order."""
        def pick(t: torch.Tensor) -> torch.Tensor:
            idx = index if t.dim() == 2 else index[..., None].expand(-1, -1, t.shape[-1])
            return t.gather(1, idx)

        return LayerCache(**{f.name: pick(getattr(self, f.name)) for f in fields(self)})

    def drop(self, index: torch.Tensor) -> LayerCache:
        """Without entry ``index[h]`` of each head ``h``."""
        return self.take(keep_all_but(index, self.size))

    def concat(self, other: LayerCache) -> LayerCache:
        return LayerCache(**{f.name: torch.cat([getattr(self, f.name), getattr(other, f.name).to(
            getattr(self, f.name).dtype)], 1) for f in fields(self)})


def keep_all_but(dropped: torch.Tensor, size: int) -> torch.Tensor:
    """``[H, size - 1]`` indices of each head's entries except ``dropped[h]``, in order."""
    dev = dropped.device
    keep = torch.ones(dropped.shape[0], size, dtype=torch.bool, device=dev)
    keep[torch.arange(dropped.shape[0], device=dev), dropped] = False
    return torch.arange(size, device=dev).expand_as(keep)[keep].view(dropped.shape[0], -1)


def _visible(size: int, num_new: int, device: torch.device) -> torch.Tensor:
    """``[num_new, size]``: entry j is visible to new token i when older, or new and at most i."""
    entries = torch.arange(size, device=device)
    return entries[None, :] <= entries[size - num_new :, None]


class TreeKV:
    """TreeKV for one request and one layer: feed it the sequence chunk by chunk with :meth:`extend`.

    A chunk of one token is a decode step (token-level rule); a longer chunk is a prefill chunk
    (block-level rule over the cache entries, scored by the chunk's last block). A whole prompt in
    one chunk is the paper's prefill; vLLM's chunked prefill feeds several chunks.
    """

    def __init__(self, options: TreeKVOptions, scale: float, inv_freq: torch.Tensor | None = None) -> None:
        if options.positions == "rank" and inv_freq is None:
            raise ValueError('positions="rank" re-rotates keys and needs the model\'s inv_freq')
        self.options = options
        self.scale = scale
        self.inv_freq = inv_freq
        self.schedule = TreeSchedule(options.tree)
        self.cache: LayerCache | None = None
        #: After :meth:`extend`: per head, which of (cache before, new tokens) each kept entry is.
        self.kept_index = torch.empty(0, 0, dtype=torch.long)

    def prefill(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """A whole prompt (``[L, H, D]``, positions 0..L-1) as one chunk."""
        self.cache = None
        return self.extend(query, key, value, 0)

    def decode(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, position: int) -> torch.Tensor:
        """One token: ``query`` ``[Hq, D]``, ``key``/``value`` ``[Hk, D]``."""
        return self.extend(query[None], key[None], value[None], position)[0]

    def extend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, start: int
    ) -> torch.Tensor:
        """Append tokens ``start ..`` (``[q, H, D]``), attend causally over the cache, then evict."""
        num_new, num_kv_heads, dev = key.shape[0], key.shape[1], key.device
        new = LayerCache(
            keys=key.transpose(0, 1),
            values=value.transpose(0, 1),
            positions=torch.arange(start, start + num_new, device=dev).expand(num_kv_heads, -1),
            score_sum=torch.zeros(num_kv_heads, num_new, device=dev),
            count=torch.zeros(num_kv_heads, num_new, device=dev),
        )
        cache = new if self.cache is None else self.cache.concat(new)
        keys, q = self._rotated(cache, query, start)
        out = self._output(q, keys, cache.values, num_new)
        # Scores come from the last `window` queries only (the observation window; one in decode).
        window = 1 if num_new == 1 else min(self.options.prefill_block, num_new)
        probs = self._window_probs(q[:, num_new - window :], keys, num_new)  # [Hk, G, window, n]
        cache.score_sum += probs.sum(2).mean(1)
        cache.count += _visible(cache.size, num_new, dev)[num_new - window :].sum(0).float()
        kept = torch.arange(cache.size, device=dev).expand(num_kv_heads, -1)
        if cache.size > self.options.budget:
            kept = self._evict_token(cache) if num_new == 1 else self._evict_blocks(cache)
            cache = cache.take(kept)
        if num_new > 1:
            self.schedule.cursor = 0
        self.cache, self.kept_index = cache, kept
        return out

    def _rotated(self, cache: LayerCache, query: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 keys ``[Hk, n, D]`` and queries ``[Hq, q, D]`` at the positions attention uses."""
        num_new, n = query.shape[0], cache.size
        keys, q = cache.keys.float(), query.float().transpose(0, 1)
        if self.options.positions == "rank":
            ranks = torch.arange(n, device=keys.device)
            keys = rope_rotate(keys, ranks.expand_as(cache.positions) - cache.positions, self.inv_freq)
            q_ranks = ranks[n - num_new :] - (ranks[:num_new] + start)
            q = rope_rotate(q, q_ranks.expand(q.shape[0], -1), self.inv_freq)
        return keys, q

    def _window_probs(self, q: torch.Tensor, keys: torch.Tensor, num_new: int) -> torch.Tensor:
        """Attention probabilities ``[Hk, G, w, n]`` of the last ``w`` new queries ``q`` ``[Hq, w, D]``."""
        num_kv_heads, n = keys.shape[0], keys.shape[1]
        group, window = q.shape[0] // num_kv_heads, q.shape[1]
        logits = torch.einsum("hgqd,hnd->hgqn", q.reshape(num_kv_heads, group, window, -1), keys)
        visible = _visible(n, num_new, keys.device)[num_new - window :]
        return torch.softmax((logits * self.scale).masked_fill(~visible, float("-inf")), dim=-1)

    def _output(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, num_new: int) -> torch.Tensor:
        """Causal attention ``[q, Hq, Dv]`` of every new query over the cache (entries in order)."""
        probs = self._window_probs(q, keys, num_new)
        out = torch.einsum("hgqn,hnd->qhgd", probs, values.float())
        return out.reshape(num_new, q.shape[0], -1)

    def _evict_token(self, cache: LayerCache) -> torch.Tensor:
        """Entry indices ``[Hk, budget]`` after one decode-step eviction in the tree region."""
        o = self.options
        dropped = self.schedule.evict(cache.average()[:, o.sink : o.sink + o.tree + 1])
        return keep_all_but(dropped + o.sink, cache.size)

    def _evict_blocks(self, cache: LayerCache) -> torch.Tensor:
        """Entry indices ``[Hk, kept]`` after block-level tree eviction of the cache's middle."""
        o = self.options
        avg = cache.average()
        heads, length = avg.shape
        dev = avg.device
        block = o.prefill_block
        middle = length - o.sink - o.recent
        num_blocks, start = middle // block, o.sink + middle % block
        block_avg = avg[:, start : start + num_blocks * block].view(heads, num_blocks, block).mean(-1)
        # The sweep is sequential and tiny (one step per block): numpy on the host costs one copy
        # and microseconds per block, where device tensors cost launches and syncs per block.
        kept = torch.from_numpy(_sweep_blocks(block_avg.float().cpu().numpy(), o.tree // block))
        kept = kept.to(dev)
        tree_entries = (start + kept[..., None] * block + torch.arange(block, device=dev)).flatten(1)
        sink = torch.arange(o.sink, device=dev).expand(heads, -1)
        recent = torch.arange(length - o.recent, length, device=dev).expand(heads, -1)
        return torch.cat([sink, tree_entries, recent], 1)
