"""Fourier-VLM Qwen2-VL for vLLM: ``FourierQwen2VLForConditionalGeneration``.

The authors' placement (their wrap of ``model.visual.forward``): the vision transformer and its
PatchMerger run unchanged; each frame's merged ``(H/2) x (W/2)`` token grid is then compressed to
``h' x w'`` with ``h' = max(int(H/2 * ratio), 1)`` (same for w'). The authors rewrite ``grid_thw``
to ``(T, 2h', 2w')`` so the placeholder count and the M-RoPE positions follow the smaller grid;
here the processor output keeps the real grid (the vision transformer needs it to run) and the
three places that derive a token layout from it use the compressed one instead:

* the prompt's ``<|image_pad|>`` / ``<|video_pad|>`` expansion (``_get_prompt_updates``),
* the token counts vLLM profiles and budgets with (``_get_vision_info``),
* the M-RoPE positions (``iter_mm_grid_thw``, which ``get_mrope_input_positions`` walks).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from typing import Any, Literal

import torch

from kvfold.models.fourier_vlm.config import (
    FourierVLMConfigError,
    Qwen2VLFourierOptions,
    qwen2_vl_options,
)
from kvfold.models.fourier_vlm.spectral_resize import compress_tokens
from kvfold.models.fourier_vlm.torchvision_free import ensure_importable, torchvision_installed

ensure_importable()  # before vLLM's qwen2_vl.py, which imports a torchvision-backed module

from transformers.models.qwen2_vl import Qwen2VLProcessor  # noqa: E402
from vllm.config import VllmConfig  # noqa: E402
from vllm.logger import init_logger  # noqa: E402
from vllm.model_executor.models.qwen2_vl import (  # noqa: E402
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402
from vllm.multimodal.inputs import MultiModalFeatureSpec, MultiModalKwargsItems  # noqa: E402
from vllm.multimodal.parse import ImageSize, MultiModalDataItems  # noqa: E402
from vllm.multimodal.processing import PromptReplacement, PromptUpdate  # noqa: E402

ARCHITECTURE = "FourierQwen2VLForConditionalGeneration"
logger = init_logger("vllm.kvfold")


def kept_grid(
    options: Qwen2VLFourierOptions, grid_thw: Sequence[int], merge: int
) -> tuple[int, int, int]:
    """``(T, h', w')`` in merged tokens for a processor ``grid_thw`` of ``(T, H, W)`` patches."""
    t, h, w = (int(v) for v in grid_thw)
    rows, cols = options.kept(h // merge, w // merge)
    return t, rows, cols


def num_kept_tokens(options: Qwen2VLFourierOptions, grid_thw: Sequence[int], merge: int) -> int:
    t, rows, cols = kept_grid(options, grid_thw, merge)
    return t * rows * cols


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """Qwen2-VL's HF processor without its video processor.

    transformers' Qwen2-VL video processor needs torchvision, and without it the stock processor
    cannot even be constructed; images need only the (PIL) image processor and the tokenizer.
    Used only where torchvision is not installed, with video then unsupported.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs) -> None:
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class FourierQwen2VLProcessingInfo(Qwen2VLProcessingInfo):
    """Qwen2-VL's processing info with Fourier-compressed token counts."""

    def fourier_options(self) -> Qwen2VLFourierOptions:
        options = self.__dict__.get("_fourier_options")
        if options is None:  # validated once per info object (it is asked for every item)
            options = self._fourier_options = qwen2_vl_options(self.get_hf_config(), ARCHITECTURE)
        return options

    def get_hf_processor(self, **kwargs: object) -> Qwen2VLProcessor:
        if torchvision_installed():
            return super().get_hf_processor(**kwargs)
        return self.ctx.get_hf_processor(Qwen2VLImageOnlyProcessor, **kwargs)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        if torchvision_installed():
            return super().get_supported_mm_limits()
        logger.warning_once(
            "%s: torchvision is not installed, so Qwen2-VL's video processor is unavailable: "
            "serving images only", ARCHITECTURE)
        return {"image": None}

    def _get_vision_info(
        self,
        *,
        image_width: int,
        image_height: int,
        num_frames: int = 1,
        do_resize: bool = True,
        image_processor: Any,
        mm_kwargs: Mapping[str, object],
        modality: Literal["image", "video"] | None = None,
    ) -> tuple[ImageSize, int]:
        size, full = super()._get_vision_info(
            image_width=image_width, image_height=image_height, num_frames=num_frames,
            do_resize=do_resize, image_processor=image_processor, mm_kwargs=mm_kwargs,
            modality=modality,
        )
        vision = self.get_hf_config().vision_config
        merge, patch = vision.spatial_merge_size, vision.patch_size
        rows, cols = size.height // patch // merge, size.width // patch // merge
        if rows * cols == 0:  # an unresized image smaller than one merged patch: no tokens
            return size, full
        frames = full // (rows * cols)  # vLLM's own temporal padding, read back from its count
        grid = (frames, rows * merge, cols * merge)
        return size, num_kept_tokens(self.fourier_options(), grid, merge)


class FourierQwen2VLMultiModalProcessor(Qwen2VLMultiModalProcessor):
    """Qwen2-VL's processor; each item expands to its compressed number of placeholders."""

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, Any],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        hf_processor = self.info.get_hf_processor(**hf_processor_mm_kwargs)
        vocab = self.info.get_tokenizer().get_vocab()
        placeholder = {"image": vocab[hf_processor.image_token],
                       "video": vocab[hf_processor.video_token]}
        options = self.info.fourier_options()
        merge = self.info.get_hf_config().vision_config.spatial_merge_size

        def replacement(item_idx: int, modality: str) -> list[int]:
            grid_thw = out_mm_kwargs[modality][item_idx][f"{modality}_grid_thw"].data
            return [placeholder[modality]] * num_kept_tokens(options, grid_thw.tolist(), merge)

        return [
            PromptReplacement(modality=m, target=[placeholder[m]],
                              replacement=partial(replacement, modality=m))
            for m in ("image", "video")
        ]


@MULTIMODAL_REGISTRY.register_processor(
    FourierQwen2VLMultiModalProcessor,
    info=FourierQwen2VLProcessingInfo,
    dummy_inputs=Qwen2VLDummyInputsBuilder,
)
class FourierQwen2VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL with each frame's merged vision tokens Fourier-compressed."""

    # vLLM maps tower/connector LoRA tokens from the number of embeddings the model returns,
    # which compression changes; LoRA on the language model is unaffected.
    supports_tower_connector_lora = False

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        options = qwen2_vl_options(vllm_config.model_config.hf_config, ARCHITECTURE)
        if vllm_config.compilation_config.cudagraph_mm_encoder:
            # The encoder CUDA-graph path calls the vision transformer directly and sizes its
            # outputs from the uncompressed grid, bypassing the compression below.
            raise FourierVLMConfigError(
                f"{ARCHITECTURE} does not support the vision encoder's CUDA graphs "
                "(compilation_config.cudagraph_mm_encoder): leave it off"
            )
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.fourier = options

    def _compress(self, embeds: torch.Tensor, grid_thw: Sequence[int]) -> torch.Tensor:
        merge = self.config.vision_config.spatial_merge_size
        t, h, w = (int(v) for v in grid_thw)
        grid = (h // merge, w // merge)
        _, *kept = kept_grid(self.fourier, grid_thw, merge)
        frames = embeds.reshape(t, grid[0] * grid[1], embeds.shape[-1])
        return compress_tokens(frames, grid, tuple(kept), self.fourier.norm).reshape(
            -1, embeds.shape[-1])

    def _process_image_input(self, image_input: Any) -> tuple[torch.Tensor, ...]:
        items = super()._process_image_input(image_input)
        grids = image_input["image_grid_thw"].tolist()
        return tuple(self._compress(e, g) for e, g in zip(items, grids))

    def _process_video_input(self, video_input: Any) -> tuple[torch.Tensor, ...]:
        items = super()._process_video_input(video_input)
        grids = video_input["video_grid_thw"].tolist()
        return tuple(self._compress(e, g) for e, g in zip(items, grids))

    def iter_mm_grid_thw(
        self, mm_features: list[MultiModalFeatureSpec]
    ) -> Iterator[tuple[int, int, int, int, float]]:
        merge = self.config.vision_config.spatial_merge_size
        for offset, t, h, w, t_factor in super().iter_mm_grid_thw(mm_features):
            # The base yields the merged grid (h, w); the positions walk the kept one.
            _, rows, cols = kept_grid(self.fourier, (t, h * merge, w * merge), merge)
            yield offset, t, rows, cols, t_factor
