"""RoPE++ Llama for vLLM, registered as ``LlamaForCausalLM`` and ``RoPEPPLlamaForCausalLM``.

Without ``rope_config`` in the config this class *is* vLLM's ``LlamaForCausalLM`` (it passes no
argument of its own, so the same layers and loader are built). With it, each decoder layer's
attention is :class:`RoPEPPAttention`: q/k/v/o projections shaped as in the authors' checkpoints
(loaded by vLLM's own stacked q/k/v -> qkv_proj loader), vLLM's rotary op fed the authors' cos/sin
table, and every query head followed by its imaginary twin. The attention layer is vLLM's
``Attention`` with twice the query heads per KV head, so whatever backend is selected (CPU_ATTN,
FlashAttention, KVFOLD_DENSE, ...) runs underneath, over a KV cache of ``num_kv_heads`` heads.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn
from vllm.config import CacheConfig, VllmConfig, get_current_vllm_config_or_none
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.v1.attention.backend import AttentionType

from kvfold.models.rope_pp.config import HeadLayout, RoPEPPConfigError, RoPEPPModelSpec, read_spec
from kvfold.models.rope_pp.rotary import cos_sin_cache, inverse_frequencies, with_imaginary_heads


class RoPEPPRotaryEmbedding(RotaryEmbedding):
    """vLLM's neox rotary op (native and CPU kernels) over the authors' cos/sin table."""

    def __init__(self, spec: RoPEPPModelSpec, num_positions: int, dtype: torch.dtype) -> None:
        # _compute_cos_sin_cache runs inside the base __init__, so the spec must be set first.
        object.__setattr__(self, "_spec", spec)
        head_dim = spec.layout.head_dim
        super().__init__(head_dim, head_dim, num_positions, spec.rope_theta, True, dtype)

    def _compute_cos_sin_cache(self) -> torch.Tensor:
        spec: RoPEPPModelSpec = self._spec
        inv_freq, mscale = inverse_frequencies(spec.layout.head_dim, spec.rope_theta, spec.rope)
        return cos_sin_cache(inv_freq, mscale, self.max_position_embeddings)


def _split_heads(total: int, tp: int, what: str) -> int:
    """Heads of ``what`` on one tensor-parallel rank; replicated when fewer than ranks (KV)."""
    if total >= tp:
        if total % tp:
            raise RoPEPPConfigError(f"{total} {what} cannot be split over {tp} TP ranks")
        return total // tp
    if tp % total:
        raise RoPEPPConfigError(f"{total} {what} cannot be replicated over {tp} TP ranks")
    return 1


class RoPEPPAttention(nn.Module):
    """Llama attention with RoPE++ heads; same constructor as vLLM's ``LlamaAttention``."""

    def __init__(
        self,
        config,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        max_position_embeddings: int = 8192,
        quant_config: QuantizationConfig | None = None,
        bias: bool = False,
        bias_o_proj: bool = False,
        cache_config: CacheConfig | None = None,
        prefix: str = "",
        attn_type: str = AttentionType.DECODER,
    ) -> None:
        super().__init__()
        spec = read_spec(config)
        if spec is None:
            raise RoPEPPConfigError("RoPEPPAttention needs a config with rope_config")
        if attn_type != AttentionType.DECODER:
            raise RoPEPPConfigError(f"RoPE++ supports decoder attention only, got {attn_type}")
        layout: HeadLayout = spec.layout
        tp = get_tensor_model_parallel_world_size()
        if layout.num_q_heads % tp:
            raise RoPEPPConfigError(
                f"{layout.num_q_heads} RoPE++ q_proj heads cannot be split over "
                f"tensor_parallel_size {tp}"
            )
        self.num_q_heads = layout.num_q_heads // tp
        self.num_kv_heads = _split_heads(layout.num_kv_heads, tp, "RoPE++ kv heads")
        self.imag = layout.imag
        self.num_attn_heads = self.num_q_heads * (2 if self.imag else 1)
        self.head_dim = layout.head_dim
        self.q_size = self.num_q_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim

        self.qkv_proj = QKVParallelLinear(
            hidden_size=hidden_size,
            head_size=self.head_dim,
            total_num_heads=layout.num_q_heads,
            total_num_kv_heads=layout.num_kv_heads,
            bias=bias,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
        )
        # Row-parallel splits o_proj's input into contiguous per-rank slices; with interleaved
        # [re, im] pairs, rank r's slice is exactly the attention output of its own q heads.
        self.o_proj = RowParallelLinear(
            input_size=layout.num_attn_heads * self.head_dim,
            output_size=hidden_size,
            bias=bias_o_proj,
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )
        vllm_config = get_current_vllm_config_or_none()
        max_model_len = vllm_config.model_config.max_model_len if vllm_config else 0
        self.rotary_emb = RoPEPPRotaryEmbedding(
            spec, max(max_position_embeddings, max_model_len), torch.get_default_dtype()
        )
        self.attn = Attention(
            self.num_attn_heads,
            self.head_dim,
            self.head_dim**-0.5,
            num_kv_heads=self.num_kv_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            attn_type=attn_type,
            prefix=f"{prefix}.attn",
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        if self.imag:
            q = with_imaginary_heads(q.view(-1, self.num_q_heads, self.head_dim))
            q = q.reshape(-1, self.num_attn_heads * self.head_dim)
        attn_output = self.attn(q, k, v)
        output, _ = self.o_proj(attn_output)
        return output


class RoPEPPDecoderLayer(LlamaDecoderLayer):
    """vLLM's Llama decoder layer (norms, MLP, residuals) around :class:`RoPEPPAttention`."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None) -> None:
        super().__init__(vllm_config, prefix, config, attn_layer_type=RoPEPPAttention)


def _expected_shapes(hf_config, layout: HeadLayout) -> dict[str, tuple[int, int]]:
    d, hidden = layout.head_dim, hf_config.hidden_size
    return {
        "self_attn.q_proj.weight": (layout.num_q_heads * d, hidden),
        "self_attn.k_proj.weight": (layout.num_kv_heads * d, hidden),
        "self_attn.v_proj.weight": (layout.num_kv_heads * d, hidden),
        "self_attn.o_proj.weight": (hidden, layout.num_attn_heads * d),
    }


def _describe(hf_config) -> str:
    raw = getattr(hf_config, "rope_config", None)
    return f"rope_config={raw}" if raw is not None else "no rope_config (plain Llama)"


def check_attention_shapes(
    weights: Iterable[tuple[str, torch.Tensor]], hf_config, layout: HeadLayout
) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass ``weights`` through, raising a clear error on the first attention weight whose shape
    disagrees with the config's head layout (vLLM's loader would only fail a shape assertion)."""
    expected = _expected_shapes(hf_config, layout)
    for name, tensor in weights:
        for suffix, shape in expected.items():
            if name.endswith(suffix) and tuple(tensor.shape) != shape:
                raise RoPEPPConfigError(
                    f"{name} has shape {tuple(tensor.shape)} but {_describe(hf_config)} with "
                    f"num_attention_heads={hf_config.num_attention_heads}, num_key_value_heads="
                    f"{getattr(hf_config, 'num_key_value_heads', None)} expects {shape}. A RoPE++ "
                    "checkpoint needs rope_config in config.json, e.g. --hf-overrides "
                    "'{\"rope_config\": {\"imag\": true, \"imag_mode\": \"imag1\"}}' for "
                    "RoPE++_EH (q_proj has half the heads) or \"imag2\" for RoPE++_EC (o_proj "
                    "has twice the input)"
                )
        yield name, tensor


class RoPEPPLlamaForCausalLM(LlamaForCausalLM):
    """vLLM's ``LlamaForCausalLM``, with RoPE++ attention when the config has ``rope_config``."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", **kwargs) -> None:
        spec = read_spec(vllm_config.model_config.hf_config)  # raises before any allocation
        if spec is not None:
            if "layer_type" in kwargs:
                raise RoPEPPConfigError("RoPE++ Llama builds its own decoder layers")
            kwargs["layer_type"] = RoPEPPDecoderLayer
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._rope_pp = spec
        # Quantized checkpoints store packed attention weights of other shapes: not checked.
        self._check_shapes = vllm_config.quant_config is None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        spec = self._rope_pp
        c = self.config
        if not self._check_shapes:
            return super().load_weights(weights)
        if spec is None:
            h = c.num_attention_heads
            kv = getattr(c, "num_key_value_heads", None) or h
            d = getattr(c, "head_dim", None) or c.hidden_size // h
            layout = HeadLayout(h, kv, h, d, imag=False)
        else:
            layout = spec.layout
        return super().load_weights(check_attention_shapes(weights, c, layout))
