"""Quality vs KV memory, per backend, through real vLLM: perplexity by context and passkey retrieval.

For each model and each configuration, one vLLM engine (own process) runs

* perplexity: held-out windows of 2k-16k tokens (``benchmarks/quality/fixtures/heldout.txt.xz``,
  never trained on), ``prompt_logprobs`` of every token, prefilled in chunks of
  ``--chunk`` tokens, so each chunk's queries attend to what the method kept of the past (one-shot
  prefill would attend exactly within the chunk and hide the compression). Reported per window
  length: the mean negative log-likelihood of the whole window and of its last quarter (where the
  most context is compressed), and its perplexity;
* passkey retrieval: ``benchmarks/quality/passkey.py``'s prompts (same builder; scored by :func:`retrieved`);
* the memory: vLLM's own start-up report (``Maximum concurrency for N tokens per request``),
  as a fraction of the dense configuration's KV per request at the longest window.

Configurations (``--configs``, comma-separated): ``dense`` (``--base``, vLLM's own exact attention;
KVFOLD_DENSE is tested identical to it), ``fp8`` (vLLM's own fp8 KV cache on ``--base``; on a CPU
vLLM needs AVX-512 or AMX for it), ``window<W>`` (vLLM's own sliding window of W tokens on ``--base``),
``treekv<B>`` (KVFOLD_TREEKV, budget B), ``vqkv`` (KVFOLD_VQKV), ``fourier`` (KVFOLD_FOURIER, the
paper's 4 sink + 1020 recent + 512 frequencies) and ``fourier-small`` (the same dims, 4 sink + 508
recent, 256 frequencies: compression from ~1k tokens). VQKV's codebooks and FourierAttention's dims
are calibrated on each model by ``kvfold calibrate`` (``CALIBRATE`` settings, stdlib text, which the
held-out windows are not part of) into ``--calibration-dir`` unless already there.

    python -m benchmarks.quality.suite --models benchmarks/quality/fixtures/rope,benchmarks/quality/fixtures/rope_pp \\
        --out docs/benchmarks/quality-fixtures-cpu
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.backends import sliding_window_overrides
from benchmarks.quality import corpus
from benchmarks.quality.passkey import build_prompt, first_number
from kvfold.serving import parse_capacity

HELDOUT = Path(__file__).resolve().parent / "fixtures" / "heldout.txt.xz"
DEFAULT_CONFIGS = "dense,window1024,window2048,treekv1024,treekv2048,vqkv,fourier,fourier-small"


# Calibration settings: VQKV sized for a CPU (the SmolLM2 runs in docs/quality.md used 16k tokens);
# FourierAttention's defaults are the paper's.
CALIBRATE = {
    "vqkv": ["--tokens", "32768", "--max-samples", "16384", "--iterations", "10"],
    "fourier": [],
}


def calibration(label: str, calibrated: Path) -> tuple[str, Path] | None:
    """``(method, directory)`` a configuration needs calibrated, or None."""
    if label == "vqkv":
        return "vqkv", calibrated / "vqkv_codebooks"
    if label.startswith("fourier"):
        return "fourier", calibrated / "fourier_dims"
    return None


def calibrate(model: Path, method: str, out: Path, extra: Sequence[str]) -> None:
    marker = out / ("vqkv.json" if method == "vqkv" else "fourier.json")
    if marker.is_file():
        return
    command = [sys.executable, "-m", "kvfold", "calibrate", method, str(model), "--out", str(out), *extra]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")


def config_kwargs(label: str, calibrated: Path, num_layers: int, base: str) -> dict[str, Any]:
    """``LLM(...)`` keyword arguments of configuration ``label`` (see the module doc); VQKV and
    FourierAttention read their calibration from under ``calibrated``."""
    if label == "dense":
        return {"attention_backend": base}
    if label == "fp8":
        return {"attention_backend": base, "kv_cache_dtype": "fp8"}
    if m := re.fullmatch(r"window(\d+)", label):
        overrides = sliding_window_overrides({"num_hidden_layers": num_layers}, int(m[1]))
        return {"attention_backend": base, "hf_overrides": overrides}
    if m := re.fullmatch(r"treekv(\d+)", label):
        return {"attention_backend": "KVFOLD_TREEKV", "additional_config": {"kvfold": {"budget": int(m[1])}}}
    if label == "vqkv":
        return {"attention_backend": "KVFOLD_VQKV",
                "additional_config": {"kvfold": {"codebooks": str(calibrated / "vqkv_codebooks")}}}
    if label in ("fourier", "fourier-small"):
        options: dict[str, Any] = {"dims": str(calibrated / "fourier_dims")}
        if label == "fourier-small":
            options.update(sink=4, recent=508, freqs=256)
        return {"attention_backend": "KVFOLD_FOURIER", "additional_config": {"kvfold": options}}
    raise ValueError(f"unknown configuration {label!r} (known: {DEFAULT_CONFIGS}, window<W>, treekv<B>)")


def heldout_windows(lengths: Sequence[int], count: int, seed: int) -> dict[int, list[list[int]]]:
    """``count`` random held-out windows of each length, as byte-tokenizer ids."""
    lut = corpus.byte_token_ids()
    data = corpus.read(HELDOUT)
    rng = random.Random(seed)
    windows: dict[int, list[list[int]]] = {}
    for n in lengths:
        if n > len(data):
            raise ValueError(f"held-out text has {len(data)} tokens, fewer than a {n}-token window")
        starts = [rng.randrange(0, len(data) - n) for _ in range(count)]
        windows[n] = [[lut[b] for b in data[s:s + n]] for s in starts]
    return windows


def retrieved(text: str, key: int) -> bool:
    """The answer's first digits are the key. Byte-level fixtures have no end-of-number token and
    may run on ("604947" for 60494), which passkey.py's exact five-digit rule would count as a miss
    although the key was retrieved; a truncated or wrong key still fails."""
    return first_number(text)[:5] == str(key)


def nll_summary(per_token: Sequence[float]) -> dict[str, float]:
    """Mean NLL of a window's predicted tokens, overall and of its last quarter, and perplexities."""
    tail = per_token[len(per_token) * 3 // 4:]
    mean, tail_mean = sum(per_token) / len(per_token), sum(tail) / len(tail)
    return {"nll": mean, "nll_last_quarter": tail_mean, "perplexity": math.exp(tail_mean),
            "perplexity_all": math.exp(mean)}


def _engine_main(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.loads(Path(spec_path).read_text())
    engine = LLM(**spec["llm"])
    out: dict[str, Any] = {"perplexity": {}, "seconds": {}}
    started = time.perf_counter()
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    for n, windows in spec["windows"].items():
        results = engine.generate([TokensPrompt(prompt_token_ids=w) for w in windows], params, use_tqdm=True)
        nll = []
        for window, result in zip(windows, results):
            logprobs = result.prompt_logprobs
            nll.append([-logprobs[i][window[i]].logprob for i in range(1, len(window))])
        # Pooled over the windows (each has the same length, so this is the mean of their means).
        pooled = nll_summary([v for x in nll for v in x])
        pooled["nll_last_quarter"] = sum(nll_summary(x)["nll_last_quarter"] for x in nll) / len(nll)
        pooled["perplexity"] = math.exp(pooled["nll_last_quarter"])
        out["perplexity"][n] = {**pooled, "windows": [nll_summary(x) for x in nll]}
    out["seconds"]["perplexity"] = time.perf_counter() - started
    started = time.perf_counter()
    if spec["passkey"]:
        results = engine.generate([TokensPrompt(prompt_token_ids=p) for p in spec["passkey"]],
                                  SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=True)
        out["passkey_texts"] = [r.outputs[0].text for r in results]
    out["seconds"]["passkey"] = time.perf_counter() - started
    partial = Path(out_path).with_suffix(".partial")
    partial.write_text(json.dumps(out))
    partial.replace(out_path)  # whole or absent: run_engine trusts a results file that exists


def run_engine(llm: dict[str, Any], windows: dict[int, list[list[int]]], passkey: list[list[int]],
               workdir: Path, label: str, env: dict[str, str]) -> tuple[dict[str, Any], str]:
    spec, out, log = workdir / f"{label}.spec.json", workdir / f"{label}.out.json", workdir / f"{label}.log"
    spec.write_text(json.dumps({"llm": llm, "windows": {str(k): v for k, v in windows.items()},
                                "passkey": passkey}))
    with open(log, "w") as handle:
        rc = subprocess.run([sys.executable, "-m", "benchmarks.quality.suite", "--engine", str(spec), str(out)],
                            stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **env}).returncode
    text = log.read_text()
    if not out.is_file():
        raise RuntimeError(f"engine failed (exit {rc}): {text[-3000:]}")
    # The results file is written after the last request; an engine that then dies in its
    # teardown (seen once: "terminate called without an active exception") measured everything.
    return {**json.loads(out.read_text()), "exit_code": rc}, text


def capacity(log: str) -> dict[str, float]:
    report = parse_capacity(log)
    return {"kv_cache_tokens": report.tokens, "max_model_len": report.max_model_len,
            "max_concurrency": report.max_concurrency}


def evaluate_model(model: Path, configs: Sequence[str], lengths: Sequence[int], windows: int,
                   passkey_lengths: Sequence[int], depths: Sequence[float], trials: int, args: argparse.Namespace,
                   entry: dict[str, Any], save: Any) -> None:
    """Fill ``entry`` with every configuration's run of ``model``, calling ``save()`` after each."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    config = json.loads((model / "config.json").read_text())
    fixture = json.loads((model / "fixture.json").read_text()) if (model / "fixture.json").is_file() else {}
    tokenizer = AutoTokenizer.from_pretrained(model)
    rng = random.Random(args.seed)
    if args.passkey_models and model.name not in args.passkey_models.split(","):
        passkey_lengths = []
    cases = [(n, d, rng.randrange(10000, 100000)) for n in passkey_lengths for d in depths for _ in range(trials)]
    prompts = [build_prompt(tokenizer, n, d, key) for n, d, key in cases]
    texts = heldout_windows(lengths, windows, args.seed)
    max_len = max([*lengths, *(len(p) + 16 for p in prompts)]) + 1
    entry.update(trained_context=fixture.get("trained_context"), config=config)
    entry.setdefault("runs", {})
    entry.setdefault("calibration", {})
    calibrated = args.calibration_dir / model.name
    for label in configs:
        if needed := calibration(label, calibrated):
            extra = args.calibrate_args.get(needed[0], CALIBRATE[needed[0]])
            calibrate(model, *needed, extra)
            entry["calibration"][needed[0]] = {"dir": str(needed[1]), "args": extra}
    with tempfile.TemporaryDirectory() as tmp:
        for label in tqdm(configs, desc=model.name, unit="config"):
            if "perplexity" in entry["runs"].get(label, {}):
                continue  # measured by the run --resume continues
            llm = {"model": str(model), "max_model_len": max_len, "enforce_eager": True, "dtype": args.dtype,
                   "enable_prefix_caching": False, "max_num_batched_tokens": args.chunk,
                   "enable_chunked_prefill": True, "max_num_seqs": args.max_num_seqs,
                   **config_kwargs(label, calibrated, config["num_hidden_layers"], args.base)}
            try:
                out, log = run_engine(llm, texts, prompts, Path(tmp), label,
                                      {"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1",
                                       "VLLM_CPU_KVCACHE_SPACE": str(args.kv_space_gib)})
            except RuntimeError as exc:
                entry["runs"][label] = {"error": str(exc)[-3000:]}
                tqdm.write(f"{model.name} {label}: failed")
                save()
                continue
            run: dict[str, Any] = {"kind": "baseline" if label in ("dense", "fp8") or label.startswith("window")
                                   else "kvfold", "llm": llm, **capacity(log),
                                   "perplexity": out["perplexity"], "seconds": out["seconds"],
                                   "engine_exit_code": out["exit_code"]}
            if cases:
                hits = [retrieved(t, key) for t, (_, _, key) in zip(out["passkey_texts"], cases)]
                run["passkey"] = {f"{n}@{d}": sum(h for h, c in zip(hits, cases) if c[:2] == (n, d)) / trials
                                  for n in passkey_lengths for d in depths}
                run["passkey_overall"] = sum(hits) / len(hits)
                run["passkey_answers"] = out["passkey_texts"]
            entry["runs"][label] = run
            dense = entry["runs"].get("dense", {})
            for r in entry["runs"].values():
                if "max_concurrency" in r and "max_concurrency" in dense:
                    r["kv_bytes_fraction"] = dense["max_concurrency"] / r["max_concurrency"]
            tqdm.write(f"{model.name} {label}: " + ", ".join(
                f"{n}: ppl {v['perplexity']:.3f}" for n, v in run["perplexity"].items())
                + (f"; passkey {run['passkey_overall']:.0%}" if cases else ""))
            save()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--engine"]:
        _engine_main(argv[1], argv[2])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", required=True, help="comma-separated model directories")
    p.add_argument("--configs", default=DEFAULT_CONFIGS)
    p.add_argument("--lengths", default="2048,4096,8192,16384", help="perplexity window lengths")
    p.add_argument("--windows", type=int, default=2, help="held-out windows per length")
    p.add_argument("--passkey-lengths", default="2048,4096,8192,16000")
    p.add_argument("--passkey-models", default="", help="model directory names that get the passkey "
                   "prompts (default: all)")
    p.add_argument("--depths", default="0.1,0.5,0.9")
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk (max_num_batched_tokens)")
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--base", default="CPU_ATTN", help="vLLM backend under the fp8 and window baselines")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kv-space-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calibration-dir", type=Path, default=Path(".kvfold-quality"),
                   help="VQKV codebooks and Fourier dims per model (reused when present)")
    p.add_argument("--calibrate-args", action="append", default=[], metavar="METHOD=ARGS",
                   help="replace CALIBRATE[METHOD]'s kvfold calibrate arguments, e.g. 'vqkv=--tokens 8192'")
    p.add_argument("--out", type=Path, required=True, help="OUT.json, OUT-perplexity.png, OUT-passkey.png")
    p.add_argument("--resume", action="store_true",
                   help="keep OUT.json's measured configurations, run the missing or failed ones")
    args = p.parse_args(argv)
    args.calibrate_args = {m: shlex.split(a) for m, _, a in (x.partition("=") for x in args.calibrate_args)}

    from benchmarks.quality import plots
    from benchmarks.quality.passkey import heat_map

    models = [Path(m) for m in args.models.split(",")]
    configs = args.configs.split(",")
    for label in configs:  # refuse a typo before any engine starts
        config_kwargs(label, args.calibration_dir, 1, args.base)
    lengths = [int(x) for x in args.lengths.split(",")]
    passkey_lengths = [int(x) for x in args.passkey_lengths.split(",")] if args.passkey_lengths else []
    depths = [float(x) for x in args.depths.split(",")]
    result: dict[str, Any] = {"kind": "quality", "command": [sys.executable, "-m", "benchmarks.quality.suite", *argv],
                              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "chunk": args.chunk,
                              "lengths": lengths, "passkey_lengths": passkey_lengths, "depths": depths,
                              "trials": args.trials, "windows": args.windows, "dtype": args.dtype, "seed": args.seed,
                              "models": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        done = {m: e for m, e in result["models"].items()
                if any("perplexity" in r for r in e.get("runs", {}).values())}
        if done:
            plots.perplexity({**result, "models": done}, args.out.parent / f"{args.out.name}-perplexity.png")
        for name, entry in done.items():
            ran = {label: {"accuracy": r["passkey"]} for label, r in entry["runs"].items() if "passkey" in r}
            if ran:
                heat_map({"backends": ran, "lengths": passkey_lengths, "depths": depths, "model_name": name},
                         args.out.parent / f"{args.out.name}-passkey-{name}.png")

    if args.resume and args.out.with_suffix(".json").is_file():
        previous = json.loads(args.out.with_suffix(".json").read_text())
        same = ("lengths", "passkey_lengths", "depths", "trials", "windows", "chunk", "dtype", "seed")
        if any(previous.get(k) != result[k] for k in same):
            raise SystemExit(f"--resume: {args.out}.json was measured with other {'/'.join(same)}")
        result["models"] = previous["models"]
    for model in models:
        result["models"].setdefault(model.name, {})
        evaluate_model(model, configs, lengths, args.windows, passkey_lengths, depths, args.trials, args,
                       result["models"][model.name], save)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
