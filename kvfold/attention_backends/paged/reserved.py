"""A full-attention spec whose requests own extra leading blocks: fixed per-request state in vLLM's allocator.

vLLM sizes a request's blocks by its token count only. Methods that also hold a fixed amount per
request (VQKV's exact sink/recent ring, FourierAttention's spectral coefficients) use
:class:`ReservedBlocksSpec`: it adds ``reserved_blocks`` to what a request is allocated
(:class:`ReservedBlocksManager`), to its block-table row (columns ``0 .. reserved_blocks - 1``, the
position blocks follow), and to the memory per request behind vLLM's "Maximum concurrency" line and
admission. Registered with vLLM's ``KVCacheSpecRegistry`` by the kvfold plugin in every process.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch

from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec

if TYPE_CHECKING:
    from vllm.config import VllmConfig


@dataclass(frozen=True, kw_only=True)
class ReservedBlocksSpec(FullAttentionSpec):
    reserved_blocks: int = 0

    def max_memory_usage_bytes(self, vllm_config: VllmConfig) -> int:
        return super().max_memory_usage_bytes(vllm_config) + self.reserved_blocks * self.page_size_bytes

    def max_num_blocks_per_req(self, vllm_config: VllmConfig, max_len: int) -> int:
        return super().max_num_blocks_per_req(vllm_config, max_len) + self.reserved_blocks

    @classmethod
    def merge(cls, specs: list[Any]) -> ReservedBlocksSpec:
        reserved = {spec.reserved_blocks for spec in specs}
        if len(reserved) != 1:
            raise ValueError(f"layers of one KV-cache group reserve different blocks: {reserved}")
        merged = super().merge(specs)  # builds cls(...) from the AttentionSpec fields only
        return dataclasses.replace(merged, reserved_blocks=reserved.pop())


class ReservedBlocksManager(FullAttentionManager):
    """Full attention plus ``reserved_blocks`` per request, counted as tokens ahead of position 0."""

    def _reserved_tokens(self) -> int:
        return self.kv_cache_spec.reserved_blocks * self.block_size

    def get_num_blocks_to_allocate(
        self,
        request_id: str,
        num_tokens: int,
        new_computed_blocks: Any,
        total_computed_tokens: int,
        num_local_computed_tokens: int,
        num_tokens_main_model: int,
        apply_admission_cap: bool = False,
        prefill_end: int = 0,
    ) -> int:
        extra = self._reserved_tokens()
        return super().get_num_blocks_to_allocate(
            request_id,
            num_tokens + extra,
            new_computed_blocks,
            total_computed_tokens,
            num_local_computed_tokens,
            num_tokens_main_model + extra,
            apply_admission_cap,
            prefill_end,
        )

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int) -> list:
        extra = self._reserved_tokens()
        return super().allocate_new_blocks(request_id, num_tokens + extra, num_tokens_main_model + extra)


def register() -> None:
    """Make vLLM's registry map :class:`ReservedBlocksSpec` to its manager (idempotent)."""
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    # Registering first would leave the registry non-empty, and vLLM would then skip its built-ins.
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(ReservedBlocksSpec, ReservedBlocksManager,
                                 uniform_type_base_spec=ReservedBlocksSpec)


def reserved_spec(spec: AttentionSpec, *, reserved_blocks: int, state_content_bytes: int,
                  num_head_slots: int | None = None) -> ReservedBlocksSpec:
    """``spec`` (vLLM's standard page for the layer) as uint8 cells of ``state_content_bytes``
    bytes, ``num_head_slots`` per (block, slot) (default: one per KV head), plus reserved blocks."""
    shared = {f.name for f in fields(FullAttentionSpec)}
    base = {f.name: getattr(spec, f.name) for f in fields(spec) if f.name in shared and f.init}
    base.update(dtype=torch.uint8, state_content_bytes=state_content_bytes,
                num_head_slots=num_head_slots, reserved_blocks=reserved_blocks)
    return ReservedBlocksSpec(**base)
