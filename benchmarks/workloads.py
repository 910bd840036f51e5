"""Serving workloads: vLLM's random dataset at fixed prompt/output lengths (``vllm bench serve``)."""

from __future__ import annotations

import math

from pydantic import BaseModel, Field


class Workload(BaseModel):
    """One ``vllm bench serve`` run: ``num_prompts`` random prompts sent at once (request rate inf).

    ``max_concurrency`` None lets the server's own admission (its KV capacity and ``--max-num-seqs``)
    bound the number of running requests, which is the point of comparing KV footprints.
    ``range_ratio`` > 0 draws lengths uniformly in ``len * [1 - r, 1 + r]`` (vLLM's random dataset).
    """

    input_len: int = Field(gt=0)
    output_len: int = Field(gt=0)
    num_prompts: int = Field(gt=0)
    max_concurrency: int | None = Field(None, gt=0)
    input_range_ratio: float = Field(0.0, ge=0, lt=1)
    output_range_ratio: float = Field(0.0, ge=0, lt=1)

    def longest_request(self) -> int:
        """Upper bound of prompt + output tokens, to check against ``--max-model-len``."""
        return math.ceil(self.input_len * (1 + self.input_range_ratio)) + math.ceil(
            self.output_len * (1 + self.output_range_ratio)
        )

    def scaled(self, factor: float) -> Workload:
        return Workload(**{**self.model_dump(), "num_prompts": max(1, round(self.num_prompts * factor))})

    def bench_args(self) -> list[str]:
        args = [
            "--dataset-name", "random",
            "--random-input-len", str(self.input_len),
            "--random-output-len", str(self.output_len),
            "--num-prompts", str(self.num_prompts),
        ]
        if self.input_range_ratio or self.output_range_ratio:
            ratio = f'{{"input": {self.input_range_ratio}, "output": {self.output_range_ratio}}}'
            args += ["--random-range-ratio", ratio]
        else:
            args += ["--random-range-ratio", "0"]
        if self.max_concurrency is not None:
            args += ["--max-concurrency", str(self.max_concurrency)]
        return args


# 32,000-token prompts leave room for 512 output tokens (and the random dataset's occasional extra
# token or two after re-encoding) inside the default --max-model-len 32768.
DEFAULT_WORKLOADS: dict[str, Workload] = {
    # Long prompts, short answers: prefill-heavy; how many 32k requests fit at once.
    "long": Workload(input_len=32000, output_len=128, num_prompts=64),
    # Long prompts, longer answers: decode at the concurrency each KV footprint allows.
    "long_decode": Workload(input_len=32000, output_len=512, num_prompts=32),
    # Prompts of 1.6k-30.4k tokens, answers of 128-384 tokens.
    "mixed": Workload(input_len=16000, output_len=256, num_prompts=64,
                      input_range_ratio=0.9, output_range_ratio=0.5),
    # Many short requests: TreeKV evicts nothing below its budget; overheads show here.
    "short": Workload(input_len=512, output_len=128, num_prompts=512, max_concurrency=256),
}


def parse_workload(spec: str) -> tuple[str, Workload]:
    """``NAME:in=I,out=O,n=N[,conc=C][,in_ratio=R][,out_ratio=R]`` -> (NAME, Workload).

    Keys not given keep the built-in workload of that name's values (when there is one).
    """
    name, _, body = spec.partition(":")
    if not name or not body:
        raise ValueError(f"workload {spec!r}: expected NAME:in=I,out=O,n=N[,conc=C]")
    keys = {"in": "input_len", "out": "output_len", "n": "num_prompts", "conc": "max_concurrency",
            "in_ratio": "input_range_ratio", "out_ratio": "output_range_ratio"}
    values: dict[str, float | int] = {}
    for item in body.split(","):
        key, _, value = item.partition("=")
        if key not in keys:
            raise ValueError(f"workload {spec!r}: unknown key {key!r} (known: {', '.join(keys)})")
        values[keys[key]] = float(value) if "ratio" in key else int(value)
    base = DEFAULT_WORKLOADS.get(name)
    return name, Workload(**{**(base.model_dump() if base else {}), **values})
