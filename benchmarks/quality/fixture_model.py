"""The fixture decoder in plain torch: a Llama (RMSNorm, SwiGLU, GQA, half-split RoPE), with or without
RoPE++ (imaginary heads, the authors' EC layout), and its export as a Hugging Face checkpoint.

Plain torch so that training needs nothing but the GPU image's torch. The parameter names and the
head order are those of transformers' ``LlamaForCausalLM`` and of the RoPE++ authors' modelling
code, so the exported directory is what their ``save_pretrained`` writes: ``LlamaForCausalLM`` with
``rope_config`` in config.json for RoPE++, and vLLM serves it through kvfold's RoPE++ class.
tests/test_quality_fixtures.py checks the exported checkpoints against transformers' Llama and
against the float64 RoPE++ reference.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class FixtureConfig:
    vocab_size: int = 259  # byte tokenizer: 3 specials + 256 bytes
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 8
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    rope_pp: bool = False  # RoPE++_EC: every q head gets an imaginary twin; o_proj takes 2H heads
    max_position_embeddings: int = 16384

    @property
    def attention_heads(self) -> int:
        return self.num_heads * (2 if self.rope_pp else 1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, c: FixtureConfig) -> None:
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.attention_heads * c.head_dim, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        c = self.c
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, c.num_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, c.num_kv_heads, c.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if c.rope_pp:
            # -i * q turns the real part of the complex score into its imaginary part; the
            # authors interleave [re_h, im_h], which keeps both in q head h's GQA group.
            q = torch.stack((q, -rotate_half(q)), dim=2).reshape(b, 2 * c.num_heads, n, c.head_dim)
        # Explicit GQA expansion (kv head j serves heads j*G .. j*G+G-1): SDPA's enable_gqa is not
        # taken by every fused kernel, and the math fallback would hold [n, n] scores at 8k.
        groups = c.attention_heads // c.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, c.attention_heads * c.head_dim))


class MLP(nn.Module):
    def __init__(self, c: FixtureConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: FixtureConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    def __init__(self, c: FixtureConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class FixtureLM(nn.Module):
    """``model.*`` / ``lm_head`` as in transformers' Llama, so the state dict exports unchanged."""

    def __init__(self, c: FixtureConfig) -> None:
        super().__init__()
        self.config = c
        self.model = Body(c)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                nn.init.ones_(p)
            else:
                # GPT-2's scaled init for the projections that write into the residual stream.
                scale = 1 / math.sqrt(2 * self.config.num_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
                nn.init.normal_(p, 0.0, std * scale)

    def rotary(self, n: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, device=device).float() / c.head_dim))
        angles = torch.outer(torch.arange(n, device=device).float(), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``[batch, n] -> [batch, n, vocab]`` logits."""
        x = self.model.embed_tokens(ids)
        cos, sin = self.rotary(ids.shape[1], ids.device, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.model.norm(x))


def hf_config(c: FixtureConfig, torch_dtype: str = "bfloat16") -> dict:
    """config.json as transformers 4.x and the RoPE++ authors' scripts write it."""
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim, "hidden_act": "silu", "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta, "rope_scaling": None,
        "max_position_embeddings": c.max_position_embeddings, "attention_bias": False,
        "mlp_bias": False, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
        "initializer_range": 0.02, "torch_dtype": torch_dtype,
    }
    if c.rope_pp:
        config["rope_config"] = {"imag": True, "imag_mode": "imag2"}
    return config


def config_from_hf(config: dict) -> FixtureConfig:
    return FixtureConfig(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_layers=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"], num_kv_heads=config["num_key_value_heads"],
        head_dim=config["head_dim"], rope_theta=config["rope_theta"],
        rms_norm_eps=config["rms_norm_eps"], rope_pp=bool(config.get("rope_config", {}).get("imag")),
        max_position_embeddings=config["max_position_embeddings"],
    )


def export(state_dict_path: Path, config: FixtureConfig, out: Path, extra: dict | None = None) -> Path:
    """A servable checkpoint directory from trained weights (``model.safetensors``) and ``config``."""
    from kvfold.tiny_model import write_byte_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    if Path(state_dict_path).resolve() != (out / "model.safetensors").resolve():
        (out / "model.safetensors").write_bytes(Path(state_dict_path).read_bytes())
    (out / "config.json").write_text(json.dumps(hf_config(config), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}) + "\n")
    if extra:
        (out / "fixture.json").write_text(json.dumps({"config": asdict(config), **extra}, indent=1) + "\n")
    write_byte_tokenizer(out)
    return out


def load(path: Path, dtype: torch.dtype = torch.float32) -> FixtureLM:
    from safetensors.torch import load_file

    config = config_from_hf(json.loads((Path(path) / "config.json").read_text()))
    model = FixtureLM(config)
    model.load_state_dict({k: v.to(dtype) for k, v in load_file(str(Path(path) / "model.safetensors")).items()})
    return model.to(dtype).eval()
