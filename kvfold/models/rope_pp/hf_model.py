"""RoPE++ checkpoints in transformers: its ``LlamaForCausalLM`` with kvfold's RoPE++ attention.

transformers has no RoPE++ class, and a RoPE++ checkpoint's weight shapes do not fit its Llama, so
the tools that read a model's KV through transformers (``kvfold calibrate vqkv|fourier``) would fail
on one. :func:`load_rope_pp` builds the authors' architecture instead: transformers' embeddings,
norms, MLPs and cache, with every attention replaced by :class:`HFRoPEPPAttention`, which computes
what kvfold's vLLM class computes (same rotary table, same interleaved imaginary heads). Keys and
values (the cache) are standard RoPE ones: RoPE++ changes only the queries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kvfold.models.rope_pp.config import RoPEPPModelSpec, read_spec
from kvfold.models.rope_pp.rotary import cos_sin_cache, inverse_frequencies, with_imaginary_heads


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split (neox) rotation of ``x [B, H, T, D]`` by ``cos``/``sin`` ``[T, D/2]``."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class HFRoPEPPAttention(nn.Module):
    """A drop-in for transformers' ``LlamaAttention`` (same call signature and cache use)."""

    def __init__(self, config: Any, layer_idx: int, spec: RoPEPPModelSpec) -> None:
        super().__init__()
        self.layer_idx, self.spec = layer_idx, spec
        layout = spec.layout
        d, hidden, bias = layout.head_dim, config.hidden_size, getattr(config, "attention_bias", False)
        self.q_proj = nn.Linear(hidden, layout.num_q_heads * d, bias=bias)
        self.k_proj = nn.Linear(hidden, layout.num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(hidden, layout.num_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(layout.num_attn_heads * d, hidden, bias=bias)
        inv_freq, self.mscale = inverse_frequencies(d, spec.rope_theta, spec.rope)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: Any = None,
                attention_mask: torch.Tensor | None = None, past_key_values: Any = None,
                **kwargs: Any) -> tuple[torch.Tensor, None]:
        layout = self.spec.layout
        b, n, _ = hidden_states.shape
        d = layout.head_dim
        q = self.q_proj(hidden_states).view(b, n, layout.num_q_heads, d).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, n, layout.num_kv_heads, d).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, n, layout.num_kv_heads, d).transpose(1, 2)
        past = past_key_values.get_seq_length(self.layer_idx) if past_key_values is not None else 0
        table = cos_sin_cache(self.inv_freq, self.mscale, past + n)[past:].to(q.device, q.dtype)
        cos, sin = table.chunk(2, dim=-1)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        if layout.imag:
            q = with_imaginary_heads(q.transpose(1, 2).reshape(b * n, layout.num_q_heads, d))
            q = q.view(b, n, layout.num_attn_heads, d).transpose(1, 2)
        groups = layout.num_attn_heads // layout.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        # Bottom-right causal alignment: with a cache, the n new queries see every past key.
        mask = torch.ones(n, past + n, dtype=torch.bool, device=q.device).tril(diagonal=past)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, layout.num_attn_heads * d)), None


def is_rope_pp(config: Any) -> bool:
    return getattr(config, "rope_config", None) is not None


def build_rope_pp(config: Any) -> nn.Module:
    """transformers' ``LlamaForCausalLM`` for ``config`` with RoPE++ attention in every layer."""
    from transformers import LlamaForCausalLM

    spec = read_spec(config)
    if spec is None:
        raise ValueError("not a RoPE++ config (no rope_config)")
    model = LlamaForCausalLM(config)
    for index, layer in enumerate(model.model.layers):
        layer.self_attn = HFRoPEPPAttention(config, index, spec)
    return model


def load_rope_pp(model_dir: str | Path, config: Any, dtype: torch.dtype) -> nn.Module:
    """A RoPE++ checkpoint's weights in :func:`build_rope_pp`'s model (every weight required)."""
    from safetensors.torch import load_file

    model = build_rope_pp(config)
    state: dict[str, torch.Tensor] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        state.update(load_file(str(file)))
    if config.num_hidden_layers < len({k.split(".")[2] for k in state if k.startswith("model.layers.")}):
        state = {k: v for k, v in state.items()
                 if not k.startswith("model.layers.") or int(k.split(".")[2]) < config.num_hidden_layers}
    if "lm_head.weight" not in state and getattr(config, "tie_word_embeddings", False):
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    return model.to(dtype)
