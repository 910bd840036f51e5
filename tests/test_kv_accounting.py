"""kvfold:kv_bytes_per_token / bf16 baseline / compression_ratio from real vLLM configs.

The accounting runs in a child process (building a VllmConfig loads vLLM's plugins and platform),
on the tiny checkpoint, for several model and KV-cache dtypes, and for a backend whose
``customize_spec`` packs K and V into fewer bytes, which is what a compressing method will do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

DRIVER = r'''
import dataclasses, json, sys
from vllm.engine.arg_utils import EngineArgs
from kvfold.attention_backends.dense.backend import DenseBackend
from kvfold.metrics.kv_accounting import kv_accounting

class HalfPageBackend(DenseBackend):
    """Stores each token's K and V of one head in a quarter of the float32 bytes."""
    @classmethod
    def customize_spec(cls, spec):
        return dataclasses.replace(spec, state_content_bytes=spec.state_content_size_bytes // 4)

out = {}
for dtype, kv in [("float32", "auto"), ("bfloat16", "auto"), ("float32", "bfloat16")]:
    config = EngineArgs(model=sys.argv[1], dtype=dtype, kv_cache_dtype=kv, max_model_len=1024,
                        enforce_eager=True, attention_backend="KVFOLD_DENSE",
                        gpu_memory_utilization=0.4).create_engine_config()
    for name, backend in (("dense", DenseBackend), ("packed", HalfPageBackend)):
        a = kv_accounting(backend, config)
        out[f"{name}/{dtype}/{kv}"] = [a.kv_bytes_per_token, a.bf16_bytes_per_token, a.compression_ratio]
print("RESULT" + json.dumps(out))
'''


def test_bytes_per_token_and_ratio(tiny_llama) -> None:
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(tiny_llama)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    config = json.loads((tiny_llama / "config.json").read_text())
    bf16 = config["num_hidden_layers"] * config["num_key_value_heads"] * 2 * config["head_dim"] * 2
    assert result["dense/float32/auto"] == [2 * bf16, bf16, 0.5]  # float32 stores twice bf16
    assert result["dense/bfloat16/auto"] == [bf16, bf16, 1.0]  # exactly 1 only at bf16
    assert result["dense/float32/bfloat16"] == [bf16, bf16, 1.0]  # the KV-cache dtype is what counts
    # The page a backend's customize_spec returns is what the metric reports.
    assert result["packed/float32/auto"] == [bf16 / 2, bf16, 2.0]
    assert result["packed/bfloat16/auto"] == [bf16 / 4, bf16, 4.0]
