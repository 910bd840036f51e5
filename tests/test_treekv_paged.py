"""KVFOLD_TREEKV's paged implementation against the dense reference, outside an engine.

A small block allocator stands in for vLLM's sliding-window manager: blocks whose positions all
lie more than ``budget`` back are released and handed to other requests, which overwrite them, while
the worker's block table keeps listing the old ids (as vLLM's does). The test follows every step: the paged outputs and the kept entries must be the reference's, with requests of different
lengths, prefill chunks and decode steps mixed in one batch.
"""

import pytest
import torch
from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config

from kvfold.attention_backends.paged.metadata import PagedMetadata
from kvfold.attention_backends.treekv.backend import TreeKVBackend, TreeKVImpl, rope_inv_freq
from kvfold.attention_backends.treekv.options import TreeKVOptions
from kvfold.attention_backends.treekv.pages import PageViews, content_bytes
from kvfold.attention_backends.treekv.reference import TreeKV

HQ, HK, D, BS = 4, 2, 64, 16
OPTIONS = {"budget": 64, "sink": 4, "recent": 20, "prefill_block": 8}


class SlidingAllocator:
    """Blocks per request as vLLM's SlidingWindowManager holds them for window budget + 1."""

    def __init__(self, cache: torch.Tensor, budget: int) -> None:
        self.cache = cache
        self.free = list(range(1, cache.shape[0]))  # block 0 is vLLM's null block
        self.budget = budget
        self.tables: dict[int, list[int]] = {}
        self.released: dict[int, set[int]] = {}

    def schedule(self, req: int, computed: int, total: int) -> list[int]:
        table = self.tables.setdefault(req, [])
        released = self.released.setdefault(req, set())
        for j, block in enumerate(table):  # release what the window no longer covers
            if j not in released and (j + 1) * BS <= computed - self.budget:
                released.add(j)
                self.free.append(block)
                self.cache[block] = torch.randint(0, 256, self.cache[block].shape, dtype=torch.uint8,
                                                  device=self.cache.device)
        while len(table) * BS < total:
            table.append(self.free.pop(0))
        return table

    def live(self, req: int) -> list[int]:
        return [b for j, b in enumerate(self.tables[req]) if j not in self.released[req]]


@pytest.fixture(scope="module")
def vllm_config(tiny_llama):
    from vllm.config import AttentionConfig, CacheConfig

    from kvfold.vllm_plugins.general import register

    register()  # as vLLM does in every process: the name exists and options are checked
    return VllmConfig(
        model_config=ModelConfig(model=str(tiny_llama), dtype="float32", max_model_len=4096),
        cache_config=CacheConfig(enable_prefix_caching=False),
        attention_config=AttentionConfig(backend="KVFOLD_TREEKV"),
        additional_config={"kvfold": dict(OPTIONS)},
    )


@pytest.mark.parametrize(
    ("positions", "kernel"),
    [("rank", "torch"), ("original", "torch"),
     # decode attention through the Triton kernel, in its interpreter
     pytest.param("rank", "triton", marks=pytest.mark.triton),
     pytest.param("original", "triton", marks=pytest.mark.triton)],
)
def test_paged_steps_equal_the_reference(vllm_config, positions: str, kernel: str) -> None:
    from kvfold.attention_backends.treekv.kernels import triton_enabled

    assert triton_enabled(torch.device("cpu")) == (kernel == "triton")
    run_paged_steps(vllm_config, positions, "cpu")


@pytest.mark.parametrize("kernel", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_padded_decode_batches_change_nothing(vllm_config, monkeypatch, kernel: str) -> None:
    """Decode batches run padded to a graph's batch size (here 3 more requests than real): the
    padding requests write only into vLLM's null block and every real output and entry stays the
    reference's."""
    from kvfold.attention_backends.treekv import backend

    monkeypatch.setattr(backend, "bucket", lambda n: n + 3)
    run_paged_steps(vllm_config, "rank", "cpu")


def run_paged_steps(vllm_config, positions: str, device: str) -> None:
    """The check itself; tests/gpu/check_cuda.py runs it on CUDA too."""
    vllm_config.additional_config["kvfold"]["positions"] = positions
    with set_current_vllm_config(vllm_config):
        impl = TreeKVImpl(HQ, D, D**-0.5, HK)
    inv_freq = rope_inv_freq(vllm_config, D)
    options = TreeKVOptions(**OPTIONS, positions=positions)
    cache = torch.zeros(64, HK, BS, content_bytes(D, D, torch.float32), dtype=torch.uint8, device=device)
    pages = PageViews.of(cache, D, D, torch.float32)
    alloc = SlidingAllocator(cache, options.budget)
    # Two requests: one prefilled in chunks of 50 then decoded, one short prompt then decoded.
    lengths = {0: 260, 1: 150}
    plans = {0: [50] * 4 + [1] * 60, 1: [30] + [1] * 120}
    g = torch.Generator().manual_seed(0)
    data = {r: [torch.randn(n, h, D, generator=g).to(device) for h in (HQ, HK, HK)]
            for r, n in lengths.items()}
    refs = {r: TreeKV(options, D**-0.5, inv_freq) for r in lengths}
    done = {0: 0, 1: 0}
    for step in range(max(len(p) for p in plans.values())):
        batch = [(r, plans[r][step]) for r in (0, 1) if step < len(plans[r])]
        rows, slots, qs, ks, vs, starts, seq_lens = [], [], [], [], [], [0], []
        for r, n in batch:
            a = done[r]
            table = alloc.schedule(r, a, a + n)
            rows.append(table)
            pos = torch.arange(a, a + n)
            slots.append((torch.tensor(table)[pos // BS] * BS + pos % BS).to(device))
            q, k, v = (t[a : a + n] for t in data[r])
            qs.append(q), ks.append(k), vs.append(v)
            starts.append(starts[-1] + n)
            seq_lens.append(a + n)
        width = max(len(t) for t in rows)
        md = PagedMetadata(
            num_reqs=len(batch), num_actual_tokens=starts[-1],
            query_start_loc_cpu=torch.tensor(starts), seq_lens_cpu=torch.tensor(seq_lens),
            block_table=torch.tensor([t + [0] * (width - len(t)) for t in rows], dtype=torch.int32,
                                     device=device),
            slot_mapping=torch.cat(slots), max_query_len=max(n for _, n in batch), max_seq_len=max(seq_lens),
        )
        q, k, v = torch.cat(qs), torch.cat(ks), torch.cat(vs)
        out = torch.empty(q.shape[0], HQ, D, device=device)
        impl.forward(None, q, k, v, cache, md, out)
        for (r, n), a in zip(batch, starts):
            expected = refs[r].extend(q[a : a + n], k[a : a + n], v[a : a + n], done[r])
            torch.testing.assert_close(out[a : a + n], expected, atol=1e-4, rtol=1e-4)
            done[r] += n
            # Same kept entries as the reference, found in the request's live blocks.
            # (Slots past the sequence end hold nothing of this request and are never read.)
            table = torch.tensor(alloc.tables[r])
            natural = torch.arange(len(table) * BS).view(len(table), BS)
            live = torch.tensor([j not in alloc.released[r] for j in range(len(table))])
            in_use = live[:, None] & (natural < done[r])
            kept = pages.position[table.to(device)].permute(1, 0, 2)[:, in_use.to(device)]  # [HK, slots]
            for h in range(HK):
                found = sorted(p for p in kept[h].tolist() if p >= 0)
                assert found == refs[r].cache.positions[h].tolist()
            # Memory: never more than the window's blocks (+1 for alignment, + the chunk).
            assert len(alloc.live(r)) <= -(-(options.budget + n) // BS) + 1


def test_spec_becomes_a_bounded_window_of_packed_pages(vllm_config) -> None:
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    full = FullAttentionSpec(block_size=16, num_kv_heads=HK, head_size=D, dtype=torch.bfloat16)
    with set_current_vllm_config(vllm_config):
        spec = TreeKVBackend.customize_spec(full)
    assert isinstance(spec, SlidingWindowSpec) and spec.sliding_window == OPTIONS["budget"] + 1
    assert spec.page_size_bytes == 16 * HK * (2 * D * 2 + 16)  # bf16 K and V + 16 bytes of state
    assert TreeKVBackend.customize_spec(spec) is spec
