"""Result files of ``benchmarks/serving.py``: their schema, vLLM's numbers in it, ratios, saving.

Everything a run measures lands in one JSON document (:class:`ServingRun`), rewritten after every
server start and every workload, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from benchmarks.workloads import Workload

Status = Literal["ok", "failed", "timeout", "skipped"]

# vLLM's result JSON keys copied into each workload result (``vllm bench serve --save-result``;
# percentiles as asked by ``--metric-percentiles``). Latencies are in milliseconds.
VLLM_RESULT_KEYS = [
    "completed", "failed", "duration", "total_input_tokens", "total_output_tokens",
    "request_throughput", "output_throughput", "total_token_throughput",
    "max_output_tokens_per_s", "max_concurrent_requests",
    *[f"{stat}_{metric}_ms" for metric in ("ttft", "tpot", "itl", "e2el")
      for stat in ("mean", "median", "std", "p50", "p90", "p99")],
]
# Compared with the reference backend: higher is better for the first group, lower for the rest.
RATIO_KEYS = ["output_throughput", "request_throughput", "total_token_throughput",
              "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms",
              "p99_tpot_ms", "mean_itl_ms", "p99_itl_ms"]


class Capacity(BaseModel):
    """vLLM's start-up line: ``KV cache size: N tokens, Maximum concurrency for L tokens ...: Cx``."""

    kv_tokens: int
    max_model_len: int
    max_concurrency: float


# vLLM admits a waiting request only when its blocks fit, so a KV-bound server sits just below full.
KV_BOUND_USAGE = 0.9


class ServerStats(BaseModel):
    """What the server's own ``/metrics`` showed during one workload (polled about once a second).

    ``max_running`` is the most requests vLLM ran at once (its admission under the KV budget);
    counters are differences between the first and last poll; ``output_tok_per_s`` divides the
    generated tokens by ``busy_s``, the span from the first poll that saw prompt tokens counted to
    the last that saw generated tokens counted (about a second of resolution at each end).
    """

    polls: int = 0
    wall_s: float = 0.0
    busy_s: float | None = None
    max_running: float | None = None
    max_waiting: float | None = None
    max_kv_cache_usage: float | None = None
    generation_tokens: float | None = None
    prompt_tokens: float | None = None
    requests_succeeded: float | None = None
    preemptions: float | None = None
    output_tok_per_s: float | None = None
    kvfold: dict[str, float] = Field(default_factory=dict)

    def kv_bound(self) -> bool | None:
        """Whether the KV cache limited admission during the workload: vLLM preempted a request, or
        its KV use reached :data:`KV_BOUND_USAGE` while requests waited. None when not polled.

        A workload meant to compare capacities says nothing about them when the reference backend was
        not KV-bound (long prompts in small chunks are prefill-bound: few requests get past prefill
        before the first ones finish)."""
        if self.max_kv_cache_usage is None:
            return None
        if self.preemptions:
            return True
        return self.max_kv_cache_usage >= KV_BOUND_USAGE and bool(self.max_waiting)


class WorkloadResult(BaseModel):
    workload: Workload
    status: Status
    reason: str | None = None
    wall_s: float | None = None
    bench_log: str | None = None
    bench_json: str | None = None
    vllm: dict[str, float | int | None] = Field(default_factory=dict)
    server: ServerStats | None = None


class BackendResult(BaseModel):
    name: str
    server_args: list[str]
    status: Status
    reason: str | None = None
    startup_s: float | None = None
    start_attempts: int = 0
    capacity: Capacity | None = None
    backend_log_lines: list[str] = Field(default_factory=list)
    # vLLM's periodic throughput lines and kvfold's warnings while it served (read when it stopped):
    # a served step's speed and running count from the server's side, and e.g. a CUDA-graph cap hit.
    runtime_log_lines: list[str] = Field(default_factory=list)
    server_log: str | None = None
    exit_code: int | None = None
    stragglers: list[int] = Field(default_factory=list)
    gpu_memory_after_stop_mib: float | None = None
    workloads: dict[str, WorkloadResult] = Field(default_factory=dict)


class ServingRun(BaseModel):
    kind: Literal["serving"] = "serving"
    model: str
    model_dir: str
    date: str
    command: list[str]
    environment: dict[str, Any] = Field(default_factory=dict)
    common_server_args: list[str] = Field(default_factory=list)
    reference: str
    time_budget_s: float | None = None
    elapsed_s: float = 0.0
    interrupted: str | None = None
    warmup: dict[str, Any] | None = None
    backends: dict[str, BackendResult] = Field(default_factory=dict)
    ratios: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # Earlier commands whose backends this file also holds (``serving.py --append``).
    earlier_parts: list[dict[str, Any]] = Field(default_factory=list)


def vllm_metrics(result: dict[str, Any]) -> dict[str, float | int | None]:
    """The numbers kept from one ``vllm bench serve`` result JSON (missing keys are left out)."""
    return {key: result[key] for key in VLLM_RESULT_KEYS if key in result}


def _ratio(value: Any, reference: Any) -> float | None:
    if not isinstance(value, (int, float)) or not isinstance(reference, (int, float)) or not reference:
        return None
    return value / reference


def ratios(run: ServingRun) -> dict[str, dict[str, Any]]:
    """Each backend's numbers divided by the reference backend's, both measured in ``run``.

    ``{"KVFOLD_TREEKV_2048": {"kv_tokens": 8.1, "max_concurrency": 8.1,
    "workloads": {"long": {"output_throughput": 1.9, ...}}}}``; None where either side is missing.
    """
    ref = run.backends.get(run.reference)
    if ref is None:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for name, backend in run.backends.items():
        entry: dict[str, Any] = {
            "kv_tokens": _ratio(backend.capacity and backend.capacity.kv_tokens,
                                ref.capacity and ref.capacity.kv_tokens),
            "max_concurrency": _ratio(backend.capacity and backend.capacity.max_concurrency,
                                      ref.capacity and ref.capacity.max_concurrency),
            "workloads": {},
        }
        for wl_name, wl in backend.workloads.items():
            ref_wl = ref.workloads.get(wl_name)
            if wl.status != "ok" or ref_wl is None or ref_wl.status != "ok":
                continue
            per = {key: _ratio(wl.vllm.get(key), ref_wl.vllm.get(key)) for key in RATIO_KEYS}
            if wl.server and ref_wl.server:
                per["max_running"] = _ratio(wl.server.max_running, ref_wl.server.max_running)
            entry["workloads"][wl_name] = per
        out[name] = entry
    return out


def append_to(earlier: ServingRun, run: ServingRun) -> ServingRun:
    """``run`` holding ``earlier``'s backends too (``run``'s own win on a name clash).

    For a comparison split over several device commands on one machine (each under the command
    limit): ratios stay "against a baseline measured in the same run" only if model, server
    arguments, reference and device are the same, so anything else is refused."""
    for what in ("model", "common_server_args", "reference"):
        if getattr(earlier, what) != getattr(run, what):
            raise ValueError(f"cannot append: {what} differs ({getattr(earlier, what)!r} vs "
                             f"{getattr(run, what)!r})")
    devices = (earlier.environment.get("device"), run.environment.get("device"))
    if devices[0] != devices[1]:
        raise ValueError(f"cannot append: device differs {devices}")
    part = {k: getattr(earlier, k) for k in ("date", "command", "elapsed_s", "interrupted", "warmup")}
    merged = run.model_copy(deep=True)
    merged.earlier_parts = [*earlier.earlier_parts, part]
    merged.backends = {**earlier.backends, **run.backends}
    return merged


def save(run: ServingRun, path: str | Path) -> None:
    """Recompute the ratios and write ``run`` atomically (a reader never sees half a file)."""
    run.ratios = ratios(run)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(run.model_dump_json(indent=2) + "\n")
    os.replace(tmp, path)


def load(path: str | Path) -> ServingRun:
    return ServingRun.model_validate(json.loads(Path(path).read_text()))
