"""Fourier-VLM LLaVA-1.5 for vLLM: ``FourierLlavaForConditionalGeneration``.

The authors' placement (their ``encode_images`` patch): vision tower -> Fourier compression of the
24x24 CLIP patch grid (class token already dropped by the "default" feature strategy) -> the
unchanged two-layer projector -> ``reserve x reserve`` tokens for the language model. The
processor info reports the compressed count, so the prompt's ``<image>`` expansion, the dummy
inputs vLLM profiles with and the encoder budget all use it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import CLIPVisionConfig, SiglipVisionConfig

from kvfold.models.fourier_vlm.config import FourierVLMConfigError, llava_options
from kvfold.models.fourier_vlm.dct import Norm
from kvfold.models.fourier_vlm.spectral_resize import compress_tokens
from kvfold.models.fourier_vlm.torchvision_free import ensure_importable

ensure_importable()  # before vLLM's llava.py, which imports a torchvision-backed module

from vllm.config import VllmConfig  # noqa: E402
from vllm.model_executor.models.llava import (  # noqa: E402
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
    LlavaImageInputs,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.vision import (  # noqa: E402
    get_num_selected_vision_tokens,
    get_vision_encoder_info,
)
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402
from vllm.multimodal.inputs import MultiModalKwargsItems  # noqa: E402
from vllm.multimodal.parse import (  # noqa: E402
    ImageEmbeddingItems,
    ImageProcessorItems,
    MultiModalDataItems,
)
from vllm.multimodal.processing import PromptReplacement, PromptUpdate  # noqa: E402

ARCHITECTURE = "FourierLlavaForConditionalGeneration"


@dataclass(frozen=True)
class LlavaFourierSpec:
    """The vision tower's token grid and the grid Fourier-VLM keeps of it."""

    grid: tuple[int, int]
    kept: tuple[int, int]
    norm: Norm

    @property
    def num_tokens(self) -> int:
        return self.kept[0] * self.kept[1]


def llava_spec(hf_config: Any) -> LlavaFourierSpec:
    """Validate ``hf_config`` (a LlavaConfig plus ``fourier_vlm``) for Fourier compression.

    Raises :class:`FourierVLMConfigError` for a tower whose selected features are not a square
    patch grid, or a kept size larger than that grid.
    """
    options = llava_options(hf_config, ARCHITECTURE)
    vision = hf_config.vision_config
    if not isinstance(vision, (CLIPVisionConfig, SiglipVisionConfig)):
        raise FourierVLMConfigError(
            f"{ARCHITECTURE} compresses the fixed patch grid of a CLIP or SigLIP tower "
            f"(LLaVA-1.5); this checkpoint's vision tower is {type(vision).__name__}"
        )
    if not isinstance(hf_config.vision_feature_select_strategy, str):
        raise FourierVLMConfigError(f"{ARCHITECTURE} needs a named vision_feature_select_strategy")
    side = vision.image_size // vision.patch_size
    encoder = get_vision_encoder_info(hf_config)
    tokens = get_num_selected_vision_tokens(
        encoder.get_num_image_tokens(image_width=vision.image_size, image_height=vision.image_size),
        hf_config.vision_feature_select_strategy,
    )
    if tokens != side * side:
        raise FourierVLMConfigError(
            f"{ARCHITECTURE}: vision_feature_select_strategy "
            f"{hf_config.vision_feature_select_strategy!r} gives {tokens} tokens per image, not the "
            f"{side}x{side} patch grid Fourier-VLM transforms (LLaVA-1.5 uses 'default', which "
            "drops CLIP's class token)"
        )
    kept = options.kept()
    if kept[0] > side or kept[1] > side:
        raise FourierVLMConfigError(
            f"{ARCHITECTURE}: fourier_vlm.reserve={options.reserve!r} asks for a {kept[0]}x{kept[1]} "
            f"token grid, larger than the vision tower's {side}x{side} grid ({side * side} tokens "
            f"at {vision.image_size}x{vision.image_size} pixels, patch {vision.patch_size}); "
            f"reserve must be at most {side}"
        )
    return LlavaFourierSpec((side, side), kept, options.norm)


class FourierLlavaProcessingInfo(LlavaProcessingInfo):
    """LLaVA's processing info with the compressed number of tokens per image."""

    def fourier_spec(self) -> LlavaFourierSpec:
        spec = self.__dict__.get("_fourier_spec")
        if spec is None:  # validated once per info object (it is asked for every image)
            spec = self._fourier_spec = llava_spec(self.get_hf_config())
        return spec

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        # Every image is resized to the tower's fixed size, so the count does not depend on it.
        return self.fourier_spec().num_tokens


class FourierLlavaMultiModalProcessor(LlavaMultiModalProcessor):
    """LLaVA's processor; precomputed ``image_embeds`` must already have the compressed count."""

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        image_token_id = self.info.get_hf_config().image_token_index
        spec = self.info.fourier_spec()

        def replacement(item_idx: int) -> list[int]:
            images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
            if isinstance(images, ImageEmbeddingItems):
                rows = images.get_feature_size(item_idx)
                if rows != spec.num_tokens:
                    # The filter sits before the projector, so projected embeddings cannot be
                    # compressed here; they must come compressed.
                    raise ValueError(
                        f"{ARCHITECTURE}: image_embeds must already be Fourier-compressed to "
                        f"{spec.kept[0]}x{spec.kept[1]} = {spec.num_tokens} rows, got {rows}"
                    )
            return [image_token_id] * spec.num_tokens

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=replacement)]


@MULTIMODAL_REGISTRY.register_processor(
    FourierLlavaMultiModalProcessor,
    info=FourierLlavaProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class FourierLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA with the tower's patch features Fourier-compressed before the projector."""

    # vLLM maps tower/connector LoRA tokens from the number of embeddings the model returns,
    # which compression changes; LoRA on the language model is unaffected.
    supports_tower_connector_lora = False

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        spec = llava_spec(vllm_config.model_config.hf_config)  # before any allocation
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.fourier = spec

    def _process_image_input(
        self, image_input: LlavaImageInputs
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        spec = self.fourier
        if isinstance(image_input, LlavaImageEmbeddingInputs):
            return image_input["data"]  # row count checked by the processor
        features = self._process_image_pixels(image_input)
        if isinstance(features, torch.Tensor):  # [images, H*W, C]
            return self.multi_modal_projector(
                compress_tokens(features, spec.grid, spec.kept, spec.norm)
            )
        compressed = [compress_tokens(f, spec.grid, spec.kept, spec.norm) for f in features]
        return tuple(self.multi_modal_projector(torch.cat(compressed)).split(spec.num_tokens))
