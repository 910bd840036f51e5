"""``kvfold serve`` (vLLM's OpenAI server, default multiprocess engine) with a kvfold backend."""

import os
import subprocess
import sys

import pytest
import requests

from kvfold.serving import Server

pytestmark = pytest.mark.engine

ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
ARGS = ["--max-model-len", "1024", "--enforce-eager", "--gpu-memory-utilization", "0.4"]


def test_serve_kvfold_dense_end_to_end(tiny_llama, tmp_path) -> None:
    server = Server(tiny_llama, ["--attention-backend", "KVFOLD_DENSE", *ARGS],
                    tmp_path / "serve.log", env=ENV)
    with server:
        by_text = server.complete("Paged attention, served by a plugin:", max_tokens=8)
        assert by_text["usage"]["completion_tokens"] == 8
        by_ids = server.complete([5, 6, 7, 8, 9], max_tokens=8)
        assert by_ids["usage"]["prompt_tokens"] == 5
        metrics = requests.get(f"{server.url}/metrics", timeout=10)
        assert metrics.status_code == 200
        assert "vllm:cache_config_info" in metrics.text
        generated = [line for line in metrics.text.splitlines()
                     if line.startswith("vllm:generation_tokens_total")]
        assert generated and float(generated[0].split()[-1]) == 16
        capacity = server.capacity()
        assert capacity.max_model_len == 1024 and capacity.tokens > 0
    log = server.log_text()
    assert "Using KVFOLD_DENSE backend" in log  # the worker built kvfold's backend, not CPU_ATTN
    assert "Cannot use" not in log
    assert server.process.returncode == 0, server.log_tail()
    assert server.stragglers == []  # engine core and workers exited with the API server


def test_serve_refuses_bad_options_at_startup(tiny_llama, tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kvfold", "serve", str(tiny_llama), *ARGS,
         "--attention-backend", "KVFOLD_DENSE", "--additional-config", '{"kvfold": {"bugdet": 1}}'],
        capture_output=True, text=True, timeout=180, env={**os.environ, **ENV},
    )
    assert proc.returncode != 0
    assert "unknown option 'bugdet'" in proc.stdout + proc.stderr


def test_serve_treekv_with_the_issue_command_shape(tiny_llama, tmp_path) -> None:
    options = '{"kvfold": {"budget": 256}}'
    server = Server(tiny_llama, ["--attention-backend", "KVFOLD_TREEKV", "--additional-config", options,
                                 "--no-enable-prefix-caching", "--max-num-batched-tokens", "128", *ARGS],
                    tmp_path / "serve.log", env=ENV)
    with server:
        long_prompt = [3 + (i * 37) % 250 for i in range(700)]  # longer than the budget
        out = server.complete(long_prompt, max_tokens=16)
        assert out["usage"]["completion_tokens"] == 16
        metrics = requests.get(f"{server.url}/metrics", timeout=10).text
    evicted = [line for line in metrics.splitlines()
               if line.startswith("kvfold:tokens_evicted_total") and 'backend="KVFOLD_TREEKV"' in line]
    # The model processes the 700 prompt tokens and 15 generated ones (the 16th is only sampled):
    # 715 tokens through a 256-token budget drop 459 per KV head.
    assert evicted and float(evicted[0].split()[-1]) == 459
    ratio = [line for line in metrics.splitlines() if line.startswith("kvfold:compression_ratio")]
    # A 1024-token request holds cdiv(256 + 128 in flight, 128) + 1 = 4 blocks of 128 instead of 8,
    # in pages of 272 bytes per token and head (bf16 K+V + 16 bytes of TreeKV state) instead of 256.
    assert ratio and float(ratio[0].split()[-1]) == pytest.approx((1024 * 256) / (512 * 272))
    assert "Using KVFOLD_TREEKV backend" in server.log_text()
    assert server.process.returncode == 0 and server.stragglers == []


def test_serve_fourier_with_the_issue_command_shape(tiny_llama, tmp_path) -> None:
    import torch

    from kvfold.attention_backends.fourier import calibrate as files
    from kvfold.attention_backends.fourier.backend import FourierOptions, layout_for

    files.write(files.random_dims(tiny_llama, seed=0, sink=4, recent=60, freqs=16), tmp_path / "dims")
    options = f'{{"kvfold": {{"dims": "{tmp_path / "dims"}"}}}}'
    server = Server(tiny_llama, ["--attention-backend", "KVFOLD_FOURIER", "--additional-config", options,
                                 "--no-enable-prefix-caching", *ARGS], tmp_path / "serve.log", env=ENV)
    with server:
        long_prompt = [3 + (i * 37) % 250 for i in range(700)]  # its middle is compressed
        out = server.complete(long_prompt, max_tokens=16)
        assert out["usage"]["completion_tokens"] == 16
        metrics = requests.get(f"{server.url}/metrics", timeout=10).text
    ratio = [line for line in metrics.splitlines() if line.startswith("kvfold:compression_ratio")]
    # vLLM serves the tiny model in bfloat16 here: a 1024-token request holds 8 blocks of 128 slots
    # plus the reserved ones, each slot one cell of every layer's kept dims.
    layout = layout_for(FourierOptions(dims=str(tmp_path / "dims")), torch.bfloat16, 128)
    dense = 1024 * layout.dense_cell_bytes * layout.num_layers
    assert ratio and float(ratio[0].split()[-1]) == pytest.approx(dense / layout.bytes_per_request(1024))
    assert "Using KVFOLD_FOURIER backend" in server.log_text()
    assert server.process.returncode == 0 and server.stragglers == []
