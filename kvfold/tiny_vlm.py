"""Small random vision-language checkpoints in Hugging Face format (no model hub needed).

LLaVA-1.5 keeps the real vision geometry (336-pixel CLIP images, 14-pixel patches: a 24x24 grid of
576 tokens) at toy widths, so Fourier-VLM's kept sizes (12 -> 144, 8 -> 64) mean what they mean on
the real model. Qwen2-VL keeps its real patch (14), merge (2) and temporal patch (2) sizes; its
image processor is capped at ``max_pixels`` so the largest image stays small for CPU tests.

Both use the byte tokenizer of :mod:`kvfold.tiny_model` plus the model's image special tokens, a
PIL image processor (the torchvision ones cannot import beside the CPU torch build), and a chat
template that puts each image's placeholder where the OpenAI message had the image.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvfold.tiny_model import SPECIAL_TOKENS, write_byte_tokenizer

LLAVA_IMAGE_TOKEN = "<image>"
QWEN_VL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
BYTE_VOCAB = len(SPECIAL_TOKENS) + 256

# Messages with string or list-of-parts content; an image part becomes the model's placeholder.
_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] in ('image', 'image_url') %}__IMAGE__{% endif %}"
    "{% endfor %}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _tokenizer(path: Path, extra_tokens: tuple[str, ...]):
    from transformers import AutoTokenizer

    write_byte_tokenizer(path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_special_tokens({"additional_special_tokens": list(extra_tokens)})
    return tok


def _save_common(path: Path, model: Any, processor: Any) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    return path


def llava_processor(path: Path, *, image_size: int = 336, patch_size: int = 14) -> Any:
    """LLaVA-1.5's processor over the byte tokenizer (+ ``<image>``), with a PIL CLIP image
    processor (resize the short side, centre-crop to ``image_size``); its tokenizer is saved."""
    from transformers import LlavaProcessor
    try:
        from transformers.models.clip.image_processing_pil_clip import (
            CLIPImageProcessorPil as ImageProcessor,
        )
    except ImportError:  # transformers before the PIL/torchvision backend split: already PIL
        from transformers import CLIPImageProcessor as ImageProcessor

    image_processor = ImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=_tokenizer(path, (LLAVA_IMAGE_TOKEN,)),
        patch_size=patch_size, vision_feature_select_strategy="default",
        image_token=LLAVA_IMAGE_TOKEN, num_additional_image_tokens=1,
        chat_template=_CHAT_TEMPLATE.replace("__IMAGE__", LLAVA_IMAGE_TOKEN),
    )


def write_tiny_llava(
    path: str | Path,
    *,
    vision_hidden: int = 64,
    vision_layers: int = 3,
    text_hidden: int = 128,
    text_layers: int = 2,
    image_size: int = 336,
    patch_size: int = 14,
    architecture: str | None = None,
    fourier_vlm: dict[str, Any] | None = None,
    seed: int = 0,
) -> Path:
    """A random LLaVA-1.5 (CLIP tower, 2-layer GELU projector, Llama) at ``path``.

    ``architecture`` / ``fourier_vlm`` are written into config.json as given (None: the stock
    ``LlavaForConditionalGeneration`` without a ``fourier_vlm`` key).
    """
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    processor = llava_processor(path, image_size=image_size, patch_size=patch_size)
    tok = processor.tokenizer
    image_token_id = tok.convert_tokens_to_ids(LLAVA_IMAGE_TOKEN)
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
        num_hidden_layers=vision_layers, num_attention_heads=2, image_size=image_size,
        patch_size=patch_size, projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=text_hidden, intermediate_size=2 * text_hidden,
        num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2,
        head_dim=text_hidden // 4, max_position_embeddings=4096, initializer_range=0.08,
        bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(torch.float32)
    _save_common(path, model, processor)
    _hub_llava_names(path / "model.safetensors")
    _edit_config(path, architecture, fourier_vlm)
    return path


def _hub_llava_names(weights: Path) -> None:
    """Rename the tower's weights as the llava-hf checkpoints name them.

    transformers 5 saves ``vision_tower.embeddings...``; the published LLaVA-1.5 checkpoints (and
    vLLM's loader) have ``vision_tower.vision_model.embeddings...``.
    """
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    renamed = {
        (f"vision_tower.vision_model.{k[len('vision_tower.'):]}"
         if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.")
         else k): v
        for k, v in tensors.items()
    }
    save_file(renamed, weights, metadata={"format": "pt"})


def write_tiny_qwen2_vl(
    path: str | Path,
    *,
    vision_embed: int = 64,
    vision_depth: int = 2,
    text_hidden: int = 128,
    text_layers: int = 2,
    max_pixels: int = 448 * 448,
    architecture: str | None = None,
    fourier_vlm: dict[str, Any] | None = None,
    seed: int = 0,
) -> Path:
    """A random Qwen2-VL (ViT + PatchMerger, M-RoPE Qwen2) at ``path``; see :func:`write_tiny_llava`."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil as ImageProcessor,
        )
    except ImportError:  # transformers before the PIL/torchvision backend split: already PIL
        from transformers import Qwen2VLImageProcessor as ImageProcessor

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(path, QWEN_VL_TOKENS)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_VL_TOKENS}
    head_dim = text_hidden // 4
    # M-RoPE splits the rotary half-dimension into (temporal, height, width) sections.
    quarter = head_dim // 8
    section = [head_dim // 2 - 2 * quarter, quarter, quarter]
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=text_hidden, intermediate_size=2 * text_hidden,
            num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=4096, initializer_range=0.08, bos_token_id=0,
            eos_token_id=1, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                             "mrope_section": section},
        ),
        vision_config=dict(
            depth=vision_depth, embed_dim=vision_embed, hidden_size=text_hidden, num_heads=2,
            mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).to(torch.float32)
    image_processor = ImageProcessor(
        size={"shortest_edge": 56 * 56, "longest_edge": max_pixels},
        patch_size=14, merge_size=2, temporal_patch_size=2,
    )
    # Qwen2VLProcessor cannot be constructed without torchvision (its video processor needs it),
    # so its files are written directly: what the Qwen2-VL checkpoints ship.
    model.save_pretrained(path, safe_serialization=True)
    image_processor.save_pretrained(path)
    tok.save_pretrained(path)
    placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
    (path / "chat_template.jinja").write_text(_CHAT_TEMPLATE.replace("__IMAGE__", placeholder))
    preprocessor = json.loads((path / "preprocessor_config.json").read_text())
    preprocessor["processor_class"] = "Qwen2VLProcessor"
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    _edit_config(path, architecture, fourier_vlm)
    return path


def _edit_config(path: Path, architecture: str | None, fourier_vlm: dict[str, Any] | None) -> None:
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    if architecture is not None:
        config["architectures"] = [architecture]
    if fourier_vlm is not None:
        config["fourier_vlm"] = fourier_vlm
    config_path.write_text(json.dumps(config, indent=2))
