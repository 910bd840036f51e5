"""Per-step attention metadata shared by kvfold backends."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from vllm.config import VllmConfig
from vllm.v1.attention.backend import (
    AttentionCGSupport,
    AttentionMetadataBuilder,
    CommonAttentionMetadata,
)
from vllm.v1.kv_cache_interface import AttentionSpec


@dataclass
class PagedMetadata:
    """What one forward step needs; host copies let the reference loop without device syncs."""

    num_reqs: int
    num_actual_tokens: int  # without padding (vLLM's own field of that name may include it)
    query_start_loc_cpu: torch.Tensor  # [num_reqs + 1]
    seq_lens_cpu: torch.Tensor  # [num_reqs], KV length after this step
    block_table: torch.Tensor  # [num_reqs, max_blocks], kernel-block ids into dim 0 of kv_cache
    slot_mapping: torch.Tensor  # [T], block_id * block_size + offset, -1 for padding
    max_query_len: int
    max_seq_len: int
    #: Per-step values a backend derives once and reuses in every layer (index tensors).
    scratch: dict = field(default_factory=dict)

    def requests(self) -> Iterator[tuple[int, int, int, int]]:
        """``(request, first query token, end query token, KV length)`` for requests with queries."""
        starts = self.query_start_loc_cpu.tolist()
        seq_lens = self.seq_lens_cpu.tolist()
        for i in range(self.num_reqs):
            if starts[i + 1] > starts[i]:
                yield i, starts[i], starts[i + 1], seq_lens[i]


class PagedMetadataBuilder(AttentionMetadataBuilder[PagedMetadata]):
    # The reference path loops over requests on the host; CUDA graphs cannot capture it.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> PagedMetadata:
        cm = common_attn_metadata
        n = cm.num_reqs
        query_start_loc_cpu = cm.query_start_loc_cpu[: n + 1].to(torch.int64)
        return PagedMetadata(
            num_reqs=n,
            num_actual_tokens=int(query_start_loc_cpu[-1]),
            query_start_loc_cpu=query_start_loc_cpu,
            seq_lens_cpu=cm.seq_lens[:n].to("cpu", torch.int64),
            block_table=cm.block_table_tensor[:n],
            slot_mapping=cm.slot_mapping,
            max_query_len=cm.max_query_len,
            max_seq_len=cm.max_seq_len,
        )
