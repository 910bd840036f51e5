"""Transformers-side RoPE++ reference, for tests only, and a writer of authors'-format checkpoints.

Written from the paper's definition, deliberately in a different form from kvfold's model class:
scores are computed in complex arithmetic, A_re = Re(w) and A_im = Im(w) with
w[t, s] = sum_n q_n(t) conj(k_n(s)) e^{i (t - s) theta_n}, pair n = (x[n], x[n + d/2]); every head
is attended separately with an explicit causal mask. It swaps the attention of transformers'
``LlamaForCausalLM`` (embeddings, norms, MLP, lm_head stay transformers' own) and runs in float64.

``imaginary`` selects negative controls: "drop" zeroes the imaginary heads' output, "conjugate"
uses -Im(w) (the wrong sign). Neither may match vLLM, or the comparison would prove nothing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import torch
from torch import nn

Imaginary = Literal["im", "drop", "conjugate"]


def _rope_angles(config, num_positions: int) -> tuple[torch.Tensor, float]:
    """``(angles [positions, d/2] float64, magnitude)`` of e^{i t theta_n} from rope_config."""
    rope = config.rope_config
    d = config.head_dim
    params = getattr(config, "rope_parameters", None) or {}
    theta = float(params.get("rope_theta", 10000.0)) * rope.get("scaling_factor", 1.0)
    freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    factor = float(rope.get("factor", 1.0))
    magnitude = 1.0
    if rope.get("yarn", False):
        turns = 4096 * freq / (2 * math.pi)
        keep = torch.clamp((turns - 1) / 31, 0, 1)
        freq = keep * freq + (1 - keep) * freq / factor
        magnitude = 1 + 0.1 * math.log(factor)
    else:
        freq = freq / factor
    t = torch.arange(num_positions, dtype=torch.float64)
    return t[:, None] * freq[None, :], magnitude


def head_counts(config) -> tuple[int, int, bool]:
    """``(q_proj heads, kv heads, imaginary?)`` from the config, as the paper defines EH / EC."""
    rope = config.rope_config
    h, kv = config.num_attention_heads, config.num_key_value_heads
    if not rope.get("imag", False):
        return h, kv, False
    if rope["imag_mode"] == "imag1":  # equal heads: half the projections
        return h // 2, kv // 2, True
    if rope["imag_mode"] == "imag2":  # equal cache: twice the attention heads
        return h, kv, True
    raise ValueError(rope["imag_mode"])


class ReferenceRoPEPPAttention(nn.Module):
    def __init__(self, config, imaginary: Imaginary = "im") -> None:
        super().__init__()
        self.config, self.imaginary = config, imaginary
        self.nq, self.nkv, self.imag = head_counts(config)
        d, hidden = config.head_dim, config.hidden_size
        bias = config.attention_bias
        self.q_proj = nn.Linear(hidden, self.nq * d, bias=bias)
        self.k_proj = nn.Linear(hidden, self.nkv * d, bias=bias)
        self.v_proj = nn.Linear(hidden, self.nkv * d, bias=bias)
        self.o_proj = nn.Linear(self.nq * (2 if self.imag else 1) * d, hidden, bias=bias)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        batch, length, _ = hidden_states.shape
        assert batch == 1, "the reference runs one unpadded sequence at a time"
        d, half = self.config.head_dim, self.config.head_dim // 2
        x = hidden_states[0]
        q = self.q_proj(x).view(length, self.nq, d)
        k = self.k_proj(x).view(length, self.nkv, d)
        v = self.v_proj(x).view(length, self.nkv, d)
        angles, magnitude = _rope_angles(self.config, length)
        rot = torch.polar(torch.full_like(angles, magnitude), angles)  # [L, d/2] complex
        qc = torch.complex(q[..., :half].double(), q[..., half:].double()) * rot[:, None, :]
        kc = torch.complex(k[..., :half].double(), k[..., half:].double()) * rot[:, None, :]
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        scale = d**-0.5
        outputs = []
        for h in range(self.nq):
            g = h * self.nkv // self.nq  # GQA: contiguous groups of q heads share a KV head
            w = torch.einsum("tn,sn->ts", qc[:, h], kc[:, g].conj())
            scores = [w.real]
            if self.imag:
                scores.append({"im": w.imag, "conjugate": -w.imag, "drop": None}[self.imaginary])
            for score in scores:
                if score is None:
                    outputs.append(torch.zeros(length, d, dtype=torch.float64))
                    continue
                p = torch.softmax((score * scale).masked_fill(~causal, float("-inf")), dim=-1)
                outputs.append(p @ v[:, g].double())
        out = torch.cat(outputs, dim=-1).to(hidden_states.dtype)  # [re_h, im_h] per head
        return self.o_proj(out)[None], None


def build_reference(config, imaginary: Imaginary = "im"):
    """transformers' ``LlamaForCausalLM`` with every attention replaced by the reference."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(config)
    for layer in model.model.layers:
        layer.self_attn = ReferenceRoPEPPAttention(config, imaginary)
    return model


def load_reference(path: Path, imaginary: Imaginary = "im"):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    model = build_reference(config, imaginary)
    model.load_state_dict(load_file(str(Path(path) / "model.safetensors")), strict=True)
    return model.double().eval()


@torch.no_grad()
def reference_logits(model, ids: list[int]) -> torch.Tensor:
    """``[len(ids), vocab]`` float64 logits of the next token after each prefix."""
    return model(torch.tensor([ids]), use_cache=False).logits[0].double()


@torch.no_grad()
def reference_greedy(model, ids: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and ``[steps, vocab]`` logits, recomputing the whole prefix each step."""
    ids, new, logits = list(ids), [], []
    for _ in range(steps):
        last = reference_logits(model, ids)[-1]
        logits.append(last)
        new.append(int(last.argmax()))
        ids.append(new[-1])
    return new, torch.stack(logits)


def write_rope_pp_checkpoint(
    path: Path,
    rope_config: dict | None,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    hidden_size: int = 256,
    num_layers: int = 2,
    seed: int = 0,
    std: float = 0.08,
) -> Path:
    """A random checkpoint in the authors' format: plain ``LlamaForCausalLM`` config + rope_config.

    Weights are drawn wider than a trained model's (std 0.08) so greedy decoding depends on the
    attention output, not on rounding between near-ties.
    """
    from transformers import LlamaConfig

    from kvfold.tiny_model import SPECIAL_TOKENS, write_byte_tokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=len(SPECIAL_TOKENS) + 256, hidden_size=hidden_size,
        intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim,
        max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1,
        tie_word_embeddings=False, initializer_range=std,
    )
    if rope_config is not None:
        config.rope_config = dict(rope_config)  # how the authors' training scripts set it
    torch.manual_seed(seed)
    if rope_config is None:
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(config)
    else:
        model = build_reference(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, std)
    model.save_pretrained(path, safe_serialization=True)
    saved = json.loads((path / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForCausalLM"] and saved["model_type"] == "llama"
    assert saved.get("rope_config") == rope_config
    # The authors saved with transformers 4.x: rope_theta / rope_scaling, not rope_parameters.
    theta = saved.pop("rope_parameters")["rope_theta"]
    saved.update(rope_theta=theta, rope_scaling=None, torch_dtype=saved.pop("dtype"))
    (path / "config.json").write_text(json.dumps(saved, indent=2))
    write_byte_tokenizer(path)
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    return path
