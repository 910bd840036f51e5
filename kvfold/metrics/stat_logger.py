"""``vllm.stat_logger_plugins`` entry point: the API-process half of the ``kvfold:*`` metrics.

vLLM builds one :class:`KvfoldStatLogger` per engine in the API server (``vllm serve``/``AsyncLLM``
only; offline ``LLM`` loads no stat-logger plugins). Its gauges are registered in the process's
default prometheus-client registry, which vLLM's ``/metrics`` serves, directly or through the
multiprocess files. When the engine runs no kvfold backend the logger publishes nothing.

Installing kvfold makes vLLM build its stats pipeline even with ``--disable-log-stats`` (vLLM forces
stats on when any custom stat logger is present); that is vLLM's behaviour, not a kvfold choice.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from prometheus_client import Gauge
from vllm.v1.metrics.loggers import StatLoggerBase

from kvfold.metrics import names

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = logging.getLogger("vllm.kvfold.metrics")


@lru_cache(maxsize=None)  # several engines share the process's registry
def _gauge(family: names.MetricFamily) -> Gauge:
    # mostrecent: these are configuration facts; with several API servers every one reports the same.
    return Gauge(family.name, family.help, family.labels, multiprocess_mode="mostrecent")


def selected_backend(vllm_config: VllmConfig) -> str | None:
    """The kvfold backend this engine runs (also through ``CUSTOM``), or None."""
    from kvfold.attention_backends import BACKENDS
    from kvfold.attention_backends.selection import method_for, owns_custom

    backend = vllm_config.attention_config.backend
    selected = backend.name if backend is not None else None
    if selected in BACKENDS or (selected == "CUSTOM" and owns_custom()):
        return method_for(selected, vllm_config.additional_config)
    return None


class KvfoldStatLogger(StatLoggerBase):
    def __init__(self, vllm_config: VllmConfig, engine_index: int = 0) -> None:
        self.vllm_config = vllm_config
        self.backend = selected_backend(vllm_config)
        self.labels = {"model_name": names.served_model_name(vllm_config), "backend": self.backend}
        self.published = False
        if self.backend is not None and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            logger.warning(
                "PROMETHEUS_MULTIPROC_DIR is not set: kvfold's worker-side metrics (%s) will not "
                "appear on /metrics. `kvfold serve` sets it; with `vllm serve`, set it to an empty "
                "directory before start-up.",
                ", ".join(f.series for f in names.FAMILIES if f.process == "worker"),
            )

    def _publish(self) -> None:
        if self.backend is None or self.published:
            return
        from kvfold.attention_backends.selection import backend_class
        from kvfold.metrics.kv_accounting import kv_accounting

        kv = kv_accounting(backend_class(self.backend), self.vllm_config)
        _gauge(names.KV_BYTES_PER_TOKEN).labels(**self.labels).set(kv.kv_bytes_per_token)
        _gauge(names.KV_BYTES_PER_TOKEN_BF16).labels(**self.labels).set(kv.bf16_bytes_per_token)
        _gauge(names.COMPRESSION_RATIO).labels(**self.labels).set(kv.compression_ratio)
        if kv.capacity_tokens is not None:
            _gauge(names.KV_CAPACITY_TOKENS).labels(**self.labels).set(kv.capacity_tokens)
            # Only final once the engine reported its allocation; until then try again.
            self.published = True

    def log_engine_initialized(self) -> None:
        self._publish()

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        # Scheduler and iteration stats are vLLM's own vllm:* series already; kvfold adds nothing
        # per step. The call only serves as a late hook should the engine report its cache late.
        self._publish()
