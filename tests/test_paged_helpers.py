"""Small shared pieces of the paged backends that run the same on CPU as on CUDA."""

import pytest
import torch

from kvfold.attention_backends.paged.counts import DeferredCount
from kvfold.attention_backends.paged.graphs import bucket
from kvfold.attention_backends.paged.metadata import to_device


def test_deferred_count_returns_each_count_once() -> None:
    counts = DeferredCount()
    counts.add(torch.tensor(3))
    counts.add(torch.tensor([4]).sum())
    assert counts.take() == 7
    assert counts.take() == 0
    counts.add(torch.tensor(0))
    counts.add(torch.tensor(5))
    assert counts.take() == 5


def test_buckets_are_vllm_capture_sizes() -> None:
    assert [bucket(n) for n in (1, 2, 3, 5, 8, 9, 16, 17)] == [1, 2, 4, 8, 8, 16, 16, 24]


def test_to_device_copies_values() -> None:
    host = torch.arange(5)
    moved = to_device(host, torch.device("cpu"))
    assert torch.equal(moved, host)


def test_invariants_are_checked_on_cpu_and_on_request_on_cuda(monkeypatch) -> None:
    from kvfold.attention_backends.paged.counts import check_invariants

    monkeypatch.delenv("KVFOLD_CHECK_INVARIANTS", raising=False)
    assert check_invariants(torch.device("cpu"))
    assert not check_invariants(torch.device("cuda"))
    monkeypatch.setenv("KVFOLD_CHECK_INVARIANTS", "1")
    assert check_invariants(torch.device("cuda"))


def test_graph_memory_is_booked_up_to_its_limit(monkeypatch) -> None:
    from kvfold.attention_backends.paged import graphs

    monkeypatch.setattr(graphs, "_held_bytes", 0)
    monkeypatch.setattr(graphs, "_cap_reported", False)
    monkeypatch.setenv("KVFOLD_CUDA_GRAPH_MEMORY_MB", "1")
    step = graphs.GraphedStep(lambda x: (x,))
    assert graphs.tensor_bytes([torch.zeros(4, 8), torch.zeros(3, dtype=torch.int64)]) == 4 * 8 * 4 + 3 * 8
    assert step._affordable(600_000) and graphs._held_bytes == 600_000
    assert not step._affordable(600_000) and graphs._held_bytes == 600_000  # over 1 MiB: eager
    assert step._affordable(400_000) and graphs._held_bytes == 1_000_000
    x = torch.arange(3.0)
    assert step("key", x)[0] is x  # on CPU the step runs as is


def test_a_bad_graph_memory_limit_is_refused_at_construction(monkeypatch) -> None:
    from kvfold.attention_backends.paged import graphs

    for raw in ("lots", "-5"):
        monkeypatch.setenv("KVFOLD_CUDA_GRAPH_MEMORY_MB", raw)
        with pytest.raises(ValueError, match="KVFOLD_CUDA_GRAPH_MEMORY_MB"):
            graphs.GraphedStep(lambda x: (x,))
