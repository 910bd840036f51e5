"""KVFOLD_FOURIER's paged implementation against the step-by-step specification, outside an engine
(the driver, tests/fourier_steps.py, says what it covers), and its KV-cache spec and layout."""

from types import SimpleNamespace

import pytest
import torch
from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config

from fourier_steps import run_steps

from kvfold.attention_backends.fourier import calibrate as files
from kvfold.attention_backends.fourier.backend import FourierBackend, FourierImpl, layout_for
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


@pytest.mark.parametrize("order,dtype,kernel", [
    pytest.param(order, dtype, kernel, marks=[pytest.mark.triton] if "triton" in kernel else [])
    for order, dtype, kernel in [
        *[(o, d, k) for o, d in (("layer-major", "float32"), ("block-major", "bfloat16"))
          for k in ("torch", "triton")],
        ("layer-major", "float32", "triton, one request per group"),
    ]
])
def test_paged_steps_equal_the_stream(tiny_llama, dims_dir, order: str, dtype: str, kernel: str,
                                      monkeypatch) -> None:
    from kvfold.attention_backends.fourier import step
    from kvfold.attention_backends.fourier.kernels import triton_enabled

    if kernel.endswith("group"):  # the scratch bound splits every decode batch into single requests
        monkeypatch.setattr(step, "SCRATCH_BYTES", 1)
    kernel = kernel.split(",")[0]

    assert triton_enabled(torch.device("cpu")) == (kernel == "triton")
    config = make_config(tiny_llama, dims_dir, dtype)
    with set_current_vllm_config(config):
        impls = [FourierImpl(HQ, D, D**-0.5, HK) for _ in range(2)]
    layout = layout_for(impls[0].options, config.model_config.dtype, BS)

    def attend(arena, index, q, k, v, block_table, requests, out) -> None:
        # Through the vLLM impl and vLLM's metadata (its slot_mapping wrong on purpose: unused).
        impl = impls[index]
        impl.arena, impl.layer_index = arena, index
        starts = [0] + [end for _, _, end, _ in requests]
        md = PagedMetadata(
            num_reqs=len(requests), num_actual_tokens=starts[-1],
            query_start_loc_cpu=torch.tensor(starts), seq_lens_cpu=torch.tensor([n for *_, n in requests]),
            block_table=block_table, slot_mapping=torch.full((starts[-1],), -1),
            max_query_len=max(e - s for _, s, e, _ in requests), max_seq_len=max(n for *_, n in requests))
        impl.attend(SimpleNamespace(layer_name=f"model.layers.{index}.self_attn.attn"), q, k, v, None, md, out)

    run_steps(layout, attend, heads=HQ, window=impls[0].window, scale=D**-0.5, device="cpu", order=order)


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


def test_decode_groups_bound_the_step_scratch() -> None:
    from kvfold.attention_backends.fourier.step import SCRATCH_BUFFERS, decode_groups

    decode = [(0, 0, 100), (1, 1, 5000), (2, 2, 64), (3, 3, 4990), (4, 4, 70)]
    per = 32 * 4 * SCRATCH_BUFFERS  # bytes per request and token of its group's longest, 32 heads
    assert decode_groups(decode, 32, limit=10**12) == [sorted(decode, key=lambda d: -d[2])]
    # Two requests of 5,056 tokens (5,000 rounded up to 64) fit, a third does not; the short ones
    # (128 tokens after rounding) share the next group.
    groups = decode_groups(decode, 32, limit=2 * 5056 * per)
    assert groups == [[(1, 1, 5000), (3, 3, 4990)], [(0, 0, 100), (4, 4, 70), (2, 2, 64)]]
    assert sorted(sum(groups, [])) == decode  # every request once
    assert decode_groups(decode, 32, limit=1) == [[d] for d in sorted(decode, key=lambda d: -d[2])]


@pytest.mark.parametrize("options,message", [
    ({"freqs": 512}, "nothing would be compressed"),
    ({"window": 100}, "the basis would repeat"),
    ({"sink": "four"}, "option 'sink'"),
    ({"budget": 2048}, "unknown option 'budget'"),
])
def test_bad_options_are_refused_when_vllm_builds_its_config(tiny_llama, dims_dir, options, message) -> None:
    # The check vLLM runs in the API process before any engine starts (selection.validate_vllm_config).
    with pytest.raises(Exception, match=message):
        make_config(tiny_llama, dims_dir, **options)


def test_dims_of_another_model_are_refused(tiny_llama, tmp_path) -> None:
    dims = files.random_dims(tiny_llama, seed=0, sink=SINK, recent=RECENT, freqs=FREQS)
    files.write(dims.model_copy(update={"num_kv_heads": HK + 1}), tmp_path)
    with pytest.raises(Exception, match="run `kvfold calibrate fourier` for this model"):
        make_config(tiny_llama, tmp_path)


def test_profile_run_reserves_the_larger_of_prefill_and_decode_scratch(tiny_llama, dims_dir, monkeypatch) -> None:
    from kvfold.attention_backends.fourier.backend import PREFILL_BYTES_PER_ELEMENT
    from kvfold.attention_backends.fourier.step import SCRATCH_BYTES
    from kvfold.attention_backends.paged import backend as paged_backend

    with set_current_vllm_config(make_config(tiny_llama, dims_dir)):
        impl = FourierImpl(HQ, D, D**-0.5, HK)
    # The tiny model's prefill (512 tokens) needs less than the decode groups' bound.
    assert PREFILL_BYTES_PER_ELEMENT * MAX_LEN * HK * D < SCRATCH_BYTES
    assert impl.profile_scratch_bytes() == SCRATCH_BYTES
    impl.max_model_len = 1 << 20
    assert impl.profile_scratch_bytes() == PREFILL_BYTES_PER_ELEMENT * (1 << 20) * HK * D
    made = []
    monkeypatch.setattr(paged_backend.torch, "empty", lambda n, **kw: made.append(n))
    impl.reserve_scratch(torch.device("cuda"))
    assert made == [PREFILL_BYTES_PER_ELEMENT * (1 << 20) * HK * D]
