"""Runs one offline vLLM engine in its own process and writes what it produced as JSON.

Tests start it with ``python tests/engine_driver.py SPEC.json OUT.json`` so every engine gets a
clean process and environment (vLLM's CPU engine always spawns; its children re-import __main__).
``python tests/engine_driver.py --serve`` (tests/conftest.py) does the same for a series of specs
without paying the API process's vLLM import (~15 s of CPU) for each: it imports what main()
imports once, then forks one child per spec, which runs main() and exits as the single-spec driver
would (engine shut down at interpreter exit). A child starts from the state the imports left,
before any LLM, plugin or engine existed, so conftest sends only specs whose environment is the
one the server started with.
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
import os
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


def serve() -> None:
    """Reads ``[spec_path, out_path, stdout_path, stderr_path, current_test]`` JSON lines on
    stdin (current_test: pytest's PYTEST_CURRENT_TEST, or null); per line,
    forks a child that runs main() with its output in the two files, answers ``{"pid": P}`` at
    once and ``{"returncode": R}`` when the child has exited (its engine shut down)."""
    # What main() imports before it builds the LLM (the imports alone start no engine or plugin).
    import engine_probes  # noqa: F401
    import vllm  # noqa: F401
    from vllm import LLM, SamplingParams  # noqa: F401
    from vllm.inputs import TokensPrompt  # noqa: F401

    answers = os.fdopen(os.dup(1), "w")
    _redirect(1, os.devnull, os.O_WRONLY)  # the protocol channel is `answers` only
    for line in sys.stdin:
        spec_path, out_path, stdout_path, stderr_path, current_test = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.setpgid(0, 0)  # the engine's processes join the child's group: a timeout kills all
            answers.close()
            _redirect(0, os.devnull, os.O_RDONLY)
            _redirect(1, stdout_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            _redirect(2, stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            sys.argv = [sys.argv[0], spec_path, out_path]
            os.environ.pop("PYTEST_CURRENT_TEST", None)
            if current_test is not None:
                os.environ["PYTEST_CURRENT_TEST"] = current_test
            main(spec_path, out_path)  # an exception exits with a traceback and status 1
            sys.exit(0)  # interpreter exit: vLLM's finalizers shut the engine down
        answers.write(json.dumps({"pid": pid}) + "\n")
        answers.flush()
        _, status = os.waitpid(pid, 0)
        answers.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        answers.flush()


def _redirect(fd: int, path: str, flags: int) -> None:
    opened = os.open(path, flags, 0o644)
    os.dup2(opened, fd)
    os.close(opened)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        main(*sys.argv[1:3])
