"""KVFOLD_VQKV in real vLLM engines (spawned engine process): exact within the window, capacity
from vLLM's own report, preemption by recompute, refusals at start-up."""

import random

import pytest
import torch

from kvfold.attention_backends.vqkv import codebooks as files
from kvfold.attention_backends.vqkv.reference import LayerCodebooks, ResidualCodebook, rope_branches

pytestmark = pytest.mark.engine

rng = random.Random(2)
COMMON = {"max_model_len": 1024, "enable_prefix_caching": False}
KEY_STAGES, VALUE_STAGES = 4, 8  # 16 code bytes per token and KV head; float32 K+V is 512


def prompts(*lengths: int) -> list[list[int]]:
    return [[rng.randrange(3, 259) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def books_dir(tmp_path_factory, tiny_llama):
    """Codebooks fitted on random vectors of the right shape: the engine mechanics do not need
    good ones (fidelity is tested with calibrated codebooks of a real model)."""
    from kvfold.attention_backends.vqkv.reference import fit_residual

    directory = tmp_path_factory.mktemp("vqkv-engine-books")
    d = 64
    files.write_manifest(directory, files.CodebookManifest(
        num_layers=2, num_kv_heads=2, head_size=d, head_size_v=d,
        key_stages=KEY_STAGES, value_stages=VALUE_STAGES))
    g = torch.Generator().manual_seed(0)
    for layer in range(2):
        samples = torch.randn(2048, d, generator=g)
        key = [ResidualCodebook(dims, fit_residual(samples[:, dims], KEY_STAGES, iterations=3))
               for dims in rope_branches(d)]
        value = ResidualCodebook(torch.arange(d), fit_residual(samples, VALUE_STAGES, iterations=3))
        files.save_layer(directory, layer, LayerCodebooks(d, d, key, value))
    return directory


def vqkv(books_dir, **options) -> dict:
    return {"attention_backend": "KVFOLD_VQKV",
            "additional_config": {"kvfold": {"codebooks": str(books_dir), **options}}}


def concurrency(log: str) -> float:
    return float(log.split("Maximum concurrency for 1,024 tokens per request: ")[1].split("x")[0])


def test_within_the_exact_window_equals_cpu_attn(run_engine, tiny_llama, books_dir) -> None:
    # Sequences shorter than sink + recent are all exact: the ring, the reserved blocks and the
    # block-table offset are exercised end to end with tokens that must match exact attention.
    batch = prompts(5, 37, 200, 300)
    reference = run_engine(tiny_llama, batch, 24, attention_backend="CPU_ATTN", **COMMON)
    run = run_engine(tiny_llama, batch, 24, **vqkv(books_dir, sink=4, recent=508), **COMMON)
    assert set(run["impls"]) == {"VQKVImpl"}
    assert run["tokens"] == reference["tokens"]


def test_capacity_chunks_preemption_and_release(run_engine, tiny_llama, books_dir) -> None:
    options = {"sink": 4, "recent": 28}
    common = {**COMMON, "max_num_batched_tokens": 128, "enable_chunked_prefill": True}
    batch = prompts(700, 900, 60, 500)
    dense = run_engine(tiny_llama, batch[:1], 1, attention_backend="KVFOLD_DENSE", **common)
    run = run_engine(tiny_llama, batch, 40, **vqkv(books_dir, **options), **common)
    assert [len(t) for t in run["tokens"]] == [40] * 4
    # vLLM's CPU blocks are 128 tokens, the ratio is the same as with 16. Per request: 64 blocks of 16 tokens dense (float32 K+V: 512 bytes per token and head);
    # VQKV: 64 position blocks + the reserved ones, 16 bytes per token and head. An exact
    # float32 token spans 512 / 16 = 32 cells, so 32 exact tokens reserve 32 * 32 / 16 = 64 blocks.
    expected = (64 / (64 + 64)) * (512 / 16)
    assert concurrency(run.log) / concurrency(dense.log) == pytest.approx(expected, rel=0.02)
    assert run["metrics"]["vllm:kv_cache_usage_perc"] == 0  # every block back, reserved ones too



def test_preemption_by_recompute(run_engine, tiny_llama, books_dir) -> None:
    options = vqkv(books_dir, sink=4, recent=28)  # 64 reserved blocks of 16 per request
    common = {**COMMON, "block_size": 16}
    batch = prompts(60, 70, 80, 90)
    roomy = run_engine(tiny_llama, batch, 200, **options, **common)
    # 4 x (64 + 6) blocks admit all four; 200 decode steps each need 13 more: the newest are
    # preempted and recomputed into other blocks.
    squeezed = run_engine(tiny_llama, batch, 200, **options, **common, num_gpu_blocks_override=300)
    assert squeezed["metrics"]["vllm:num_preemptions"] > 0
    assert [len(t) for t in squeezed["tokens"]] == [200] * 4
    assert squeezed["metrics"]["vllm:kv_cache_usage_perc"] == 0
    # The oldest request is never the victim: its codes and ring were never disturbed. A
    # recomputed request re-reads its whole history exactly in one prefill step (as the paper's
    # prefill does), so after the preemption its tokens may legitimately differ.
    assert squeezed["tokens"][0] == roomy["tokens"][0]


def test_preemption_within_the_exact_window_equals_cpu_attn(run_engine, tiny_llama, books_dir) -> None:
    # With the whole sequence in the exact ring, recompute must rebuild it token for token.
    common = {**COMMON, "block_size": 32, "max_model_len": 512}  # CPU_ATTN needs 32
    batch = prompts(60, 70, 80, 90)
    reference = run_engine(tiny_llama, batch, 100, attention_backend="CPU_ATTN", **common)
    # Per request: 4 + 300 exact float32 tokens x 32 cells / 32 = 304 reserved blocks; with the
    # position blocks all four need 1,227 at admission and 1,239 by the end: 1,232 preempts.
    run = run_engine(tiny_llama, batch, 100, **vqkv(books_dir, sink=4, recent=300), **common,
                     num_gpu_blocks_override=1232)
    assert run["metrics"]["vllm:num_preemptions"] > 0
    assert run["tokens"] == reference["tokens"]


def test_bad_options_stop_startup(run_engine, tiny_llama, books_dir, tmp_path) -> None:
    run = run_engine(tiny_llama, prompts(5), 1, **vqkv(tmp_path), timeout=180, **COMMON)
    assert run.returncode != 0 and "kvfold calibrate vqkv" in run.log
    run = run_engine(tiny_llama, prompts(5), 1, **vqkv(books_dir), max_model_len=1024,
                     enable_prefix_caching=True, timeout=180)
    assert run.returncode != 0 and "--no-enable-prefix-caching" in run.log


def test_bfloat16_beyond_the_window(run_engine, tiny_llama, books_dir) -> None:
    # The model dtype users serve: 16-bit exact cells, codes for everything older than the window,
    # chunked prefill across the window's edge.
    common = {**COMMON, "dtype": "bfloat16", "max_num_batched_tokens": 128, "enable_chunked_prefill": True}
    batch = prompts(700, 300)
    run = run_engine(tiny_llama, batch, 16, **vqkv(books_dir, sink=4, recent=60), **common)
    assert run.returncode == 0, run.log[-3000:]
    assert [len(t) for t in run["tokens"]] == [16, 16]
    assert run["metrics"]["vllm:kv_cache_usage_perc"] == 0
