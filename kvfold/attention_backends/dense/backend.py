"""KVFOLD_DENSE on vLLM: K and V stored as the model (or ``--kv-cache-dtype``) dtype, no compression.

The cache page is vLLM's standard one (``[..., :head_size]`` = K, ``[..., head_size:]`` = V), so
its KV capacity equals the built-in backends'. It exists to test the shared paged machinery
token-for-token against vLLM's own backends and to show a new method what to fill in.
"""

from __future__ import annotations

import torch
from vllm.v1.attention.backend import AttentionLayer

from kvfold.attention_backends.paged.attention import causal_gqa_attention
from kvfold.attention_backends.paged.backend import KvfoldBackend, KvfoldImpl
from kvfold.attention_backends.paged.cache import gather_tokens, write_tokens
from kvfold.attention_backends.paged.metadata import PagedMetadata
from kvfold.options import MethodOptions

NAME = "KVFOLD_DENSE"


class DenseOptions(MethodOptions):
    """KVFOLD_DENSE has no options; any key given is refused."""


class DenseImpl(KvfoldImpl):
    method_name = NAME
    options_model = DenseOptions

    def write_kv(
        self,
        layer: AttentionLayer,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        write_tokens(kv_cache, slot_mapping, torch.cat([key, value], dim=-1))

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
        for i, start, end, seq_len in metadata.requests():
            kv = gather_tokens(kv_cache, metadata.block_table[i], seq_len)
            cached_k, cached_v = kv[..., : self.head_size], kv[..., self.head_size :]
            out = causal_gqa_attention(
                query[start:end], cached_k, cached_v, self.scale, seq_len - (end - start)
            )
            output[start:end] = out.to(output.dtype)


class DenseBackend(KvfoldBackend):
    options_model = DenseOptions

    @staticmethod
    def get_name() -> str:
        return NAME

    @staticmethod
    def get_impl_cls() -> type[DenseImpl]:
        return DenseImpl
