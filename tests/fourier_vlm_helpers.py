"""Shared by the Fourier-VLM engine and serve tests: run the driver, and the Hugging Face reference.

The reference never touches vLLM: transformers' own processor (the token count without
compression), its own vision tower / PatchMerger / projector, and kvfold's FFT op in float64.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from fourier_vlm_driver import make_image

from kvfold.models.fourier_vlm.dct import compress_tokens

HERE = Path(__file__).resolve().parent
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
ENGINE_DEFAULTS = {"enforce_eager": True, "dtype": "float32", "max_model_len": 1024,
                   "gpu_memory_utilization": 0.4}
LLAVA_PLACEHOLDER = "<image>"
QWEN_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


class DriverRun:
    def __init__(self, result: dict | None, log: str, returncode: int) -> None:
        self.result, self.log, self.returncode = result, log, returncode

    def __getitem__(self, key: str):
        assert self.result is not None, f"engine failed (rc={self.returncode}):\n{self.log[-6000:]}"
        return self.result[key]


def run_driver(work: Path, llm: dict, requests: list[dict], *, max_tokens: int = 4,
               capture_token_id: int | None = None, timeout: float = 600) -> DriverRun:
    """One engine in a fresh process (tests/fourier_vlm_driver.py); see that file for SPEC/OUT."""
    work.mkdir(parents=True, exist_ok=True)
    spec = {"llm": {**ENGINE_DEFAULTS, **llm}, "requests": requests, "max_tokens": max_tokens,
            "capture_token_id": capture_token_id}
    spec_path, out_path = work / "spec.json", work / "out.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, str(HERE / "fourier_vlm_driver.py"), str(spec_path), str(out_path)],
        env={**os.environ, **ENGINE_ENV}, capture_output=True, text=True, timeout=timeout,
        cwd=work,
    )
    result = json.loads(out_path.read_text()) if proc.returncode == 0 else None
    return DriverRun(result, proc.stdout + proc.stderr, proc.returncode)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    return ((got.double() - want.double()).abs().max() / want.abs().max()).item()


# ------------------------------------------------------------------------------------------------
# LLaVA


class LlavaReference:
    """transformers' LLaVA: CLIP patch features (layer -2, class token dropped) -> FFT op -> projector."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
        self.image_token_id = self.model.config.image_token_index

    def uncompressed_prompt_len(self, text: str, images: list[list[int]]) -> int:
        out = self.processor(text=[text], images=[make_image(*i) for i in images] or None)
        return len(out["input_ids"][0])

    @torch.no_grad()
    def features(self, image: list[int]) -> torch.Tensor:
        pixels = self.processor.image_processor(images=[make_image(*image)],
                                                return_tensors="pt")["pixel_values"]
        tower = self.model.model.vision_tower(pixels, output_hidden_states=True)
        return tower.hidden_states[-2][0, 1:]  # [576, C]

    @torch.no_grad()
    def embeds(self, image: list[int], keep: tuple[int, int], *, transpose: bool = False,
               norm: str = "ortho") -> torch.Tensor:
        feats = self.features(image).double()
        if transpose:  # a negative control: the grid read column-major
            feats = feats.reshape(24, 24, -1).transpose(0, 1).reshape(576, -1)
        small = compress_tokens(feats, (24, 24), keep, norm).float()
        return self.model.model.multi_modal_projector(small)


# ------------------------------------------------------------------------------------------------
# Qwen2-VL


class QwenReference:
    """transformers' Qwen2-VL: vision transformer + PatchMerger -> FFT op per frame."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import Qwen2VLForConditionalGeneration

        from kvfold.models.fourier_vlm.qwen2_vl import Qwen2VLImageOnlyProcessor

        self.processor = Qwen2VLImageOnlyProcessor.from_pretrained(model_dir)
        self.model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir).eval()
        self.image_token_id = self.model.config.image_token_id

    def grid(self, image: list[int]) -> tuple[torch.Tensor, list[int]]:
        out = self.processor.image_processor(images=[make_image(*image)], return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"][0].tolist()

    def uncompressed_prompt_len(self, text: str, images: list[list[int]]) -> int:
        out = self.processor(text=[text], images=[make_image(*i) for i in images] or None)
        return len(out["input_ids"][0])

    @staticmethod
    def kept(grid_thw: list[int], ratio: float) -> tuple[int, int]:
        _, h, w = grid_thw
        return max(int(h // 2 * ratio), 1), max(int(w // 2 * ratio), 1)

    @torch.no_grad()
    def embeds(self, image: list[int], ratio: float, *, transpose: bool = False) -> torch.Tensor:
        pixels, (t, h, w) = self.grid(image)
        merged = self.model.model.visual(pixels, grid_thw=torch.tensor([[t, h, w]])).pooler_output
        rows, cols = h // 2, w // 2
        frames = merged.double().reshape(t, rows, cols, -1)
        if transpose:
            frames, rows, cols = frames.transpose(1, 2), cols, rows
        keep = self.kept([t, rows * 2, cols * 2], ratio)
        return compress_tokens(frames.reshape(t, rows * cols, -1), (rows, cols), keep).reshape(
            -1, merged.shape[-1])
