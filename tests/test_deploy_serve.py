"""One real ``kvfold serve`` (KVFOLD_DENSE, CPU) and a real Prometheus scraping it on loopback.

The server is started once for the module: the ``/metrics`` checks, the Prometheus checks and the
dashboard check all look at the same process tree (API server, engine core, worker).
"""

from __future__ import annotations

import json
import re

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from kvfold.metrics import names
from kvfold.serving import Server
from deploy_tools import DASHBOARD, RULES, Prometheus, metric_names_in

pytestmark = pytest.mark.engine

ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
ARGS = ["--attention-backend", "KVFOLD_DENSE", "--max-model-len", "1024", "--enforce-eager",
        "--gpu-memory-utilization", "0.4", "--dtype", "float32", "--served-model-name", "tiny"]
PROMPTS = ["Paged attention, served by a plugin:", [5, 6, 7, 8, 9], "x" * 300]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def served(tiny_llama, tmp_path_factory):
    """The running server and the completions it answered (all traffic is sent up front)."""
    log = tmp_path_factory.mktemp("deploy-serve") / "serve.log"
    with Server(tiny_llama, ARGS, log, env=ENV) as server:
        completions = [server.complete(p, max_tokens=MAX_TOKENS) for p in PROMPTS]
        yield server, completions


@pytest.fixture(scope="module")
def scrape(served) -> dict[tuple[str, tuple], float]:
    """``/metrics`` after the traffic, parsed by prometheus-client: (sample name, labels) -> value."""
    server, _ = served
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


def kvfold_value(scrape: dict, family: names.MetricFamily, **extra: str) -> float:
    labels = tuple(sorted({"model_name": "tiny", "backend": "KVFOLD_DENSE", **extra}.items()))
    key = (family.series, labels)
    assert key in scrape, f"{family.series}{dict(labels)} not on /metrics"
    return scrape[key]


@pytest.fixture(scope="module")
def prometheus(served, tmp_path_factory):
    server, _ = served
    workdir = tmp_path_factory.mktemp("prometheus")
    with Prometheus(f"127.0.0.1:{server.port}", workdir, [RULES]) as prom:
        prom.wait_for('up{job="kvfold"} == 1')
        yield prom


def tiny_llama_bytes_per_token(model_dir, dtype_bytes: int) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    head_dim = config["head_dim"]
    return config["num_hidden_layers"] * config["num_key_value_heads"] * 2 * head_dim * dtype_bytes


def test_api_process_metrics_are_true(served, scrape, tiny_llama) -> None:
    server, _ = served
    float32 = tiny_llama_bytes_per_token(tiny_llama, 4)
    bf16 = tiny_llama_bytes_per_token(tiny_llama, 2)
    assert kvfold_value(scrape, names.KV_BYTES_PER_TOKEN) == float32
    assert kvfold_value(scrape, names.KV_BYTES_PER_TOKEN_BF16) == bf16
    # A float32 model with no compression stores twice the bf16 bytes: ratio 0.5, reported as is.
    assert kvfold_value(scrape, names.COMPRESSION_RATIO) == 0.5
    # The same capacity vLLM logs ("KV cache size: N tokens").
    assert kvfold_value(scrape, names.KV_CAPACITY_TOKENS) == server.capacity().tokens > 0


def test_worker_values_reach_the_api_servers_metrics(served, scrape) -> None:
    server, _ = served
    # Measured in the worker process from the cache tensors the layers attend over: exactly the
    # API process's bytes-per-token x capacity, i.e. the whole 1 GiB vLLM was given.
    cache_bytes = kvfold_value(scrape, names.KV_CACHE_BYTES)
    assert cache_bytes == (kvfold_value(scrape, names.KV_BYTES_PER_TOKEN)
                           * kvfold_value(scrape, names.KV_CAPACITY_TOKENS))
    assert cache_bytes == int(ENV["VLLM_CPU_KVCACHE_SPACE"]) * 2**30
    assert kvfold_value(scrape, names.STATE_BYTES) == 0  # DENSE holds no codebooks or bases
    assert kvfold_value(scrape, names.TOKENS_EVICTED) == 0  # DENSE never evicts
    assert not [k for k in scrape if k[0] == names.ERRORS.series]  # no backend raised
    worker_pids = {line.split("pid=")[1].split(")")[0] for line in server.log_text().splitlines()
                   if "Using KVFOLD_DENSE backend" in line}
    api_pids = {line.split("pid=")[1].split(")")[0] for line in server.log_text().splitlines()
                if line.startswith("(APIServer pid=")}
    assert worker_pids and api_pids and not worker_pids & api_pids  # really another process


def test_vllm_series_still_count_the_traffic(served, scrape) -> None:
    _, completions = served
    generated = sum(c["usage"]["completion_tokens"] for c in completions)
    prompt = sum(c["usage"]["prompt_tokens"] for c in completions)
    key = ("model_name", "tiny"), ("engine", "0")
    labels = tuple(sorted(key))
    assert scrape[("vllm:generation_tokens_total", labels)] == generated == MAX_TOKENS * len(PROMPTS)
    assert scrape[("vllm:prompt_tokens_total", labels)] == prompt
    assert scrape[("vllm:request_success_total",
                   tuple(sorted(key + (("finished_reason", "length"),))))] == len(PROMPTS)


def test_prometheus_scrapes_kvfold_and_vllm_series(served, prometheus) -> None:
    _, completions = served
    ratio = prometheus.wait_for('kvfold:compression_ratio{backend="KVFOLD_DENSE"}')
    assert len(ratio) == 1 and float(ratio[0]["value"][1]) == 0.5
    assert ratio[0]["metric"]["model_name"] == "tiny"
    cache = prometheus.wait_for("kvfold:kv_cache_bytes")
    assert float(cache[0]["value"][1]) == 2**30
    evicted = prometheus.wait_for("kvfold:tokens_evicted_total")
    assert float(evicted[0]["value"][1]) == 0
    generated = prometheus.wait_for('vllm:generation_tokens_total{model_name="tiny"}')
    assert float(generated[0]["value"][1]) == sum(c["usage"]["completion_tokens"] for c in completions)
    usage = prometheus.wait_for("vllm:kv_cache_usage_perc")
    assert 0 <= float(usage[0]["value"][1]) <= 1
    # A recording rule of deploy/prometheus/kvfold-rules.yaml, evaluated by this Prometheus on the
    # real series: capacity x usage (0 once the finished requests freed their blocks).
    in_use = prometheus.wait_for("model_name_backend:kvfold_kv_tokens_in_use:max", timeout=60)
    assert in_use[0]["metric"]["backend"] == "KVFOLD_DENSE"
    assert 0 <= float(in_use[0]["value"][1]) <= 2**30 / 2048
    # The worker-metrics-missing alert must not fire on a correctly configured server.
    assert not prometheus.query('ALERTS{alertname="KvfoldWorkerMetricsMissing"}')


def test_dashboard_references_only_metrics_that_exist(prometheus) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    referenced = {name for panel in dashboard["panels"] for target in panel.get("targets", [])
                  for name in metric_names_in(target["expr"])}
    for variable in dashboard["templating"]["list"]:
        # label_values(METRIC, LABEL): only the first argument is a metric
        match = re.match(r"label_values\((.+),\s*\w+\)$", variable.get("definition", ""))
        if match:
            referenced |= metric_names_in(match.group(1))
    assert {f.series for f in names.FAMILIES} & referenced, "dashboard shows no kvfold metric"
    assert {n for n in referenced if n.startswith("vllm:")}, "dashboard shows no vLLM metric"
    # Scraped from the real server, plus kvfold families that are absent until something happens
    # (errors) and the recording rules' outputs; histograms appear as _bucket/_sum/_count.
    recorded = {line.split("record:")[1].strip() for line in RULES.read_text().splitlines()
                if "record:" in line}
    known = prometheus.metric_names() | {f.series for f in names.FAMILIES} | recorded
    missing = sorted(referenced - known)
    assert not missing, f"dashboard queries metrics no server exports: {missing}"


def test_dashboard_renders_from_real_data(served, prometheus, tmp_path) -> None:
    """Every panel's PromQL answered by Prometheus over the live server, drawn and screenshotted."""
    import os
    import shutil
    import struct
    import sys
    import time

    sys.path.insert(0, str(DASHBOARD.parents[2] / "scripts"))
    from render_dashboard import render_html, screenshot

    server, _ = served
    start = time.time() - 5
    for i in range(6):  # traffic spread over ~10 s of 1 s scrapes, so the rates have slopes
        server.complete(f"request {i}: " + "y" * (40 * i), max_tokens=16)
        time.sleep(1.5)
    time.sleep(3)
    page, counts = render_html(prometheus.url, json.loads(DASHBOARD.read_text()), start,
                               time.time(), 1.0, "5s")
    empty = sorted(title for title, n in counts.items() if n == 0)
    # Only the errors panel is empty, because no backend raised (its series appear on the first).
    assert empty == ["kvfold backend errors / s"], counts
    out = tmp_path / "dashboard.png"
    screenshot(page, out)
    header = out.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", header[16:24])
    assert width > 1000 and height > 1000
    if os.environ.get("KVFOLD_DASHBOARD_PNG"):  # regenerate docs/images/dashboard.png
        shutil.copy(out, os.environ["KVFOLD_DASHBOARD_PNG"])
