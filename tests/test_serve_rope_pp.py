"""``kvfold serve DIR`` on an authors'-format RoPE++ checkpoint, with no flag naming RoPE++."""

import pytest
import requests
from rope_pp_reference import load_reference, reference_greedy, write_rope_pp_checkpoint

from kvfold.serving import Server

pytestmark = pytest.mark.engine

ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
PROMPT = list(range(40, 90))


def test_serve_rope_pp_checkpoint_unchanged(tmp_path) -> None:
    model = write_rope_pp_checkpoint(
        tmp_path / "ropepp-ec", {"imag": True, "imag_mode": "imag2"},
        num_heads=4, num_kv_heads=2, head_dim=64, seed=5,
    )
    expected, _ = reference_greedy(load_reference(model), PROMPT, 8)
    # Only what any Llama needs on this CPU box; the kvfold backend underneath is optional.
    args = ["--dtype", "float32", "--max-model-len", "1024", "--attention-backend", "KVFOLD_DENSE"]
    with Server(model, args, tmp_path / "serve.log", env=ENV) as server:
        response = requests.post(
            f"{server.url}/v1/completions", timeout=120,
            json={"model": str(model), "prompt": PROMPT, "max_tokens": 8, "temperature": 0,
                  "ignore_eos": True, "return_token_ids": True},
        )
        response.raise_for_status()
        assert response.json()["choices"][0]["token_ids"] == expected
        assert server.complete("Hello RoPE++", max_tokens=4)["usage"]["completion_tokens"] == 4
    log = server.log_text()
    assert "Resolved architecture: LlamaForCausalLM" in log
    assert "Using KVFOLD_DENSE backend" in log
    assert server.process.returncode == 0, server.log_tail()
