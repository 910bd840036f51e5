"""KVFOLD_TREEKV in real vLLM engines: exactness within budget, bounded memory beyond it."""

import random

import pytest

pytestmark = pytest.mark.engine

rng = random.Random(1)
COMMON = {"max_model_len": 1024, "enable_prefix_caching": False}


def prompts(*lengths: int) -> list[list[int]]:
    return [[rng.randrange(3, 259) for _ in range(n)] for n in lengths]


def test_within_budget_equals_cpu_attn(run_engine, tiny_llama) -> None:
    # Nothing is evicted while a sequence fits the budget, so TreeKV is exact attention; this
    # covers the packed pages, the window spec and the per-head slot bookkeeping end to end.
    batch = prompts(5, 37, 200, 300)
    reference = run_engine(tiny_llama, batch, 24, attention_backend="CPU_ATTN", **COMMON)
    run = run_engine(tiny_llama, batch, 24, attention_backend="KVFOLD_TREEKV",
                     additional_config={"kvfold": {"budget": 512}}, **COMMON)
    assert set(run["impls"]) == {"TreeKVImpl"}
    assert run["tokens"] == reference["tokens"]


def test_long_prompts_run_in_bounded_memory(run_engine, tiny_llama) -> None:
    options = {"budget": 128, "sink": 4, "recent": 60, "prefill_block": 16}
    common = {**COMMON, "block_size": 32, "max_num_batched_tokens": 128, "enable_chunked_prefill": True}
    batch = prompts(700, 900, 60, 500)
    dense = run_engine(tiny_llama, batch[:1], 1, attention_backend="KVFOLD_DENSE", **common)
    run = run_engine(tiny_llama, batch, 40, attention_backend="KVFOLD_TREEKV",
                     additional_config={"kvfold": options}, **common)
    assert [len(t) for t in run["tokens"]] == [40] * 4
    # vLLM sizes a request at the window (budget + 1) plus the in-flight chunk, not the model length.
    dense_conc = float(dense.log.split("Maximum concurrency for 1,024 tokens per request: ")[1].split("x")[0])
    tree_conc = float(run.log.split("Maximum concurrency for 1,024 tokens per request: ")[1].split("x")[0])
    # Per request: 1024 tokens = 32 blocks dense; cdiv(128 + 128, 32) + 1 = 9 blocks, and the
    # TreeKV page carries 16 extra bytes per slot and head (K+V 512 bytes in float32).
    assert tree_conc / dense_conc == pytest.approx((32 / 9) * (512 / 528), rel=0.02)
    assert run["metrics"]["vllm:kv_cache_usage_perc"] == 0  # every block back after the requests


@pytest.mark.parametrize("config,message", [
    ({"kvfold": {"budget": 4096}}, "budget 4096 >= max model length 1024"),
    ({"kvfold": {"budget": 512, "sink": "four"}}, "option 'sink'"),
])
def test_bad_options_stop_startup(run_engine, tiny_llama, config, message) -> None:
    run = run_engine(tiny_llama, prompts(5), 1, attention_backend="KVFOLD_TREEKV",
                     additional_config=config, timeout=180, **COMMON)
    assert run.returncode != 0 and message in run.log


def test_prefix_caching_is_refused(run_engine, tiny_llama) -> None:
    run = run_engine(tiny_llama, prompts(5), 1, attention_backend="KVFOLD_TREEKV",
                     max_model_len=1024, enable_prefix_caching=True, timeout=180)
    assert run.returncode != 0 and "--no-enable-prefix-caching" in run.log
