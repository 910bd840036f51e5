"""Passkey retrieval through real vLLM, per attention backend: what compression costs on a real model.

A five-digit passkey sits at a chosen depth of filler text (the usual "grass is green" haystack of
the passkey literature); the model is asked for it at the end; greedy decoding; a trial passes when
the first five-digit number of the answer is the key. Each backend runs in its own vLLM engine
(spawned process, CPU or GPU) over the same prompts, and the result JSON and a heat map (accuracy by
length and depth, one panel per backend) go to ``--out``.

    python -m benchmarks.quality.passkey --model SMOLLM2_DIR --backends KVFOLD_DENSE,KVFOLD_TREEKV \\
        --lengths 1024,2048,4096 --depths 0.1,0.5,0.9 --trials 2 --out docs/benchmarks/passkey-smollm2

SmolLM2-135M-Instruct (``kvfold.fixtures.smollm2``) is the model available offline here. A backend
spec is a name, optionally with kvfold options: ``KVFOLD_TREEKV:{"budget":512}``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
INTRO = ("There is an important pass key hidden inside a lot of irrelevant text. Find it "
         "and memorize it. I will quiz you about the pass key.\n")
QUESTION = "What is the pass key? The pass key is"


def needle(key: int) -> str:
    return f" The pass key is {key}. Remember it. {key} is the pass key. "


def build_prompt(tokenizer: Any, length: int, depth: float, key: int,
                 hay: Sequence[int] | None = None) -> list[int]:
    """Token ids of a prompt of about ``length`` tokens with the key at ``depth`` (0 = start).

    The haystack is FILLER repeated, or the first tokens of ``hay`` (the fixtures' training mix
    also uses real text).
    """
    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False).input_ids)

    intro, pin, question = ids(INTRO), ids(needle(key)), ids("\n" + QUESTION)
    room = length - len(intro) - len(pin) - len(question)
    if room <= 0:
        raise ValueError(f"length {length} leaves no room for filler")
    if hay is None:
        filler = ids(FILLER)
        hay = filler * (room // len(filler) + 1)
    hay = list(hay[:room])
    if len(hay) < room:
        raise ValueError(f"{len(hay)} haystack tokens for {room} places")
    at = int(round(depth * room))
    return intro + hay[:at] + pin + hay[at:] + question


def first_number(text: str) -> str:
    """The first run of digits in ``text`` ("" if none)."""
    digits = ""
    for ch in text:
        if ch.isdigit():
            digits += ch
        elif digits:
            break
    return digits


def answer_key(text: str) -> int | None:
    digits = first_number(text)
    return int(digits) if len(digits) == 5 else None


def parse_backend(spec: str) -> tuple[str, dict]:
    name, _, options = spec.partition(":")
    return name, json.loads(options) if options else {}


def run_backend(model: Path, name: str, options: dict, prompts: list[list[int]], max_len: int,
                extra: dict, workdir: Path) -> dict:
    """Greedy answers of one backend, in a spawned engine (``_engine_main``)."""
    llm = {"model": str(model), "max_model_len": max_len, "enforce_eager": True,
           "enable_prefix_caching": False, **extra}
    if name != "default":
        llm["attention_backend"] = name
    if options:
        llm["additional_config"] = {"kvfold": options}
    spec, out = workdir / f"{name}.spec.json", workdir / f"{name}.out.json"
    spec.write_text(json.dumps({"llm": llm, "prompts": prompts}))
    log = workdir / f"{name}.log"
    with open(log, "w") as handle:
        rc = subprocess.run([sys.executable, "-m", "benchmarks.quality.passkey", "--engine", str(spec), str(out)],
                            stdout=handle, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"{name}: engine failed (exit {rc}); see {log}")
    return json.loads(out.read_text())


def _engine_main(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.loads(Path(spec_path).read_text())
    engine = LLM(**spec["llm"])
    params = SamplingParams(temperature=0.0, max_tokens=12)
    started = time.perf_counter()
    outputs = engine.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params, use_tqdm=True)
    Path(out_path).write_text(json.dumps({
        "texts": [o.outputs[0].text for o in outputs],
        "seconds": time.perf_counter() - started,
        "kv_cache_tokens": engine.llm_engine.vllm_config.cache_config.kv_cache_size_tokens,
    }))


def heat_map(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = list(result["backends"])
    lengths, depths = result["lengths"], result["depths"]
    fig, axes = plt.subplots(1, len(backends), figsize=(3.2 * len(backends), 3), squeeze=False)
    for ax, name in zip(axes[0], backends):
        grid = [[result["backends"][name]["accuracy"][f"{n}@{d}"] for n in lengths] for d in depths]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("prompt tokens")
        ax.set_title("\n".join(textwrap.wrap(name, 36)), fontsize=7)  # labels carry their options
        for i in range(len(depths)):
            for j in range(len(lengths)):
                ax.text(j, i, f"{grid[i][j]:.0%}", ha="center", va="center", fontsize=7)
    axes[0][0].set_ylabel("passkey depth")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(f"passkey retrieval, {result['model_name']}", fontsize=9, y=1.08)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def save(result: dict, out: Path) -> None:
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    done = {k: v for k, v in result["backends"].items() if "accuracy" in v}
    if done:
        heat_map({**result, "backends": done}, out.with_suffix(".png"))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--engine"]:
        _engine_main(argv[1], argv[2])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--backends", default="KVFOLD_DENSE", help="';'-separated NAME[:JSON options]")
    p.add_argument("--lengths", default="1024,2048,4096")
    p.add_argument("--depths", default="0.1,0.5,0.9")
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", type=Path, required=True, help="OUT.json and OUT.png are written")
    args = p.parse_args(argv)
    from tqdm import tqdm
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    rng = random.Random(args.seed)
    cases = [(n, d, rng.randrange(10000, 100000)) for n in lengths for d in depths for _ in range(args.trials)]
    prompts = [build_prompt(tokenizer, n, d, key) for n, d, key in cases]
    max_len = max(map(len, prompts)) + 32
    result: dict[str, Any] = {"kind": "passkey", "model": str(args.model), "model_name": args.model.name,
                              "lengths": lengths, "depths": depths, "trials": args.trials,
                              "dtype": args.dtype, "backends": {}}
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for spec in tqdm(args.backends.split(";"), desc="backends"):
            name, options = parse_backend(spec)
            label = name + (json.dumps(options, separators=(",", ":")) if options else "")
            try:
                run = run_backend(args.model, name, options, prompts, max_len, {"dtype": args.dtype}, Path(tmp))
            except RuntimeError as exc:
                log = Path(tmp) / f"{name}.log"
                result["backends"][label] = {"error": str(exc), "log_tail": log.read_text()[-3000:]}
                tqdm.write(f"{label}: failed")
            else:
                hits = [answer_key(text) == key for text, (_, _, key) in zip(run["texts"], cases)]
                accuracy = {f"{n}@{d}": sum(h for h, c in zip(hits, cases) if c[:2] == (n, d)) / args.trials
                            for n in lengths for d in depths}
                result["backends"][label] = {"accuracy": accuracy, "overall": sum(hits) / len(hits),
                                             "answers": run["texts"], "seconds": run["seconds"],
                                             "kv_cache_tokens": run["kv_cache_tokens"]}
                tqdm.write(f"{label}: {sum(hits)}/{len(hits)} correct")
            save(result, args.out)  # after every backend: a run cut short keeps what it measured
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
