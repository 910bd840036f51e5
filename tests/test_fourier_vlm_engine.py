"""Fourier-VLM in real vLLM engines on CPU: small random LLaVA-1.5 / Qwen2-VL checkpoints.

One engine per model family serves a batch of requests one by one (a single image, two images of
different sizes, text only) and reports, for each, the prompt vLLM built and the input embeddings
that reached the language model (read by a forward pre-hook in the worker). Against that:

* the prompt is shorter than transformers' own (uncompressed) expansion by exactly the tokens
  Fourier-VLM removes;
* the image rows equal the Hugging Face vision path followed by kvfold's FFT reference op;
* (Qwen2-VL) the M-RoPE positions of the image rows walk the kept grid.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from fourier_vlm_helpers import (
    LLAVA_PLACEHOLDER,
    QWEN_PLACEHOLDER,
    LlavaReference,
    QwenReference,
    relative_error,
    run_driver,
)

from kvfold.tiny_vlm import write_tiny_llava, write_tiny_qwen2_vl

pytestmark = pytest.mark.engine

TOLERANCE = 1e-4  # relative, float32 vLLM vs float64 FFT reference on transformers' features
P = LLAVA_PLACEHOLDER
LLAVA_REQUESTS = [
    {"prompt": f"user: {P}describe\nassistant:", "images": [[400, 300, 1]]},
    {"prompt": f"user: {P} vs {P}: which?\nassistant:", "images": [[336, 336, 2], [128, 500, 3]]},
    {"prompt": "user: no image here\nassistant:", "images": []},
]
Q = QWEN_PLACEHOLDER
QWEN_REQUESTS = [
    # 224x168 px -> 12x16 patches -> 6x8 merged; 280x280 -> 10x10; 100x60 -> 2x4 (smallest size).
    {"prompt": f"user: {Q}describe\nassistant:", "images": [[224, 168, 1]]},
    {"prompt": f"user: {Q} vs {Q}: which?\nassistant:", "images": [[280, 280, 2], [100, 60, 3]]},
    {"prompt": "user: no image here\nassistant:", "images": []},
]
QWEN_RATIO = 0.5


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return write_tiny_llava(tmp_path_factory.mktemp("fvlm") / "llava", seed=3)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    # Selected by config.json alone: kvfold's architecture name and its fourier_vlm key.
    return write_tiny_qwen2_vl(tmp_path_factory.mktemp("fvlm") / "qwen2vl", seed=4,
                               architecture="FourierQwen2VLForConditionalGeneration",
                               fourier_vlm={"ratio": QWEN_RATIO})


@pytest.fixture(scope="module")
def llava_run(llava_dir, tmp_path_factory):
    # A stock LLaVA checkpoint switched to Fourier-VLM by --hf-overrides only.
    reference = LlavaReference(llava_dir)
    overrides = {"architectures": ["FourierLlavaForConditionalGeneration"],
                 "fourier_vlm": {"reserve": 12}}
    run = run_driver(tmp_path_factory.mktemp("llava_engine"),
                     {"model": str(llava_dir), "hf_overrides": overrides,
                      "limit_mm_per_prompt": {"image": 2}},
                     LLAVA_REQUESTS, capture_token_id=reference.image_token_id)
    return run, reference


@pytest.fixture(scope="module")
def qwen_run(qwen_dir, tmp_path_factory):
    reference = QwenReference(qwen_dir)
    run = run_driver(tmp_path_factory.mktemp("qwen_engine"),
                     {"model": str(qwen_dir), "limit_mm_per_prompt": {"image": 2}},
                     QWEN_REQUESTS, capture_token_id=reference.image_token_id)
    return run, reference


# ------------------------------------------------------------------------------------------------
# LLaVA-1.5: 576 -> 144 tokens per image


def test_llava_prompt_shrinks_by_the_removed_tokens(llava_run) -> None:
    run, ref = llava_run
    assert run["model_class"] == ("kvfold.models.fourier_vlm.llava:"
                                  "FourierLlavaForConditionalGeneration")
    for request, out in zip(LLAVA_REQUESTS, run["requests"]):
        n = len(request["images"])
        full = ref.uncompressed_prompt_len(request["prompt"], request["images"])
        assert out["prompt_token_ids"].count(ref.image_token_id) == 144 * n
        assert len(out["prompt_token_ids"]) == full - (576 - 144) * n
        assert len(out["tokens"]) == 4
    print(f"\nLLaVA prompt tokens, transformers (576/image) vs vLLM Fourier (144/image): "
          f"{[ref.uncompressed_prompt_len(r['prompt'], r['images']) for r in LLAVA_REQUESTS]} vs "
          f"{[len(o['prompt_token_ids']) for o in run['requests']]}")


def test_llava_embeddings_are_the_reference_compression(llava_run) -> None:
    run, ref = llava_run
    errors = []
    for request, out in zip(LLAVA_REQUESTS, run["requests"]):
        got = torch.tensor(out["embeds"]).reshape(len(request["images"]), 144, -1) \
            if request["images"] else torch.empty(0)
        for i, image in enumerate(request["images"]):
            want = ref.embeds(image, (12, 12))
            errors.append(relative_error(got[i], want))
            # Negative controls: a transposed grid or the "mean" norm is far from what vLLM fed.
            assert relative_error(got[i], ref.embeds(image, (12, 12), transpose=True)) > 0.05
            assert relative_error(got[i], ref.embeds(image, (12, 12), norm="mean")) > 0.05
    print(f"\nLLaVA image embeddings vs reference: max relative error {max(errors):.2e}")
    assert len(errors) == 3 and max(errors) < TOLERANCE


# ------------------------------------------------------------------------------------------------
# Qwen2-VL: each merged grid side scaled by the ratio


def test_qwen_prompt_shrinks_by_the_removed_tokens(qwen_run) -> None:
    run, ref = qwen_run
    assert run["model_class"] == ("kvfold.models.fourier_vlm.qwen2_vl:"
                                  "FourierQwen2VLForConditionalGeneration")
    for request, out in zip(QWEN_REQUESTS, run["requests"]):
        full = ref.uncompressed_prompt_len(request["prompt"], request["images"])
        removed = kept = 0
        for image in request["images"]:
            _, grid = ref.grid(image)
            rows, cols = ref.kept(grid, QWEN_RATIO)
            kept += rows * cols
            removed += grid[1] * grid[2] // 4 - rows * cols
        assert out["prompt_token_ids"].count(ref.image_token_id) == kept
        assert len(out["prompt_token_ids"]) == full - removed
        assert len(out["tokens"]) == 4
    print(f"\nQwen2-VL prompt tokens, transformers vs vLLM Fourier (ratio {QWEN_RATIO}): "
          f"{[ref.uncompressed_prompt_len(r['prompt'], r['images']) for r in QWEN_REQUESTS]} vs "
          f"{[len(o['prompt_token_ids']) for o in run['requests']]}")


def test_qwen_embeddings_are_the_reference_compression(qwen_run) -> None:
    run, ref = qwen_run
    errors = []
    for request, out in zip(QWEN_REQUESTS, run["requests"]):
        got = torch.tensor(out["embeds"]) if out["embeds"] else torch.empty(0)
        start = 0
        for image in request["images"]:
            want = ref.embeds(image, QWEN_RATIO)
            mine = got[start:start + want.shape[0]]
            start += want.shape[0]
            errors.append(relative_error(mine, want))
            if want.shape[0] > 2:  # 1x2 grids are symmetric enough to pass a transposed read
                assert relative_error(mine, ref.embeds(image, QWEN_RATIO, transpose=True)) > 0.05
        assert start == got.shape[0]
    print(f"\nQwen2-VL image embeddings vs reference: max relative error {max(errors):.2e}")
    assert len(errors) == 3 and max(errors) < TOLERANCE


def test_qwen_mrope_positions_follow_the_kept_grid(qwen_run) -> None:
    run, ref = qwen_run
    for request, out in zip(QWEN_REQUESTS, run["requests"]):
        positions = torch.tensor(out["positions"])  # [3, image rows]: (t, h, w) per row
        start = 0
        for image in request["images"]:
            _, grid = ref.grid(image)
            rows, cols = ref.kept(grid, QWEN_RATIO)
            block = positions[:, start:start + rows * cols]
            start += rows * cols
            base = block[0, 0].item()
            assert block[0].tolist() == [base] * (rows * cols)
            assert block[1].tolist() == [base + r for r in range(rows) for _ in range(cols)]
            assert block[2].tolist() == [base + c for _ in range(rows) for c in range(cols)]


# ------------------------------------------------------------------------------------------------
# A kept size larger than the grid stops start-up


def test_reserve_larger_than_the_grid_fails_at_start_up(llava_dir, tmp_path) -> None:
    bad = tmp_path / "llava-bad"
    shutil.copytree(llava_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config.update(architectures=["FourierLlavaForConditionalGeneration"],
                  fourier_vlm={"reserve": 25})
    (bad / "config.json").write_text(json.dumps(config))
    run = run_driver(tmp_path / "engine", {"model": str(bad)}, LLAVA_REQUESTS[:1], timeout=300)
    assert run.returncode != 0
    assert ("FourierVLMConfigError: FourierLlavaForConditionalGeneration: fourier_vlm.reserve=25 "
            "asks for a 25x25 token grid, larger than the vision tower's 24x24 grid") in run.log
    assert "Engine core initialization" not in run.log  # refused before an engine was started
