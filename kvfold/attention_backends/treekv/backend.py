"""KVFOLD_TREEKV on vLLM: TreeKV's fixed budget inside vLLM's paged allocator.

Accounting: ``customize_spec`` turns the layer's spec into a ``SlidingWindowSpec`` with window
``budget + 1``, so vLLM itself releases a request's blocks whose positions all lie more than
``budget`` tokens back, admits requests by that bound and reports the larger max concurrency.
Eviction happens in slot space: each step, per request and layer, the entries TreeKV keeps
(different ones per head) are read from the request's live blocks, the new tokens are attended and
evicted exactly as in ``reference.TreeKV``, and the kept entries are written back into slots of
blocks that survive the next release. Prefill chunks take that per-request path in torch; the
decode requests of a step go through ``decode.decode_batch`` together (the Triton kernel, replayed
as a CUDA graph per padded batch size on the GPU: ``paged.graphs``).
"""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING, Any

import torch
from vllm.v1.attention.backend import AttentionLayer
from vllm.v1.kv_cache_interface import AttentionSpec, SlidingWindowSpec

from kvfold.attention_backends.paged.attention import prefill_attention
from kvfold.attention_backends.paged.backend import KvfoldBackend, KvfoldImpl, spec_options
from kvfold.attention_backends.paged.counts import DeferredCount, check_invariants
from kvfold.attention_backends.paged.graphs import GraphedStep, bucket, kv_cache_key
from kvfold.attention_backends.paged.metadata import PagedMetadata
from kvfold.attention_backends.paged.transfer import to_device
from kvfold.attention_backends.treekv.decode import DecodeBatch, decode_batch
from kvfold.attention_backends.treekv.options import TreeKVOptions
from kvfold.attention_backends.treekv.pages import PageViews, content_bytes
from kvfold.attention_backends.treekv.reference import LayerCache, TreeKV
from kvfold.options import KvfoldConfigError

if TYPE_CHECKING:
    from vllm.config import VllmConfig

NAME = "KVFOLD_TREEKV"


def rope_inv_freq(vllm_config: VllmConfig, head_size: int) -> torch.Tensor:
    """Inverse frequencies of the model's plain neox RoPE; other RoPE variants are refused."""
    hf = vllm_config.model_config.hf_text_config
    params = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    rope_pp = getattr(hf, "rope_config", None) or {}
    if isinstance(rope_pp, dict) and (rope_pp.get("factor") or rope_pp.get("yarn")):
        rope_type = "RoPE++ " + ("yarn" if rope_pp.get("yarn") else "linear factor")
    if rope_type not in ("default", None):
        raise KvfoldConfigError(
            f'{NAME}: positions="rank" re-rotates keys with plain RoPE; this model uses '
            f'rope_type {rope_type!r}. Use {{"kvfold": {{"positions": "original"}}}}.'
        )
    theta = float(params.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))
    factor = float(params.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0)))
    rotary = int(head_size * factor)
    return 1.0 / (theta ** (torch.arange(0, rotary, 2, dtype=torch.float32) / rotary))


class ChunkTreeKV(TreeKV):
    """The specification, with a chunk's causal attention run by ``prefill_attention`` (vLLM's flash
    attention on CUDA for 16-bit models) in the model's dtype: the reference's float32
    ``[Hq, chunk, n]`` scores cost more than the rest of a prefill chunk together. Scores for
    eviction still come from the observation window, in float32."""

    def __init__(self, options: TreeKVOptions, scale: float, inv_freq: torch.Tensor | None,
                 dtype: torch.dtype) -> None:
        super().__init__(options, scale, inv_freq)
        self.dtype = dtype

    def _output(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, num_new: int) -> torch.Tensor:
        if num_new == 1:
            return super()._output(q, keys, values, num_new)
        # [n, H, D] token-major and contiguous, as flash attention reads them.
        out = prefill_attention(q.transpose(0, 1).to(self.dtype).contiguous(),
                                keys.transpose(0, 1).to(self.dtype).contiguous(),
                                values.transpose(0, 1).to(self.dtype).contiguous(),
                                self.scale, keys.shape[1] - num_new)
        return out.float()


class TreeKVImpl(KvfoldImpl):
    method_name = NAME
    options_model = TreeKVOptions
    _reporter_taken = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from vllm.config import get_current_vllm_config

        config = get_current_vllm_config()
        self.dtype = config.model_config.dtype
        self.head_size_v = self.head_size
        self.inv_freq = (  # rope_rotate moves it to the device of the keys it rotates
            rope_inv_freq(config, self.head_size) if self.options.positions == "rank" else None
        )
        # Every layer drops the same number of tokens per KV head; the first layer built in this
        # worker reports them, so kvfold:tokens_evicted counts tokens, not tokens x layers.
        self._reports_evictions = not TreeKVImpl._reporter_taken
        TreeKVImpl._reporter_taken = True
        self._pages: PageViews | None = None  # this step's views, read by the graphed decode
        self._graphed_decode = GraphedStep(self._decode, on_memory=self.metrics.cuda_graph_bytes)
        self._decode_evictions = DeferredCount()  # read without a host sync, a step late on CUDA

    def attend(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: PagedMetadata,
        output: torch.Tensor,
    ) -> None:
        pages = PageViews.of(kv_cache, self.head_size, self.head_size_v, self.dtype)
        evicted = 0
        decoding = [(i, start, seq_len) for i, start, end, seq_len in metadata.requests() if end - start == 1]
        if decoding:
            self._decode_step(pages, metadata, decoding, query, key, value, output)
        for i, start, end, seq_len in metadata.requests():
            if end - start == 1:
                continue
            out, dropped = self._request_step(
                pages, metadata.block_table[i], metadata.slot_mapping[start:end], seq_len,
                query[start:end], key[start:end], value[start:end],
            )
            output[start:end] = out.to(output.dtype)
            evicted += dropped
        if self._reports_evictions:
            evicted += self._decode_evictions.take()
            if evicted:
                self.metrics.tokens_evicted(evicted)

    def _decode_step(
        self,
        pages: PageViews,
        metadata: PagedMetadata,
        decoding: list[tuple[int, int, int]],
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        output: torch.Tensor,
    ) -> None:
        """All one-token requests of the step at once; the reporting layer counts its evictions."""
        scratch_key = ("treekv-decode", self.options.budget)
        batch = metadata.scratch.get(scratch_key)
        if batch is None:  # built by the step's first layer, reused by the others
            reqs = to_device(torch.tensor([i for i, _, _ in decoding]), query.device)
            batch = DecodeBatch.build(
                [start for _, start, _ in decoding], [seq_len for _, _, seq_len in decoding],
                metadata.block_table[reqs], metadata.slot_mapping, self.options.budget,
                pages.position.shape[2], self.options.sink + 2, padded=bucket(len(decoding)),
            )
            metadata.scratch[scratch_key] = batch
        if self.inv_freq is not None and self.inv_freq.device != query.device:
            self.inv_freq = self.inv_freq.to(query.device)  # a graph cannot copy it from the host
        self._pages = pages
        rows, num = batch.rows, len(decoding)
        key_ = (kv_cache_key(pages.raw), rows.numel())
        out, over = self._graphed_decode(key_, query[rows], key[rows], value[rows], *batch.tensors)
        output[rows[:num]] = out[:num].to(output.dtype)
        if self._reports_evictions:
            self._decode_evictions.add(over[:num].sum())

    def _decode(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                *batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The graphed part of a decode step: :func:`decode_batch` on this layer's pages."""
        rows = batch[0].new_empty(0)  # decode_batch does not read the rows
        return decode_batch(self._pages, DecodeBatch(rows, *batch), query, key, value,
                            self.options, self.scale, self.inv_freq)

    def _request_step(
        self,
        pages: PageViews,
        block_row: torch.Tensor,
        new_slots: torch.Tensor,
        seq_len: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
    ) -> tuple[torch.Tensor, int]:
        """Attention output of one request's new tokens, and how many tokens each head dropped."""
        block_size = pages.position.shape[2]
        num_new = query.shape[0]
        num_old = seq_len - num_new
        budget = self.options.budget
        # The window manager released, before this step, every block lying wholly more than
        # `budget` tokens behind the computed tokens. The worker's block table still lists those
        # ids (now possibly another request's), so liveness comes from that rule, not the table.
        # Live, surviving and in-use slots are contiguous ranges of natural positions: slicing
        # them (host arithmetic) costs no device sync.
        first = max(num_old - budget, 0) // block_size * block_size
        blocks = block_row[first // block_size : -(-seq_len // block_size)].long()
        natural = torch.arange(blocks.numel() * block_size, device=blocks.device)
        slots = blocks.repeat_interleave(block_size) * block_size + natural % block_size
        # The next step releases blocks whose positions all lie below seq_len - budget.
        boundary = max(seq_len - budget, 0) // block_size * block_size

        tree = ChunkTreeKV(self.options, self.scale, self.inv_freq, self.dtype)
        # A head holds every token until the budget is reached, then exactly `budget`.
        held = min(num_old, budget)
        old_slots = self._read_entries(pages, slots[: num_old - first], tree, num_new == 1, held)
        out = tree.extend(query, key, value, num_old)
        dropped = old_slots.shape[1] + num_new - tree.cache.size

        # Where each kept entry is now: an old slot, or (new tokens) its slot from vLLM.
        kept = tree.cache
        index = tree.kept_index  # [Hk, kept] into old entries, then new tokens
        current = torch.cat([old_slots, new_slots.long().expand(old_slots.shape[0], -1)], 1)
        current = current.gather(1, index)
        surviving = slots[boundary - first : seq_len - first]
        in_use = slots[: seq_len - first]
        self._write_entries(pages, kept, current, surviving, in_use, tree.schedule.cursor)
        return out, dropped

    def _read_entries(
        self, pages: PageViews, candidates: torch.Tensor, tree: TreeKV, decoding: bool, num: int
    ) -> torch.Tensor:
        """Load the ``num`` kept entries of each head found in ``candidates`` slots into ``tree``;
        returns their slots.

        ``num`` is known on the host, so the step needs no device sync to size its tensors; where
        checks are free (CPU, or ``KVFOLD_CHECK_INVARIANTS=1``) the cache is checked to hold it.
        The tree cursor only matters to a decode step (a prefill chunk restarts it), so only then
        is it read (a device sync).
        """
        heads = pages.position.shape[1]
        block_size = pages.position.shape[2]
        blk, off = candidates // block_size, candidates % block_size
        position = pages.position[blk, :, off].T  # [Hk, S]
        valid = position >= 0
        if check_invariants(candidates.device):
            counts = valid.sum(1)
            if bool((counts != num).any()):
                raise RuntimeError(f"{NAME}: KV heads hold {counts.tolist()} entries, expected {num}")
        if num == 0:
            return candidates.new_empty(heads, 0)
        sentinel = torch.iinfo(torch.int32).max
        order = torch.where(valid, position, sentinel).argsort(dim=1, stable=True)[:, :num]
        entry_slots = candidates[order]  # [Hk, num], position order per head
        h = torch.arange(heads, device=candidates.device)[:, None]
        b, o = entry_slots // block_size, entry_slots % block_size
        tree.cache = LayerCache(
            keys=pages.k[b, h, o], values=pages.v[b, h, o], positions=pages.position[b, h, o].long(),
            score_sum=pages.score_sum[b, h, o], count=pages.count[b, h, o],
        )
        if decoding:
            tree.schedule.cursor = int(pages.cursor[b[0, 0], 0, o[0, 0]])
        return entry_slots

    @staticmethod
    def _write_entries(
        pages: PageViews,
        kept: LayerCache,
        current: torch.Tensor,
        surviving: torch.Tensor,
        in_use: torch.Tensor,
        cursor: int,
    ) -> None:
        """Store ``kept`` in surviving slots: an entry stays where it is if that slot survives.

        Every other slot of the request (``in_use``) is marked free, so an entry never appears
        twice, even while the block it left is still in the block table.
        """
        heads = current.shape[0]
        block_size = pages.position.shape[2]
        # Where each entry's current slot sits among the surviving slots (if it does).
        ordered, perm = surviving.sort()
        at = torch.searchsorted(ordered, current).clamp(max=max(ordered.numel() - 1, 0))
        stays = ordered[at] == current if ordered.numel() else torch.zeros_like(current, dtype=torch.bool)
        occupied = torch.zeros(heads, surviving.numel() + 1, dtype=torch.bool, device=current.device)
        occupied.scatter_(1, torch.where(stays, perm[at], surviving.numel()), True)
        free = ~occupied[:, :-1]  # [H, S] in surviving (natural) order
        movers = ~stays
        if check_invariants(current.device) and bool((movers.sum(1) > free.sum(1)).any()):
            raise RuntimeError(f"{NAME}: more entries to move than free surviving slots")
        # The k-th mover (in kept order) takes the k-th free slot (in natural order).
        free_first = (~free).to(torch.int8).argsort(dim=1, stable=True)
        rank = (movers.cumsum(1) - 1).clamp(min=0)
        moved_to = surviving[free_first.gather(1, rank)] if surviving.numel() else current
        target = torch.where(movers, moved_to, current)
        # Free every slot, then write the kept entries (their free marks are overwritten).
        sb, so = in_use // block_size, in_use % block_size
        pages.position[sb, :, so] = -1
        h = torch.arange(heads, device=target.device)[:, None]
        b, o = target // block_size, target % block_size
        pages.k[b, h, o] = kept.keys.to(pages.k.dtype)
        pages.v[b, h, o] = kept.values.to(pages.v.dtype)
        pages.position[b, h, o] = kept.positions.to(torch.int32)
        pages.score_sum[b, h, o] = kept.score_sum.float()
        pages.count[b, h, o] = kept.count.float()
        pages.cursor[b, h, o] = cursor


class TreeKVBackend(KvfoldBackend):
    options_model = TreeKVOptions
    forward_includes_kv_cache_update = True  # writes need positions, which forward has
    supported_kv_cache_dtypes = ["auto"]
    prefix_caching_refusal = (
        "rewrites cache blocks in place, so prefix caching cannot share them"
    )

    @staticmethod
    def get_name() -> str:
        return NAME

    @staticmethod
    def get_impl_cls() -> type[TreeKVImpl]:
        return TreeKVImpl

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        if isinstance(spec, SlidingWindowSpec) and spec.dtype == torch.uint8:
            return spec  # vLLM may call this more than once
        options = spec_options(NAME)
        shared = {f.name for f in fields(SlidingWindowSpec)}
        base = {f.name: getattr(spec, f.name) for f in fields(spec) if f.name in shared and f.init}
        base.update(
            dtype=torch.uint8,
            state_content_bytes=content_bytes(spec.head_size, spec.head_size_v, spec.dtype),
            sliding_window=options.budget + 1,
        )
        return SlidingWindowSpec(**base)

    @classmethod
    def check_vllm_config(cls, options: TreeKVOptions, vllm_config: VllmConfig) -> None:
        max_len = vllm_config.model_config.max_model_len
        if options.budget >= max_len:
            raise KvfoldConfigError(
                f"{NAME}: budget {options.budget} >= max model length {max_len}; nothing would be "
                "evicted (use the dense backend, or a smaller budget)"
            )
        if vllm_config.speculative_config is not None:
            raise KvfoldConfigError(f"{NAME} does not support speculative decoding")
        if options.positions == "rank":
            head_size = vllm_config.model_config.get_head_size()
            rope_inv_freq(vllm_config, head_size)
