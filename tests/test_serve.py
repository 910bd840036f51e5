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
