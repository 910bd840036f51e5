"""``kvfold serve`` (vLLM's OpenAI server) with Fourier-VLM: an image in a chat request, end to end.

LLaVA is selected by its checkpoint's config.json (kvfold's architecture name and
``fourier_vlm: {"reserve": 8}``: 64 tokens per image); Qwen2-VL is a stock checkpoint switched by
``--hf-overrides`` (the authors' default ratio 2/3). Each request is sent with and without its
image, so the image's share of ``usage.prompt_tokens`` is exactly the compressed count, which must
also equal transformers' uncompressed prompt minus the tokens Fourier-VLM removes.
On a GPU machine: ``FOURIER_VLM_TEST_DTYPE=bfloat16 python -m pytest tests/test_fourier_vlm_serve.py``.
"""

from __future__ import annotations

import base64
import io
import json
import os

import pytest
import requests
from fourier_vlm_driver import make_image
from fourier_vlm_helpers import LlavaReference, QwenReference

from kvfold.serving import Server
from kvfold.tiny_vlm import write_tiny_llava, write_tiny_qwen2_vl

pytestmark = pytest.mark.engine

ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
# Token counts do not depend on the dtype: FOURIER_VLM_TEST_DTYPE=bfloat16 runs these on a GPU.
ARGS = ["--dtype", os.environ.get("FOURIER_VLM_TEST_DTYPE", "float32"), "--max-model-len", "1024",
        "--enforce-eager"]
QUESTION = "What is in the picture?"


def image_url(image: list[int]) -> str:
    buf = io.BytesIO()
    make_image(*image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat(server: Server, model: str, image: list[int] | None) -> dict:
    content: list[dict] = [{"type": "text", "text": QUESTION}]
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": image_url(image)}})
    response = requests.post(
        f"{server.url}/v1/chat/completions", timeout=120,
        json={"model": model, "messages": [{"role": "user", "content": content}],
              "max_tokens": 6, "temperature": 0, "ignore_eos": True},
    )
    assert response.status_code == 200, response.text
    return response.json()


def uncompressed_prompt_len(reference, image: list[int]) -> int:
    """transformers' own prompt for the same chat: its template, its full image expansion."""
    messages = [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                             {"type": "image"}]}]
    text = reference.processor.apply_chat_template(messages, add_generation_prompt=True,
                                                   tokenize=False)
    return reference.uncompressed_prompt_len(text, [image])


def test_llava_serves_compressed_images(tmp_path) -> None:
    model = write_tiny_llava(tmp_path / "llava", seed=5,
                             architecture="FourierLlavaForConditionalGeneration",
                             fourier_vlm={"reserve": 8})
    image = [400, 300, 7]
    with Server(model, ARGS, tmp_path / "serve.log", env=ENV) as server:
        with_image = chat(server, str(model), image)
        text_only = chat(server, str(model), None)
    assert with_image["usage"]["completion_tokens"] == 6
    assert with_image["choices"][0]["message"]["content"] is not None
    image_tokens = with_image["usage"]["prompt_tokens"] - text_only["usage"]["prompt_tokens"]
    full = uncompressed_prompt_len(LlavaReference(model), image)
    print(f"\nLLaVA through the OpenAI server: prompt {with_image['usage']['prompt_tokens']} tokens "
          f"({image_tokens} for the image); transformers, uncompressed: {full}")
    assert image_tokens == 64
    assert with_image["usage"]["prompt_tokens"] == full - (576 - 64)
    log = server.log_text()
    assert "Resolved architecture: FourierLlavaForConditionalGeneration" in log
    assert server.process.returncode == 0, server.log_tail()


def test_qwen2_vl_stock_checkpoint_serves_compressed_images_with_hf_overrides(tmp_path) -> None:
    model = write_tiny_qwen2_vl(tmp_path / "qwen2vl", seed=6)  # stock Qwen2VLForConditionalGeneration
    image = [224, 168, 8]  # 12x16 patches -> 6x8 = 48 merged tokens -> 4x5 = 20 kept
    overrides = json.dumps({"architectures": ["FourierQwen2VLForConditionalGeneration"]})
    with Server(model, [*ARGS, "--hf-overrides", overrides], tmp_path / "serve.log",
                env=ENV) as server:
        with_image = chat(server, str(model), image)
        text_only = chat(server, str(model), None)
    assert with_image["usage"]["completion_tokens"] == 6
    image_tokens = with_image["usage"]["prompt_tokens"] - text_only["usage"]["prompt_tokens"]
    full = uncompressed_prompt_len(QwenReference(model), image)
    print(f"\nQwen2-VL through the OpenAI server: prompt {with_image['usage']['prompt_tokens']} "
          f"tokens ({image_tokens} for the image incl. 2 vision start/end); transformers, "
          f"uncompressed: {full}")
    assert image_tokens == 20 + 2  # <|vision_start|> and <|vision_end|> come with the image
    assert with_image["usage"]["prompt_tokens"] == full - (48 - 20)
    log = server.log_text()
    assert "Resolved architecture: FourierQwen2VLForConditionalGeneration" in log
    assert server.process.returncode == 0, server.log_tail()


def test_serve_refuses_a_reserve_larger_than_the_grid(tmp_path) -> None:
    model = write_tiny_llava(tmp_path / "llava", seed=5)
    overrides = json.dumps({"architectures": ["FourierLlavaForConditionalGeneration"],
                            "fourier_vlm": {"reserve": 30}})
    server = Server(model, [*ARGS, "--hf-overrides", overrides], tmp_path / "serve.log", env=ENV)
    with pytest.raises(RuntimeError, match="exited with"):
        server.__enter__()
    assert server.process.returncode != 0
    assert ("fourier_vlm.reserve=30 asks for a 30x30 token grid, larger than the vision tower's "
            "24x24 grid (576 tokens at 336x336 pixels, patch 14); reserve must be at most 24"
            ) in server.log_text()
