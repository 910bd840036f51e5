"""On the GPU machine: kvfold backends selected by name under vLLM's default multiprocess engine.

Not part of CI (no GPU there). Run after the vLLM kit is installed (../shared/gpu/README.md):
    python tests/gpu/check_cuda.py OUT_DIR [dense|treekv|kernels|vqkv|vqkv-kernels|paged|serve]
Writes OUT_DIR/cuda_check.json and the engine logs. "dense" compares greedy tokens of KVFOLD_DENSE
(by name and through CUSTOM) with vLLM's TRITON_ATTN in float32, and with FLASH_ATTN in bfloat16,
then serves KVFOLD_DENSE with `kvfold serve` (eager and compiled). "treekv" compares KVFOLD_TREEKV
within its budget (exact) with TRITON_ATTN in float32, runs prompts far beyond the budget, and
serves it, reading kvfold's metrics. "kernels" runs TreeKV's Triton kernel cases and the paged
decode test (tests/test_treekv_kernels.py, tests/test_treekv_paged.py) on CUDA. "vqkv" runs VQKV's
Triton decode kernel over codes and its encode kernel against their torch specifications
(tests/test_vqkv_kernels.py, tests/test_vqkv_encode.py) on CUDA.
"vqkv-kernels" runs VQKV's kernels (decode, exact ring, encode, prefill past) and paged steps without an engine.
"paged" runs TreeKV's kernel cases and the paged-step tests of TreeKV and VQKV, with and without
CUDA graphs, and starts no engine.
"serve" serves KVFOLD_VQKV and KVFOLD_FOURIER in bfloat16 with `kvfold serve` and sends prompts far
beyond their exact windows (random codebooks / dims: the serving mechanics do not depend on them).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
_rng = random.Random(0)
PROMPTS = [[_rng.randrange(3, 259) for _ in range(n)] for n in (5, 37, 200, 300)]  # tiny vocab: 259


def run_engine(out_dir: Path, tag: str, model: Path, dtype: str, **llm) -> dict:
    spec = {
        "llm": {"model": str(model), "dtype": dtype, "enforce_eager": True, "max_model_len": 1024,
                "gpu_memory_utilization": 0.3, "disable_log_stats": False, **llm},
        "prompts": PROMPTS, "max_tokens": 32,
    }
    spec_path, result_path = out_dir / f"{tag}.spec.json", out_dir / f"{tag}.json"
    spec_path.write_text(json.dumps(spec))
    with open(out_dir / f"{tag}.log", "w") as log:
        rc = subprocess.run([sys.executable, str(HERE.parent / "engine_driver.py"), spec_path,
                             result_path], stdout=log, stderr=subprocess.STDOUT, timeout=400).returncode
    return json.loads(result_path.read_text()) if rc == 0 else {"error": f"rc={rc}, see {tag}.log"}


def agree(a: dict, b: dict) -> dict:
    if "error" in a or "error" in b:
        return {"error": a.get("error") or b.get("error")}
    same = [x == y for x, y in zip(a["tokens"], b["tokens"])]
    first = [next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None)
             for x, y in zip(a["tokens"], b["tokens"])]
    return {"identical_prompts": sum(same), "prompts": len(same), "first_divergence": first,
            "impls": sorted(set(b.get("impls", []))), "num_gpu_blocks": [a["num_gpu_blocks"], b["num_gpu_blocks"]]}


def check_treekv(out: Path, model: Path) -> dict:
    from kvfold.serving import Server

    report: dict = {}
    common = {"enable_prefix_caching": False}
    triton = run_engine(out, "tk_triton_fp32", model, "float32", attention_backend="TRITON_ATTN", **common)
    within = run_engine(out, "tk_within_fp32", model, "float32", attention_backend="KVFOLD_TREEKV",
                        additional_config={"kvfold": {"budget": 512}}, **common)
    report["fp32 KVFOLD_TREEKV (budget 512, nothing evicted) vs TRITON_ATTN"] = agree(triton, within)
    options = {"budget": 128, "sink": 4, "recent": 60, "prefill_block": 16}
    try:
        with Server(model, ["--attention-backend", "KVFOLD_TREEKV", "--additional-config",
                            json.dumps({"kvfold": options}), "--no-enable-prefix-caching",
                            "--max-model-len", "1024", "--max-num-batched-tokens", "128",
                            "--gpu-memory-utilization", "0.3"], out / "tk_serve.log") as server:
            texts = [server.complete(p, max_tokens=16)["usage"]["completion_tokens"] for p in PROMPTS[2:]]
            metrics = requests.get(f"{server.url}/metrics", timeout=10).text
            report["treekv_serve"] = {
                "completion_tokens": texts,
                "kvfold_lines": [line for line in metrics.splitlines() if line.startswith("kvfold:")],
                "capacity": server.capacity().__dict__,
            }
        report["treekv_serve"]["exit_code"] = server.process.returncode
    except Exception as exc:  # reported, not hidden
        report["treekv_serve"] = {"error": repr(exc)}
    return report


def check_kernels(out: Path, model: Path) -> dict:
    """TreeKV's Triton decode kernel and batched decode path on CUDA, against their specifications."""
    import torch
    from vllm.config import AttentionConfig, CacheConfig, ModelConfig, VllmConfig

    from kvfold.vllm_plugins.general import register

    sys.path.insert(0, str(HERE.parent))
    import test_treekv_kernels
    import test_treekv_paged

    report: dict = {}
    for case in test_treekv_kernels.CASES:
        name = "kernel " + " ".join(str(x) for x in case)
        try:
            report[name] = {"max_abs_out_diff": test_treekv_kernels.check_case(*case, "cuda")}
        except Exception as exc:
            report[name] = {"error": repr(exc)}
    register()
    from kvfold.attention_backends.treekv import backend

    unpadded = backend.bucket
    # CUDA-graph replay (the default on CUDA) with the real bucket sizes, with 3 padding requests,
    # and eagerly (KVFOLD_CUDA_GRAPHS=0).
    for positions, pad, graphs in (("rank", False, "strict"), ("original", False, "strict"),
                                   ("rank", True, "strict"), ("rank", False, "0")):
        backend.bucket = (lambda n: n + 3) if pad else unpadded
        os.environ["KVFOLD_CUDA_GRAPHS"] = graphs
        label = f"{positions}, cuda, graphs {graphs}{', padded' if pad else ''}"
        config = VllmConfig(
            model_config=ModelConfig(model=str(model), dtype="float32", max_model_len=4096),
            cache_config=CacheConfig(enable_prefix_caching=False),
            attention_config=AttentionConfig(backend="KVFOLD_TREEKV"),
            additional_config={"kvfold": dict(test_treekv_paged.OPTIONS)},
        )
        try:
            test_treekv_paged.run_paged_steps(config, positions, "cuda")
            report[f"paged steps = reference ({label})"] = "passed"
        except Exception as exc:
            report[f"paged steps = reference ({label})"] = {"error": repr(exc)[:2000]}
    backend.bucket = unpadded
    os.environ.pop("KVFOLD_CUDA_GRAPHS")
    assert torch.cuda.is_available()
    return report


def check_vqkv(out: Path, model: Path) -> dict:
    """VQKV's Triton decode kernel over codes on CUDA, against its torch specification."""
    import torch

    sys.path.insert(0, str(HERE.parent))
    import test_vqkv_kernels

    assert torch.cuda.is_available()
    report: dict = {}
    runs = [(case, None) for case in test_vqkv_kernels.CASES]
    runs += [(test_vqkv_kernels.CASES[2], n) for n in (1, 7)]
    for case, splits in runs:
        name = "vqkv kernel " + " ".join(str(x) for x in case) + (f" splits={splits}" if splits else "")
        try:
            diff_out, diff_lse = test_vqkv_kernels.check_case(case, "cuda", splits)
            report[name] = {"max_abs_out_diff": diff_out, "max_abs_lse_diff": diff_lse}
        except Exception as exc:
            report[name] = {"error": repr(exc)[:2000]}
    import test_vqkv_encode

    for case in test_vqkv_encode.CASES:
        name = "vqkv encode kernel " + " ".join(str(x) for x in case)
        try:
            report[name] = {"rows_encoded_differently": test_vqkv_encode.check_case(case, "cuda")}
        except Exception as exc:
            report[name] = {"error": repr(exc)[:2000]}
    books = vqkv_paged_steps(model, report)
    # In an engine, sequences inside the exact window must give exact attention's tokens.
    common = {"enable_prefix_caching": False}
    triton = run_engine(out, "vq_triton_fp32", model, "float32", attention_backend="TRITON_ATTN", **common)
    within = run_engine(out, "vq_within_fp32", model, "float32", attention_backend="KVFOLD_VQKV",
                        additional_config={"kvfold": {"codebooks": str(books), "recent": 508}}, **common)
    report["vqkv within window vs TRITON_ATTN (fp32)"] = agree(triton, within)
    return report


def check_serve(out: Path, model: Path, only: str | None = None) -> dict:
    """KVFOLD_VQKV and KVFOLD_FOURIER served in bfloat16 with prompts far beyond the exact window."""
    sys.path.insert(0, str(HERE.parent))
    import torch

    from kvfold.attention_backends.fourier import calibrate as fourier_files
    from kvfold.attention_backends.vqkv import codebooks as vqkv_files
    from kvfold.attention_backends.vqkv.reference import LayerCodebooks, ResidualCodebook, rope_branches
    from kvfold.serving import Server

    books, dims = Path(tempfile.mkdtemp()), Path(tempfile.mkdtemp())
    vqkv_files.write_manifest(books, vqkv_files.CodebookManifest(
        num_layers=2, num_kv_heads=2, head_size=64, head_size_v=64, key_stages=4, value_stages=8))
    g = torch.Generator().manual_seed(0)
    for layer in range(2):
        key = [ResidualCodebook(d, torch.randn(4, 256, len(d), generator=g) / 4) for d in rope_branches(64)]
        value = ResidualCodebook(torch.arange(64), torch.randn(8, 256, 64, generator=g) / 8)
        vqkv_files.save_layer(books, layer, LayerCodebooks(64, 64, key, value))
    fourier_files.write(fourier_files.random_dims(model, seed=0, sink=4, recent=60, freqs=16,
                                                  fractions=(0.8, 0.8)), dims)
    methods = {
        "KVFOLD_VQKV": {"codebooks": str(books), "sink": 4, "recent": 60},
        "KVFOLD_FOURIER": {"dims": str(dims), "sink": 4, "recent": 60, "freqs": 16},
    }
    report: dict = {}
    for name, options in methods.items():
        if only and name != only:
            continue
        try:
            with Server(model, ["--attention-backend", name, "--additional-config",
                                json.dumps({"kvfold": options}), "--no-enable-prefix-caching",
                                "--dtype", "bfloat16", "--enforce-eager", "--max-model-len", "1024",
                                "--max-num-batched-tokens", "128", "--gpu-memory-utilization", "0.3"],
                        out / f"serve_{name}.log") as server:
                done = [server.complete(p, max_tokens=32)["usage"] for p in (PROMPTS[3] * 3, PROMPTS[2] * 2)]
                metrics = requests.get(f"{server.url}/metrics", timeout=10).text
                report[name] = {
                    "usage": done,
                    "kvfold_lines": [line for line in metrics.splitlines() if line.startswith("kvfold:")],
                    "capacity": server.capacity().__dict__,
                }
            report[name]["exit_code"] = server.process.returncode
            report[name]["stragglers"] = server.stragglers
        except Exception as exc:  # reported, not hidden
            report[name] = {"error": repr(exc)}
    return report


def check_vqkv_kernels(out: Path, model: Path) -> dict:
    """VQKV's Triton kernels (decode over codes, exact ring, encode, prefill past) against their torch
    specifications on CUDA, and its paged steps with and without CUDA graphs; starts no engine."""
    sys.path.insert(0, str(HERE.parent))
    import test_vqkv_encode
    import test_vqkv_kernels
    import test_vqkv_past
    import test_vqkv_ring

    report: dict = {}
    checks = [(f"vqkv kernel {' '.join(map(str, c))}", test_vqkv_kernels.check_case, c) for c in test_vqkv_kernels.CASES]
    checks += [(f"vqkv ring step {' '.join(map(str, c))}", test_vqkv_ring.check_case, c) for c in test_vqkv_ring.CASES]
    checks += [(f"vqkv encode kernel {' '.join(map(str, c))}", test_vqkv_encode.check_case, c)
               for c in test_vqkv_encode.CASES]
    checks += [(f"vqkv prefill past {' '.join(map(str, c))}", lambda c, d: test_vqkv_past.check_past(*c, d), c)
               for c in test_vqkv_past.CASES]
    for name, check, case in checks:
        try:
            report[name] = {"result": check(case, "cuda")}
        except Exception as exc:
            report[name] = {"error": repr(exc)[:2000]}
    vqkv_paged_steps(model, report)
    graph_inputs_shared_by_layers(report)
    return report


def graph_inputs_shared_by_layers(report: dict) -> None:
    """Three graphed "layers" of one input shape (one set of input buffers, see graphs.input_buffers),
    called in turn with fresh inputs, each give their own eager result."""
    import torch

    from kvfold.attention_backends.paged.graphs import GraphedStep

    os.environ["KVFOLD_CUDA_GRAPHS"] = "strict"
    g = torch.Generator(device="cuda").manual_seed(0)
    weights = [torch.randn(64, 64, device="cuda", generator=g) for _ in range(3)]
    steps = [GraphedStep(lambda x, y, w=w: (x @ w + 2 * y,)) for w in weights]
    worst = 0.0
    try:
        for _ in range(4):  # the first call of each runs eagerly and captures; the rest replay
            for step, w in zip(steps, weights):
                x, y = (torch.randn(8, 64, device="cuda", generator=g) for _ in range(2))
                (out,) = step("layer", x, y)
                worst = max(worst, float((out - (x @ w + 2 * y)).abs().max()))
        assert worst < 1e-2, worst  # TF32 products at most, never another layer's inputs
        report["graph inputs shared by layers"] = {"result": {"max_abs_error": worst,
                                                              "graphs": [len(s.graphs) for s in steps]}}
    except Exception as exc:
        report["graph inputs shared by layers"] = {"error": repr(exc)[:2000]}
    os.environ.pop("KVFOLD_CUDA_GRAPHS")


def vqkv_paged_steps(model: Path, report: dict) -> Path:
    """VQKV's paged backend (decode and encode through the kernels) against the reference on CUDA,
    with its decode steps replayed as CUDA graphs (strict: a failed capture fails) and eagerly."""
    import test_vqkv_paged
    from test_vqkv_paged import files

    books = Path(tempfile.mkdtemp())
    files.write_manifest(books, files.CodebookManifest(
        num_layers=2, num_kv_heads=test_vqkv_paged.HK, head_size=test_vqkv_paged.D,
        head_size_v=test_vqkv_paged.D, key_stages=test_vqkv_paged.KEY_STAGES,
        value_stages=test_vqkv_paged.VALUE_STAGES, value_groups=test_vqkv_paged.VALUE_GROUPS))
    for layer in range(2):
        files.save_layer(books, layer, test_vqkv_paged.random_books(layer))
    from kvfold.attention_backends.vqkv import backend

    bucket = backend.bucket
    # Padded by 3 more requests than real: the filler (request 0's row, position -1) of the decode
    # steps, which write their tokens inside the graph, must write nothing.
    for graphs, padding in (("strict", 0), ("0", 0), ("strict", 3)):
        os.environ["KVFOLD_CUDA_GRAPHS"] = graphs
        backend.bucket = (lambda n: n + padding) if padding else bucket
        label = f"vqkv paged steps = reference (cuda, graphs {graphs}" + (f", padded by {padding})" if padding else ")")
        try:
            test_vqkv_paged.run_paged_steps(test_vqkv_paged.make_config(model, books), "cuda")
            report[label] = "passed"
        except Exception as exc:
            report[label] = {"error": repr(exc)[:2000]}
    backend.bucket = bucket
    os.environ.pop("KVFOLD_CUDA_GRAPHS")
    return books


def check_paged(out: Path, model: Path) -> dict:
    """No engines: TreeKV's kernels and paged steps, then VQKV's paged steps, on CUDA."""
    sys.path.insert(0, str(HERE.parent))
    report = check_kernels(out, model)
    vqkv_paged_steps(model, report)
    graph_inputs_shared_by_layers(report)
    return report


def main(out_dir: str, which: str = "dense", only: str | None = None) -> None:
    from kvfold.serving import Server
    from kvfold.tiny_model import write_tiny_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = write_tiny_model(Path(tempfile.mkdtemp()) / "tiny-llama")
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # the driver inspects the built layers
    os.environ.setdefault("KVFOLD_CHECK_INVARIANTS", "1")  # the cache checks CPU runs always do
    checks = {"treekv": check_treekv, "kernels": check_kernels, "vqkv": check_vqkv, "serve": check_serve,
              "paged": check_paged, "vqkv-kernels": check_vqkv_kernels}
    if which in checks:
        report = checks[which](out, model, only) if which == "serve" else checks[which](out, model)
        (out / "cuda_check.json").write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
        return
    report: dict = {}
    triton = run_engine(out, "triton_fp32", model, "float32", attention_backend="TRITON_ATTN")
    dense = run_engine(out, "dense_fp32", model, "float32", attention_backend="KVFOLD_DENSE")
    custom = run_engine(out, "custom_fp32", model, "float32", attention_backend="CUSTOM",
                        additional_config={"kvfold": {"method": "dense"}})
    flash = run_engine(out, "flash_bf16", model, "bfloat16", attention_backend="FLASH_ATTN")
    dense16 = run_engine(out, "dense_bf16", model, "bfloat16", attention_backend="KVFOLD_DENSE")
    report["fp32 KVFOLD_DENSE vs TRITON_ATTN"] = agree(triton, dense)
    report["fp32 CUSTOM(dense) vs TRITON_ATTN"] = agree(triton, custom)
    report["bf16 KVFOLD_DENSE vs FLASH_ATTN"] = agree(flash, dense16)
    # Served as users run it: once eager, once with vLLM's default torch.compile + CUDA graphs
    # (kvfold's builder declares no CUDA-graph support, so vLLM must keep attention out of graphs).
    for tag, extra in [("serve", ["--enforce-eager"]), ("serve_compiled", [])]:
        try:
            with Server(model, ["--attention-backend", "KVFOLD_DENSE", "--max-model-len", "1024",
                                "--gpu-memory-utilization", "0.3", *extra],
                        out / f"{tag}.log") as server:
                completion = server.complete("Hello from the GPU", max_tokens=8)
                metrics = requests.get(f"{server.url}/metrics", timeout=10)
                report[tag] = {"completion_tokens": completion["usage"]["completion_tokens"],
                               "text": completion["choices"][0]["text"],
                               "metrics_status": metrics.status_code,
                               "has_cache_config_info": "vllm:cache_config_info" in metrics.text,
                               "capacity": server.capacity().__dict__}
            report[tag]["exit_code"] = server.process.returncode
            report[tag]["stragglers"] = server.stragglers
        except Exception as exc:  # reported, not hidden: the JSON says what failed
            report[tag] = {"error": repr(exc)}
    (out / "cuda_check.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:4])
