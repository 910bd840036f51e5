"""Small shared pieces of the paged backends that run the same on CPU as on CUDA."""

import logging

import pytest
import torch

from kvfold.attention_backends.paged.counts import DeferredCount
from kvfold.attention_backends.paged.graphs import bucket
from kvfold.attention_backends.paged.transfer import to_device


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


def test_a_bad_graph_memory_setting_is_refused_at_construction(monkeypatch) -> None:
    from kvfold.attention_backends.paged import graphs

    for name in ("KVFOLD_CUDA_GRAPH_MEMORY_MB", "KVFOLD_CUDA_GRAPH_HEADROOM_MB"):
        for raw in ("lots", "-5"):
            monkeypatch.setenv(name, raw)
            with pytest.raises(ValueError, match=name):
                graphs.GraphedStep(lambda x: (x,))
        monkeypatch.delenv(name)


def test_a_capture_needs_headroom_counting_the_allocators_spare_memory() -> None:
    from kvfold.attention_backends.paged.graphs import room_for

    mib = 1 << 20
    # 1 GiB free on the device, 3 GiB reserved by the allocator of which 2 GiB in use: 2 GiB spare.
    free, reserved, allocated = 1024 * mib, 3072 * mib, 2048 * mib
    assert room_for(10 * mib, free, reserved, allocated, keep=2000 * mib)
    assert not room_for(100 * mib, free, reserved, allocated, keep=2000 * mib)
    assert not room_for(0, free, reserved, allocated, keep=2049 * mib)


def test_a_capture_books_what_it_keeps_beyond_inputs_and_outputs(monkeypatch) -> None:
    from kvfold.attention_backends.paged import graphs

    monkeypatch.setattr(graphs, "_held_bytes", 100)
    graphs.GraphedStep._book(32 << 20)  # a cuBLAS workspace taken inside the capture
    assert graphs._held_bytes == 100 + (32 << 20)
    graphs.GraphedStep._book(-5)  # another thread freed memory meanwhile: nothing is returned
    assert graphs._held_bytes == 100 + (32 << 20)


def test_graphs_of_every_layer_share_input_buffers_per_position_and_shape(monkeypatch) -> None:
    from kvfold.attention_backends.paged import graphs

    monkeypatch.setattr(graphs, "_inputs", {})
    q, table = torch.zeros(8, 4), torch.zeros(8, 64, dtype=torch.int32)
    assert graphs.new_input_bytes([q, table]) == 8 * 4 * 4 + 8 * 64 * 4
    first = graphs.input_buffers([q, table])
    assert graphs.new_input_bytes([q, table]) == 0
    again = graphs.input_buffers([q.clone(), table.clone()])  # another layer, the same batch shape
    assert all(a is b for a, b in zip(first, again))
    # Two inputs of one shape in one call never share a buffer; a new shape or dtype gets its own.
    pair = graphs.input_buffers([q, q.clone()])
    assert pair[0] is first[0] and pair[1] is not pair[0]
    assert graphs.input_buffers([torch.zeros(16, 4)])[0] is not first[0]
    assert graphs.input_buffers([q.half()])[0] is not first[0]
    assert graphs.input_buffers([q.t()])[0].stride() == q.t().stride()


def test_graph_memory_is_logged_as_it_grows(monkeypatch) -> None:
    from kvfold.attention_backends.paged import graphs

    monkeypatch.setattr(graphs, "_graphs", 0)
    monkeypatch.setattr(graphs, "_reported_mib", 0)
    monkeypatch.setattr(graphs, "_held_bytes", 100 << 20)
    messages: list[str] = []

    class Keep(logging.Handler):  # on the logger itself: vLLM's logging config may stop propagation
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler, level = Keep(logging.INFO), graphs.logger.level
    graphs.logger.addHandler(handler)
    graphs.logger.setLevel(logging.INFO)  # (setLevel, not the attribute: it clears the logger's cache)
    try:
        graphs.GraphedStep._report()
        assert not messages  # 100 MiB: under the first step
        graphs._held_bytes = 300 << 20
        graphs.GraphedStep._report()
        graphs._held_bytes = 400 << 20
        graphs.GraphedStep._report()  # still under 512 MiB: nothing new
    finally:
        graphs.logger.removeHandler(handler)
        graphs.logger.setLevel(level)
    assert messages == ["kvfold: 2 CUDA graphs hold 300 MiB (KVFOLD_CUDA_GRAPH_MEMORY_MB=1024)"]
