"""KVFOLD_FOURIER in real vLLM engines (spawned engine process): exact within the window, the
specification's tokens beyond it, capacity from vLLM's own report, preemption, refusals."""

import random

import pytest

from kvfold.attention_backends.fourier import calibrate as files

pytestmark = pytest.mark.engine

rng = random.Random(3)
COMMON = {"max_model_len": 1024, "enable_prefix_caching": False}
SINK, RECENT, FREQS = 4, 60, 16  # the middle is compressed once it is longer than 32 tokens


def prompts(*lengths: int) -> list[list[int]]:
    return [[rng.randrange(3, 259) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def dims_dir(tmp_path_factory, tiny_llama):
    """Random dims in the proportions of the paper's middle layers (the engine mechanics and the
    match with the specification do not depend on which dims a random model compresses)."""
    directory = tmp_path_factory.mktemp("fourier-engine-dims")
    files.write(files.random_dims(tiny_llama, seed=0, sink=SINK, recent=RECENT, freqs=FREQS,
                                  fractions=(0.8, 0.8)), directory)
    return directory


def fourier(dims_dir, **options) -> dict:
    return {"attention_backend": "KVFOLD_FOURIER",
            "additional_config": {"kvfold": {"dims": str(dims_dir), **options}}}


def concurrency(log: str) -> float:
    return float(log.split("Maximum concurrency for 1,024 tokens per request: ")[1].split("x")[0])


def test_within_the_exact_window_equals_cpu_attn(run_engine, tiny_llama, dims_dir) -> None:
    # Up to sink + recent + 2k tokens nothing is compressed: kept dims in the token slots, the
    # others in the ring and the coefficient rows, all exact, and the packing across layers is
    # exercised end to end.
    batch = prompts(5, 37, 200, 300)
    reference = run_engine(tiny_llama, batch, 24, attention_backend="CPU_ATTN", **COMMON)
    run = run_engine(tiny_llama, batch, 24, **fourier(dims_dir, recent=300, freqs=64), **COMMON)
    assert set(run["impls"]) == {"FourierImpl"}
    assert run["tokens"] == reference["tokens"]


@pytest.mark.parametrize("chunk", [None, 128])
def test_beyond_the_window_equals_the_specification(run_engine, tiny_llama, dims_dir, chunk) -> None:
    from fourier_reference_model import generate

    batch = prompts(600, 250) if chunk is None else prompts(600)
    extra = {"max_num_batched_tokens": 2048} if chunk is None else {"max_num_batched_tokens": chunk}
    run = run_engine(tiny_llama, batch, 12, **fourier(dims_dir), **COMMON, **extra)
    window = COMMON["max_model_len"] - SINK - RECENT
    for prompt, tokens, logprobs in zip(batch, run["tokens"], run["logprobs"]):
        expected, expected_lp = generate(tiny_llama, dims_dir, prompt, 12, sink=SINK, recent=RECENT,
                                         freqs=FREQS, window=window, chunk=chunk)
        assert tokens == expected
        assert logprobs == pytest.approx(expected_lp, abs=1e-3)


def test_capacity_and_release(run_engine, tiny_llama, dims_dir) -> None:
    from kvfold.attention_backends.fourier.backend import FourierOptions, layout_for

    common = {**COMMON, "block_size": 16, "max_num_batched_tokens": 128, "enable_chunked_prefill": True}
    batch = prompts(700, 900, 60, 500)
    dense = run_engine(tiny_llama, batch[:1], 1, attention_backend="KVFOLD_DENSE", **common)
    run = run_engine(tiny_llama, batch, 16, **fourier(dims_dir), **common)
    assert [len(t) for t in run["tokens"]] == [16] * 4
    layout = layout_for(FourierOptions(dims=str(dims_dir)), __import__("torch").float32, 16)
    # vLLM's own admission arithmetic: a 1024-token request holds 64 blocks of 16 plus the reserved
    # ones; a block holds every layer's kept dims instead of every layer's K and V.
    expected = (64 / (64 + layout.reserved_blocks)) * (layout.dense_cell_bytes / layout.cell_bytes)
    assert concurrency(run.log) / concurrency(dense.log) == pytest.approx(expected, rel=0.02)
    assert run["metrics"]["vllm:kv_cache_usage_perc"] == 0  # every block back, reserved ones too


def test_preemption_by_recompute(run_engine, tiny_llama, dims_dir) -> None:
    from kvfold.attention_backends.fourier.backend import FourierOptions, layout_for

    common = {**COMMON, "block_size": 16}
    batch = prompts(60, 70, 80, 90)
    reserved = layout_for(FourierOptions(dims=str(dims_dir)), __import__("torch").float32, 16).reserved_blocks
    roomy = run_engine(tiny_llama, batch, 150, **fourier(dims_dir), **common)
    # Admission takes 4 x (reserved + 6) blocks; 150 decode steps each need ~10 more.
    squeezed = run_engine(tiny_llama, batch, 150, **fourier(dims_dir), **common,
                          num_gpu_blocks_override=4 * (reserved + 6) + 20)
    assert squeezed["metrics"]["vllm:num_preemptions"] > 0
    assert [len(t) for t in squeezed["tokens"]] == [150] * 4
    assert squeezed["metrics"]["vllm:kv_cache_usage_perc"] == 0
    # The oldest request is never the victim. A recomputed one prefills its whole history in one
    # step (exactly, as the paper's prefill), so its later tokens may legitimately differ.
    assert squeezed["tokens"][0] == roomy["tokens"][0]


def test_missing_dims_and_prefix_caching_stop_startup(run_engine, tiny_llama, dims_dir, tmp_path) -> None:
    # The engine path of the start-up checks; the other refusals are the same check, tested where
    # vLLM builds its config (tests/test_fourier_paged.py).
    run = run_engine(tiny_llama, prompts(5), 1, **fourier(tmp_path), timeout=180, **COMMON)
    assert run.returncode != 0 and "kvfold calibrate fourier" in run.log
    run = run_engine(tiny_llama, prompts(5), 1, **fourier(dims_dir), max_model_len=1024,
                     enable_prefix_caching=True, timeout=180)
    assert run.returncode != 0 and "--no-enable-prefix-caching" in run.log
