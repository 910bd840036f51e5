"""KVFOLD_FOURIER's paged implementation against the step-by-step specification, outside an engine.

The cache is laid out as vLLM 0.32 lays it out (every layer a view of one allocation, layer-major
or block-major), filled with garbage, and handed blocks by a small allocator that puts each
request's reserved blocks first. Two layers run on it at once, so a layer that stores its kept dims
or state in another layer's cells is caught if it clobbers anything. Requests cross every phase:
exact, first compression in prefill and in decode, rank-n and rank-1 updates, chunked prefill.
"""

from types import SimpleNamespace

import pytest
import torch
from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config

from kvfold.attention_backends.fourier import calibrate as files
from kvfold.attention_backends.fourier.arena import CacheArena
from kvfold.attention_backends.fourier.backend import FourierBackend, FourierImpl, layout_for
from kvfold.attention_backends.fourier.stream import FourierStream
from kvfold.attention_backends.paged.metadata import PagedMetadata

HQ, HK, D, BS = 4, 2, 64, 16
SINK, RECENT, FREQS = 4, 20, 8  # the middle is compressed once it is longer than 16 tokens
MAX_LEN = 512


@pytest.fixture(scope="module")
def dims_dir(tmp_path_factory, tiny_llama):
    directory = tmp_path_factory.mktemp("fourier-dims")
    # Unequal shares per layer and head, one head with every K dim compressed and one with none.
    dims = files.random_dims(tiny_llama, seed=3, sink=SINK, recent=RECENT, freqs=FREQS,
                             fractions=(0.6, 0.8))
    dims.layers[0].key_dims[0] = list(range(D))
    dims.layers[1].value_dims[1] = []
    files.write(dims, directory)
    return directory


def make_config(model, dims_dir, dtype: str = "float32", **options) -> VllmConfig:
    from vllm.config import AttentionConfig, CacheConfig

    from kvfold.vllm_plugins.general import register

    register()
    return VllmConfig(
        model_config=ModelConfig(model=str(model), dtype=dtype, max_model_len=MAX_LEN),
        cache_config=CacheConfig(enable_prefix_caching=False),
        attention_config=AttentionConfig(backend="KVFOLD_FOURIER"),
        additional_config={"kvfold": {"dims": str(dims_dir), **options}},
    )


def vllm_views(layout, num_blocks: int, order: str, device: str) -> list[torch.Tensor]:
    """Per-layer ``[blocks, 1, block_size, cell]`` uint8 views of one garbage-filled allocation."""
    page = layout.page_bytes
    raw = torch.randint(0, 256, (layout.num_layers * num_blocks * page,), dtype=torch.uint8, device=device)
    if order == "layer-major":
        return [torch.as_strided(raw, (num_blocks, 1, BS, layout.cell_bytes), (page, page, layout.cell_bytes, 1),
                                 layer * num_blocks * page) for layer in range(layout.num_layers)]
    stride = layout.num_layers * page  # block-major: a block's pages of all layers side by side
    return [torch.as_strided(raw, (num_blocks, 1, BS, layout.cell_bytes), (stride, page, layout.cell_bytes, 1),
                             layer * page) for layer in range(layout.num_layers)]


@pytest.mark.parametrize("kernel", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("order,dtype", [("layer-major", "float32"), ("block-major", "bfloat16")])
def test_paged_steps_equal_the_stream(tiny_llama, dims_dir, order: str, dtype: str, kernel: str) -> None:
    from kvfold.attention_backends.fourier.kernels import triton_enabled

    assert triton_enabled(torch.device("cpu")) == (kernel == "triton")
    run_paged_steps(make_config(tiny_llama, dims_dir, dtype), "cpu", order)


def run_paged_steps(vllm_config: VllmConfig, device: str, order: str = "layer-major") -> None:
    """The check itself; tests/gpu/check_cuda.py runs it on CUDA too.

    A 16-bit model's cache holds K/V in its dtype (two pre-compression middle tokens per
    coefficient row): the data are rounded to it first, so the cache stores them exactly and the
    specification sees the same numbers; queries stay float32 as the arithmetic does.
    """
    dtype = vllm_config.model_config.dtype
    with set_current_vllm_config(vllm_config):
        impls = [FourierImpl(HQ, D, D**-0.5, HK) for _ in range(2)]
    layout = layout_for(impls[0].options, dtype, BS)
    arena = CacheArena(vllm_views(layout, 300, order, device), layout)
    layers = []
    for index, impl in enumerate(impls):
        impl.arena, impl.layer_index = arena, index
        layers.append(SimpleNamespace(layer_name=f"model.layers.{index}.self_attn.attn"))
    window = impls[0].window
    free = list(range(1, 300))  # block 0 is vLLM's null block
    tables: dict[int, list[int]] = {}
    # Chunks that compress in prefill then decode; a short prompt compressed during decode; a
    # single-token prefill; one long prompt in a single step (exact prefill, then rank-1 updates).
    plans = {0: [30, 25, 40] + [1] * 12, 1: [9] + [1] * 40, 2: [1] + [1] * 20, 3: [120] + [1] * 8}
    g = torch.Generator().manual_seed(0)
    data = {r: [[torch.randn(sum(p), h, D, generator=g).to(dtype).float().to(device) for h in (HQ, HK, HK)]
                for _ in impls] for r, p in plans.items()}
    streams = {r: [stream_for(layout, index, window, device) for index in range(len(impls))] for r in plans}
    done = dict.fromkeys(plans, 0)
    for step in range(max(len(p) for p in plans.values())):
        batch = [(r, plans[r][step]) for r in plans if step < len(plans[r])]
        rows, starts, seq_lens = [], [0], []
        for r, n in batch:
            table = tables.setdefault(r, [])
            while len(table) < layout.reserved_blocks + -(-(done[r] + n) // BS):
                table.append(free.pop(0))
            rows.append(table)
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
        for index, (impl, layer) in enumerate(zip(impls, layers)):
            q, k, v = (torch.cat([data[r][index][j][done[r] : done[r] + n] for r, n in batch]) for j in range(3))
            out = torch.full((starts[-1], HQ, D), float("nan"), device=device)
            impl.attend(layer, q, k, v, None, md, out)
            for b, (r, n) in enumerate(batch):
                expected = streams[r][index].step(*(t[done[r] : done[r] + n] for t in data[r][index]))
                got = out[starts[b] : starts[b + 1]]
                torch.testing.assert_close(got, expected, atol=2e-4, rtol=2e-4,
                                           msg=lambda m: f"step {step} request {r} layer {index}: {m}")
        for r, n in batch:
            done[r] += n
    assert all(s[0].compressed() for s in streams.values() if len(s[0]) > SINK + RECENT + 2 * FREQS)
    assert streams[1][0].compressed() and not streams[1][0].compressed(SINK + RECENT + 9)


def stream_for(layout, index: int, window: int, device: str) -> FourierStream:
    return FourierStream(
        [d.to(device) for d in layout.compressed[index]["k"]],
        [d.to(device) for d in layout.compressed[index]["v"]],
        sink=SINK, recent=RECENT, freqs=FREQS, window=window, scale=D**-0.5)


def test_spec_and_layout(tiny_llama, dims_dir) -> None:
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from kvfold.attention_backends.paged.reserved import ReservedBlocksSpec

    config = make_config(tiny_llama, dims_dir)
    with set_current_vllm_config(config):
        spec = FourierBackend.customize_spec(FullAttentionSpec(
            block_size=BS, num_kv_heads=HK, head_size=D, dtype=torch.float32))
        layout = layout_for(FourierImpl(HQ, D, D**-0.5, HK).options, torch.float32, BS)
    assert isinstance(spec, ReservedBlocksSpec) and FourierBackend.customize_spec(spec) is spec
    assert spec.page_size_bytes == layout.page_bytes == BS * layout.cell_bytes
    assert spec.reserved_blocks == layout.reserved_blocks
    # Every kept dim of every layer has a slot byte of its own, and nothing more than alignment.
    kept = sum(d.numel() for layer in layout.kept for kind in "kv" for d in layer[kind]) * 4
    used = [set() for _ in range(layout.num_layers)]
    for layer in layout.segments:
        for kind in "kv":
            for seg in layer[kind]:
                span = set(range(seg.offset, seg.offset + 4 * seg.width))
                assert not span & used[seg.view] and max(span, default=0) < layout.cell_bytes
                used[seg.view] |= span
    assert sum(map(len, used)) == kept
    assert layout.num_layers * layout.cell_bytes - kept < 16 * layout.num_layers
    # Every state row has bytes of its own inside the reserved pages.
    taken = set()
    for table in (layout.coef, layout.ring):
        for layer in table:
            for kind in "kv":
                for item in layer[kind]:
                    if item is None:
                        continue
                    pages = set(range(item.first_page, item.first_page + item.pages))
                    assert not pages & taken and item.rows_per_page * item.row_bytes <= layout.page_bytes
                    taken |= pages
    assert max(taken) < layout.num_layers * layout.reserved_blocks
