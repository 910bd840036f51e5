"""Analytic prefill FLOPs of one LLaVA-1.5 request, from its Hugging Face config.

Counted as matrix-product FLOPs (2 per multiply-add; norms, activations, RoPE and softmax are
left out, as torch's FlopCounterMode leaves them out), for what vLLM runs on one image request:

* vision tower: patch convolution + the transformer layers up to ``vision_feature_layer`` (vLLM
  builds only those), bidirectional attention over the patches plus the class token;
* Fourier-VLM's compression (two small matrix products per image; zero for the stock model);
* projector: two linear layers on the tokens that survive;
* language model: every decoder layer on the ``text + vision`` prompt tokens, causal attention
  (each query attends to itself and the tokens before it), and the LM head for the last position
  only (vLLM computes prefill logits for the sampled position alone).

tests/test_fourier_vlm_benchmark.py checks each term against FlopCounterMode on small models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def _layer_index(index: int, num_layers: int) -> int:
    """Layers vLLM builds for ``vision_feature_layer`` (negative: counted from the end)."""
    return index if index >= 0 else num_layers + index + 1


@dataclass(frozen=True)
class LlavaShape:
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int  # built and run: up to the feature layer
    image_size: int
    patch_size: int
    projector_hidden: int
    text_hidden: int
    text_layers: int
    heads: int
    kv_heads: int
    head_dim: int
    text_intermediate: int
    vocab: int

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LlavaShape:
        vision, text = config["vision_config"], config["text_config"]
        feature_layer = config.get("vision_feature_layer", -2)
        if not isinstance(feature_layer, int):
            raise ValueError("one vision_feature_layer expected")
        heads = text.get("num_attention_heads", 32)
        hidden = text.get("hidden_size", 4096)
        return cls(
            vision_hidden=vision["hidden_size"],
            vision_intermediate=vision["intermediate_size"],
            vision_layers=_layer_index(feature_layer, vision["num_hidden_layers"]),
            image_size=vision["image_size"],
            patch_size=vision["patch_size"],
            projector_hidden=hidden,
            text_hidden=hidden,
            text_layers=text.get("num_hidden_layers", 32),
            heads=heads,
            kv_heads=text.get("num_key_value_heads") or heads,
            head_dim=text.get("head_dim") or hidden // heads,
            text_intermediate=text.get("intermediate_size", 11008),
            vocab=text.get("vocab_size", config.get("vocab_size", 32064)),
        )


def vision_tower_flops(s: LlavaShape) -> int:
    patches = s.grid * s.grid
    tokens = patches + 1  # + CLIP's class token
    c = s.vision_hidden
    conv = 2 * patches * c * 3 * s.patch_size * s.patch_size
    linear = 2 * tokens * (4 * c * c + 2 * c * s.vision_intermediate)
    attention = 4 * tokens * tokens * c
    return conv + s.vision_layers * (linear + attention)


def compression_flops(grid: tuple[int, int], kept: tuple[int, int], channels: int) -> int:
    """``B_h X`` then ``(.) B_w^T`` (kvfold.models.fourier_vlm.spectral_resize); 0 when nothing is cut."""
    (gh, gw), (kh, kw) = grid, kept
    if (gh, gw) == (kh, kw):
        return 0
    return 2 * kh * gh * gw * channels + 2 * kw * gw * kh * channels


def projector_flops(s: LlavaShape, tokens: int) -> int:
    return 2 * tokens * (s.vision_hidden * s.projector_hidden + s.projector_hidden ** 2)


def llm_linear_flops(s: LlavaShape, tokens: int) -> int:
    d, q, kv = s.text_hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim
    per_layer = 2 * tokens * (d * q + 2 * d * kv + q * d + 3 * d * s.text_intermediate)
    return s.text_layers * per_layer


def llm_attention_flops(s: LlavaShape, tokens: int, causal: bool = True) -> int:
    """``Q K^T`` and ``P V``: 4 * head_dim FLOPs per (query, key) pair per head and layer."""
    pairs = tokens * (tokens + 1) // 2 if causal else tokens * tokens
    return s.text_layers * 4 * s.heads * s.head_dim * pairs


def lm_head_flops(s: LlavaShape, positions: int = 1) -> int:
    return 2 * positions * s.text_hidden * s.vocab


def request_flops(s: LlavaShape, text_tokens: int, kept: tuple[int, int]) -> dict[str, int]:
    """Prefill FLOPs of one request with one image whose grid is cut to ``kept``."""
    vision_tokens = kept[0] * kept[1]
    prompt = text_tokens + vision_tokens
    parts = {
        "vision_tower": vision_tower_flops(s),
        "compression": compression_flops((s.grid, s.grid), kept, s.vision_hidden),
        "projector": projector_flops(s, vision_tokens),
        "llm_linear": llm_linear_flops(s, prompt),
        "llm_attention": llm_attention_flops(s, prompt),
        "lm_head": lm_head_flops(s),
    }
    parts["total"] = sum(parts.values())
    return parts
