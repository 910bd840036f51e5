"""KVFOLD_VQKV's paged implementation against the reference, outside an engine.

A small allocator stands in for vLLM's (with kvfold's VQKV manager): each request's block-table row
starts with its reserved blocks, then its position blocks; fresh blocks are filled with garbage,
as reused blocks are. Requests of different lengths, prefill chunks and decode steps are mixed in
one batch; every step's outputs must be the reference's.
"""

from types import SimpleNamespace

import pytest
import torch
from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config

from kvfold.attention_backends.paged.metadata import PagedMetadata
from kvfold.attention_backends.vqkv import codebooks as files
from kvfold.attention_backends.vqkv.backend import VQKVBackend, VQKVImpl
from kvfold.attention_backends.vqkv.pages import PageLayout
from kvfold.attention_backends.vqkv.reference import (
    LayerCodebooks,
    ResidualCodebook,
    rope_branches,
    vqkv_attention,
)

HQ, HK, D, BS = 4, 2, 64, 16
# 8 codes per cell: float32 ring entries aligned, so the Triton run reads them in the ring kernel.
KEY_STAGES, VALUE_STAGES, VALUE_GROUPS = 2, 2, 2
SINK, RECENT = 4, 20
LAYER = SimpleNamespace(layer_name="model.layers.1.self_attn.attn")


def random_books(seed: int) -> LayerCodebooks:
    g = torch.Generator().manual_seed(seed)
    key = [ResidualCodebook(dims, torch.randn(KEY_STAGES, 256, D // 2, generator=g) / (j + 1))
           for j, dims in enumerate(rope_branches(D))]
    value = [ResidualCodebook(dims, torch.randn(VALUE_STAGES, 256, D // VALUE_GROUPS, generator=g))
             for dims in torch.arange(D).view(VALUE_GROUPS, -1)]
    return LayerCodebooks(D, D, key, value)


@pytest.fixture(scope="module")
def codebook_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("vqkv-books")
    manifest = files.CodebookManifest(num_layers=2, num_kv_heads=HK, head_size=D, head_size_v=D,
                                      key_stages=KEY_STAGES, value_stages=VALUE_STAGES,
                                      value_groups=VALUE_GROUPS)
    files.write_manifest(directory, manifest)
    for layer in range(2):
        files.save_layer(directory, layer, random_books(layer))
    return directory


def make_config(model, codebook_dir, dtype: str = "float32", **options) -> VllmConfig:
    from vllm.config import AttentionConfig, CacheConfig

    from kvfold.vllm_plugins.general import register

    register()
    return VllmConfig(
        model_config=ModelConfig(model=str(model), dtype=dtype, max_model_len=4096),
        cache_config=CacheConfig(enable_prefix_caching=False),
        attention_config=AttentionConfig(backend="KVFOLD_VQKV"),
        additional_config={"kvfold": {"codebooks": str(codebook_dir), "sink": SINK, "recent": RECENT,
                                      **options}},
    )


@pytest.mark.parametrize("kernel", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_paged_steps_equal_the_reference(tiny_llama, codebook_dir, kernel: str) -> None:
    from kvfold.attention_backends.vqkv.kernels import triton_enabled

    assert triton_enabled(torch.device("cpu")) == (kernel == "triton")
    run_paged_steps(make_config(tiny_llama, codebook_dir), "cpu")


@pytest.mark.triton
def test_padded_decode_batches_write_nothing_for_the_padding(tiny_llama, codebook_dir, monkeypatch) -> None:
    """Decode-only steps write their tokens inside the decode graph, padded to a graph's batch
    size (here 3 more requests than real, on request 0's block-table row at position -1): the
    padding writes nothing and every real output stays the reference's."""
    from kvfold.attention_backends.vqkv import backend

    monkeypatch.setattr(backend, "bucket", lambda n: n + 3)
    run_paged_steps(make_config(tiny_llama, codebook_dir), "cpu")


@pytest.mark.triton
@pytest.mark.parametrize(("recent", "prefill"), [(RECENT, 0), (0, 0), (RECENT, 5)])
def test_decode_tokens_written_in_the_graph_equal_the_eager_write(tiny_llama, codebook_dir, monkeypatch,
                                                                  recent: int, prefill: int) -> None:
    """Decode tokens are written inside the decode graph, a prefill chunk's tokens after it: the
    cache ends as ``write_step`` of every token leaves it, byte for byte, on a cache of garbage; a
    step of decodes only writes nothing eagerly. With no recent window only sink positions reach
    the ring."""
    from kvfold.attention_backends.vqkv import backend

    with set_current_vllm_config(make_config(tiny_llama, codebook_dir, recent=recent)):
        impl = VQKVImpl(HQ, D, D**-0.5, HK)
    num_codes = 2 * KEY_STAGES + VALUE_GROUPS * VALUE_STAGES
    layout = PageLayout(num_codes, D, D, torch.float32, SINK, recent, BS)
    g = torch.Generator().manual_seed(3)
    cache = torch.randint(0, 256, (600, HK, BS, num_codes), dtype=torch.uint8, generator=g)
    # Requests decoding their tokens 2 (inside the sink), 40 and 700 (past the ring's first lap),
    # and with ``prefill``, one more prefilling tokens 30 to 34.
    counts = [1, 1, 1] + ([prefill] if prefill else [])
    seq_lens = [3, 41, 701] + ([30 + prefill] if prefill else [])
    width = layout.reserved_blocks + -(-max(seq_lens) // BS)
    rows = torch.randperm(cache.shape[0] - 1, generator=g)[: len(counts) * width].view(len(counts), width) + 1
    tokens = sum(counts)
    md = PagedMetadata(
        num_reqs=len(counts), num_actual_tokens=tokens,
        query_start_loc_cpu=torch.tensor([0] + counts).cumsum(0),
        seq_lens_cpu=torch.tensor(seq_lens), block_table=rows.int(),
        slot_mapping=torch.full((tokens,), -1), max_query_len=max(counts), max_seq_len=max(seq_lens),
    )
    q, k, v = (torch.randn(tokens, h, D, generator=g) for h in (HQ, HK, HK))
    eager_writes = []
    write_step = backend.write_step
    if not prefill:
        monkeypatch.setattr(backend, "write_step", lambda *a: eager_writes.append(a))
    graphed = cache.clone()
    impl.forward(LAYER, q, k, v, graphed, md, torch.empty(tokens, HQ, D))
    assert eager_writes == []  # a step of decodes only wrote its tokens in the graph
    eager = cache.clone()
    books = impl._layer_books(LAYER, torch.device("cpu"))
    write_step(eager, k, v, backend.step_tokens(md, q.device), md, layout, books)
    assert not torch.equal(eager, cache)
    assert torch.equal(graphed, eager)


def run_paged_steps(vllm_config: VllmConfig, device: str) -> None:
    """The check itself; tests/gpu/check_cuda.py runs it on CUDA too."""
    with set_current_vllm_config(vllm_config):
        impl = VQKVImpl(HQ, D, D**-0.5, HK)
    books = random_books(1)  # layer 1's
    num_codes = 2 * KEY_STAGES + VALUE_GROUPS * VALUE_STAGES
    layout = PageLayout(num_codes, D, D, torch.float32, SINK, RECENT, BS)
    cache = torch.randint(0, 256, (400, HK, BS, num_codes), dtype=torch.uint8, device=device)
    free = list(range(1, cache.shape[0]))  # block 0 is vLLM's null block
    tables: dict[int, list[int]] = {}
    # Three requests: chunks then decode; a short prompt then decode; a single-step prompt that
    # starts decoding at once, so sink-only, ring-filling and steady states are all crossed.
    plans = {0: [50, 50, 60] + [1] * 30, 1: [9] + [1] * 40, 2: [3] * 2 + [1] * 35}
    g = torch.Generator().manual_seed(0)
    data = {r: [torch.randn(sum(p), h, D, generator=g).to(device) for h in (HQ, HK, HK)]
            for r, p in plans.items()}
    outputs = {r: [] for r in plans}
    done = dict.fromkeys(plans, 0)
    for step in range(max(len(p) for p in plans.values())):
        batch = [(r, plans[r][step]) for r in plans if step < len(plans[r])]
        rows, qs, ks, vs, starts, seq_lens = [], [], [], [], [0], []
        for r, n in batch:
            table = tables.setdefault(r, [])
            while len(table) < layout.reserved_blocks + -(-(done[r] + n) // BS):
                table.append(free.pop(0))
            rows.append(table)
            for t, out in zip(data[r], (qs, ks, vs)):
                out.append(t[done[r] : done[r] + n])
            starts.append(starts[-1] + n)
            seq_lens.append(done[r] + n)
        width = max(len(t) for t in rows)
        md = PagedMetadata(
            num_reqs=len(batch), num_actual_tokens=starts[-1],
            query_start_loc_cpu=torch.tensor(starts), seq_lens_cpu=torch.tensor(seq_lens),
            block_table=torch.tensor([t + [0] * (width - len(t)) for t in rows], dtype=torch.int32,
                                     device=device),
            slot_mapping=torch.full((starts[-1],), -1, device=device),  # wrong on purpose: unused
            max_query_len=max(n for _, n in batch), max_seq_len=max(seq_lens),
        )
        q, k, v = torch.cat(qs), torch.cat(ks), torch.cat(vs)
        out = torch.empty(q.shape[0], HQ, D, device=device)
        impl.forward(LAYER, q, k, v, cache, md, out)
        for (r, n), a in zip(batch, starts):
            outputs[r].append(out[a : a + n])
            done[r] += n
    for r, plan in plans.items():
        step_starts = [sum(plan[:i]) for i in range(len(plan))]
        q, k, v = data[r]
        expected = vqkv_attention(q, k, v, books, step_starts, D**-0.5, SINK, RECENT)
        torch.testing.assert_close(torch.cat(outputs[r]), expected, atol=2e-4, rtol=2e-4)


def test_spec_counts_codes_and_the_reserved_blocks(tiny_llama, codebook_dir) -> None:
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from kvfold.attention_backends.paged.reserved import ReservedBlocksSpec

    config = make_config(tiny_llama, codebook_dir)
    full = FullAttentionSpec(block_size=BS, num_kv_heads=HK, head_size=D, dtype=torch.bfloat16)
    with set_current_vllm_config(config):
        spec = VQKVBackend.customize_spec(full)
    num_codes = 2 * KEY_STAGES + VALUE_GROUPS * VALUE_STAGES
    assert isinstance(spec, ReservedBlocksSpec) and spec.page_size_bytes == BS * HK * num_codes
    # Each exact token (bf16 K and V: 256 bytes) spans 256 / 8 = 32 cells of 8 code bytes.
    assert spec.reserved_blocks == -(-(SINK + RECENT) * 32 // BS)
    per_request = spec.max_memory_usage_bytes(config)
    assert per_request == (4096 // BS + spec.reserved_blocks) * spec.page_size_bytes
    assert VQKVBackend.customize_spec(spec) is spec


@pytest.mark.parametrize(
    ("options", "message"),
    [({"recent": 5000}, "nothing would be quantized"),
     ({"codebooks": "/nonexistent"}, "kvfold calibrate vqkv"),
     ({"window": 3}, "unknown option 'window'")],
)
def test_bad_configurations_are_refused_at_start_up(tiny_llama, codebook_dir, options, message) -> None:
    # vLLM's config validation runs kvfold's check (a ValueError in pydantic's wrapping).
    with pytest.raises(ValueError, match=message):
        make_config(tiny_llama, codebook_dir, **options)


def test_incomplete_codebooks_are_refused(tiny_llama, codebook_dir, tmp_path) -> None:
    (tmp_path / files.MANIFEST).write_text((codebook_dir / files.MANIFEST).read_text())
    files.save_layer(tmp_path, 0, random_books(0))  # layer 1 missing
    with pytest.raises(ValueError, match=r"lack layers \[1\]"):
        make_config(tiny_llama, tmp_path)


def test_profile_run_reserves_the_prefill_rebuild(tiny_llama, codebook_dir, monkeypatch) -> None:
    from kvfold.attention_backends.paged import backend as paged_backend
    from kvfold.attention_backends.vqkv.backend import PREFILL_BYTES_PER_ELEMENT

    with set_current_vllm_config(make_config(tiny_llama, codebook_dir)):
        impl = VQKVImpl(HQ, D, D**-0.5, HK)
    assert impl.profile_scratch_bytes() == PREFILL_BYTES_PER_ELEMENT * 4096 * HK * D
    made = []
    monkeypatch.setattr(paged_backend.torch, "empty", lambda n, **kw: made.append((n, kw["device"].type)))
    q = torch.zeros(3, HQ, D)
    impl.forward(LAYER, q, torch.zeros(3, HK, D), torch.zeros(3, HK, D), torch.zeros(0), None, q)
    assert made == []  # the CPU KV cache is sized by VLLM_CPU_KVCACHE_SPACE, not by a profile
    impl.reserve_scratch(torch.device("cuda"))
    assert made == [(PREFILL_BYTES_PER_ELEMENT * 4096 * HK * D, "cuda")]


def test_sixteen_bit_models_reserve_only_the_past_buffers(tiny_llama, codebook_dir) -> None:
    """16-bit models with an even code count take past.py's path on CUDA: the scratch is its
    model-dtype K and V of the longest past, 4 bytes per element instead of the torch path's 64."""
    with set_current_vllm_config(make_config(tiny_llama, codebook_dir, dtype="bfloat16")):
        impl = VQKVImpl(HQ, D, D**-0.5, HK)
    assert impl.profile_scratch_bytes() == 2 * 2 * 4096 * HK * D
