"""Poll a vLLM server's Prometheus ``/metrics`` while a benchmark runs.

vLLM's benchmark client only writes its result when every request has finished; the server's own
counters give a throughput and the peak number of running requests even for a run that is cut
short, and ``vllm:num_requests_running`` is the concurrency the server actually admitted (the
client's "max concurrent requests" also counts requests still waiting in the server's queue).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable

import requests
from typing_extensions import Self

from benchmarks.results import ServerStats

GAUGES = {
    "vllm:num_requests_running": "max_running",
    "vllm:num_requests_waiting": "max_waiting",
    "vllm:kv_cache_usage_perc": "max_kv_cache_usage",
}
COUNTERS = {
    "vllm:generation_tokens_total": "generation_tokens",
    "vllm:prompt_tokens_total": "prompt_tokens",
    "vllm:request_success_total": "requests_succeeded",
    "vllm:num_preemptions_total": "preemptions",
}


def parse(text: str) -> dict[str, float]:
    """Prometheus text -> {sample name: value summed over its label sets}."""
    values: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_and_labels, _, rest = line.rpartition("}") if "}" in line else ("", "", line)
        if name_and_labels:
            name = name_and_labels.split("{", 1)[0]
            value = rest.split()[0]
        else:
            name, value = line.split()[:2]
        try:
            values[name] += float(value)
        except ValueError:
            continue
    return dict(values)


class MetricsPoller:
    """``with MetricsPoller(url) as poller: ...; stats = poller.stats()``; polls in a thread."""

    def __init__(self, url: str, interval: float = 1.0,
                 on_poll: Callable[[dict[str, float]], None] | None = None) -> None:
        self.url = url.rstrip("/") + "/metrics"
        self.interval = interval
        self.on_poll = on_poll
        self.first: dict[str, float] | None = None
        self.last: dict[str, float] | None = None
        self.first_t = self.last_t = 0.0
        self.maxima: dict[str, float] = {}
        self.polls = 0
        # The busy span: from the first poll that saw prompt tokens counted to the last one that
        # saw generated tokens counted (the client spends its first seconds building prompts).
        self.busy_from: float | None = None
        self.busy_to: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self.poll()  # the baseline, before the benchmark sends anything
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.poll()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        try:
            sample = parse(requests.get(self.url, timeout=5).text)
        except requests.RequestException:
            return
        now = time.monotonic()
        if self.first is None:
            self.first, self.first_t = sample, now
        gen = "vllm:generation_tokens_total"
        prompt = "vllm:prompt_tokens_total"
        if self.busy_from is None and sample.get(prompt, 0.0) > self.first.get(prompt, 0.0):
            self.busy_from = now
        if self.last is not None and sample.get(gen, 0.0) > self.last.get(gen, 0.0):
            self.busy_to = now
        self.last, self.last_t = sample, now
        self.polls += 1
        for name in GAUGES:
            if name in sample:
                self.maxima[name] = max(self.maxima.get(name, sample[name]), sample[name])
        if self.on_poll is not None:
            self.on_poll(sample)

    def stats(self) -> ServerStats:
        stats = ServerStats(polls=self.polls, wall_s=round(self.last_t - self.first_t, 3))
        for name, field in GAUGES.items():
            setattr(stats, field, self.maxima.get(name))
        if self.first is not None and self.last is not None:
            for name, field in COUNTERS.items():
                if name in self.last:
                    setattr(stats, field, self.last[name] - self.first.get(name, 0.0))
            if self.busy_from is not None and self.busy_to is not None:
                stats.busy_s = round(self.busy_to - self.busy_from, 3)
                if stats.generation_tokens and stats.busy_s > 0:
                    stats.output_tok_per_s = stats.generation_tokens / stats.busy_s
            stats.kvfold = {k: v for k, v in self.last.items() if k.startswith("kvfold:")}
        return stats
