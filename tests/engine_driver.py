"""Runs one offline vLLM engine in its own process and writes what it produced as JSON.

Tests start it with ``python tests/engine_driver.py SPEC.json OUT.json`` so every engine gets a
clean process and environment (vLLM's CPU engine always spawns; its children re-import __main__).
SPEC: {"llm": {LLM kwargs}, "prompts": [[token ids], ...], "max_tokens": N, "plugins_first": bool}
OUT:  {"tokens": [[...], ...], "logprobs": [[...], ...], "num_gpu_blocks": N, "metrics": {...},
       "impls": [attention impl class of each layer, as the worker built them],
       "model_class": "module:Class" of the model the worker built}
With "full_logits": V in SPEC (V = vocab size), the engine runs with logprobs_mode="raw_logits"
and OUT also holds the model's raw logits over the whole vocabulary:
      "prompt_logits": per prompt, [len - 1][V] (the next-token logits after each prefix but the
      last), "step_logits": per prompt, [max_tokens][V] (the logits each sampled token came from).
"""

from __future__ import annotations

import json
import sys


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    if spec.get("plugins_first"):
        from vllm.plugins import load_general_plugins

        load_general_plugins()
    # beside this file, on the workers' sys.path too
    from engine_probes import attention_impls, model_class
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    vocab = spec.get("full_logits")
    extra = {"logprobs_mode": "raw_logits", "max_logprobs": vocab} if vocab else {}
    llm = LLM(**spec["llm"], **extra)
    params = SamplingParams(
        temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True,
        logprobs=vocab or 0, prompt_logprobs=vocab or None,
    )
    prompts = [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    result = {
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "logprobs": [
            [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
            for o in outputs
        ],
        "impls": llm.apply_model(attention_impls)[0],
        "model_class": llm.apply_model(model_class)[0],
        "num_gpu_blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks,
        "metrics": {m.name: getattr(m, "value", None) for m in llm.get_metrics()},
    }
    if vocab:
        result["prompt_logits"] = [
            [_dense(lp, vocab) for lp in o.prompt_logprobs[1:]] for o in outputs
        ]
        result["step_logits"] = [
            [_dense(lp, vocab) for lp in o.outputs[0].logprobs] for o in outputs
        ]
    open(out_path, "w").write(json.dumps(result))


def _dense(position: dict, vocab: int) -> list[float]:
    """vLLM's {token: Logprob} of one position as a [vocab] list; every token must be present."""
    assert len(position) >= vocab, f"{len(position)} of {vocab} tokens returned"
    row = [0.0] * vocab
    for token, lp in position.items():
        row[token] = lp.logprob
    return row


if __name__ == "__main__":
    main(*sys.argv[1:3])
