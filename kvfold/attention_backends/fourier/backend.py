"""KVFOLD_FOURIER on vLLM: FourierAttention with its spectral state inside vLLM's KV cache.

Accounting: ``customize_spec`` gives every layer uint8 cells of :class:`layout.FourierLayout`'s
``cell_bytes`` (a token slot holds only the kept dims of all layers) and each request the reserved
blocks of its fixed state (coefficients, normalisation, exact ring;
:mod:`kvfold.attention_backends.paged.reserved`), so vLLM's capacity line, admission and max
concurrency are FourierAttention's. Every layer reaches the whole allocation through one
:class:`arena.CacheArena`.

A step is :func:`step.attend_step` (prefill chunks attend, every request's tokens enter the cache,
decoding tokens attend to the cache that now holds them: Triton + FFT on CUDA, the torch rebuild
elsewhere).
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch
from vllm.v1.attention.backend import AttentionLayer
from vllm.v1.kv_cache_interface import AttentionSpec

from kvfold.attention_backends.fourier import calibrate as files
from kvfold.attention_backends.fourier.arena import CacheArena
from kvfold.attention_backends.fourier.decode import HeadTables
from kvfold.attention_backends.fourier.layout import FourierLayout
from kvfold.attention_backends.fourier.options import FourierOptions
from kvfold.attention_backends.fourier.step import SCRATCH_BYTES, GraphedDecode, attend_step
from kvfold.attention_backends.paged.backend import KvfoldBackend, KvfoldImpl, spec_options
from kvfold.attention_backends.paged.metadata import PagedMetadata
from kvfold.attention_backends.paged.reserved import ReservedBlocksSpec, reserved_spec
from kvfold.options import KvfoldConfigError

if TYPE_CHECKING:
    from vllm.config import VllmConfig

NAME = "KVFOLD_FOURIER"
# Temporary bytes of a prefill chunk of one request, per (cached token x KV head x head dim): the
# past rebuilt for every head (float32, int64 gather indices, the full-width scatter), its
# concatenation with the chunk and 16-bit copies, or the store's refit of the re-normalisation over
# the whole middle. torch's profiler on CPU at 8B shape, 4k and 8k tokens: 76-88.
PREFILL_BYTES_PER_ELEMENT = 96


@lru_cache(maxsize=8)
def dims_at(directory: str) -> files.FourierDims:
    try:
        return files.read(directory)
    except (files.CalibrationError, ValueError) as exc:
        raise KvfoldConfigError(f"{NAME}: {exc}") from None


def settings(options: FourierOptions) -> tuple[int, int, int]:
    """(sink, recent, freqs): the options', else the ones the dims were calibrated with."""
    dims = dims_at(options.dims)
    return (dims.sink if options.sink is None else options.sink,
            dims.recent if options.recent is None else options.recent,
            dims.freqs if options.freqs is None else options.freqs)


@lru_cache(maxsize=8)
def layout_for(options: FourierOptions, dtype: torch.dtype, block_size: int) -> FourierLayout:
    dims = dims_at(options.dims)
    sink, recent, freqs = settings(options)
    return FourierLayout(
        [[torch.tensor(h, dtype=torch.long) for h in layer.key_dims] for layer in dims.layers],
        [[torch.tensor(h, dtype=torch.long) for h in layer.value_dims] for layer in dims.layers],
        head_size=dims.head_size, head_size_v=dims.head_size_v, dtype=dtype, block_size=block_size,
        sink=sink, recent=recent, freqs=freqs,
    )


def window_for(options: FourierOptions, max_model_len: int) -> int:
    """The Fourier window T: long enough for the longest middle a request can have."""
    sink, recent, _ = settings(options)
    return options.window if options.window is not None else max_model_len - sink - recent


# One arena per KV-cache allocation, shared by the layers of this process.
_arenas: dict[tuple[int, int], CacheArena] = {}


class FourierImpl(KvfoldImpl):
    method_name = NAME
    options_model = FourierOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from vllm.config import get_current_vllm_config

        config = get_current_vllm_config()
        self.dtype = config.model_config.dtype
        self.max_model_len = config.model_config.max_model_len
        self.window = window_for(self.options, self.max_model_len)
        self.dims = dims_at(self.options.dims)
        if (self.dims.head_size, self.dims.head_size_v) != (self.head_size, self.head_size):
            raise KvfoldConfigError(f"{NAME}: dims at {self.options.dims} are for head size "
                                    f"{self.dims.head_size}, this model's is {self.head_size}")
        self.arena: CacheArena | None = None  # the tests outside an engine set it
        self.tables: HeadTables | None = None
        self.layer_index: int | None = None
        self.graphed = GraphedDecode(on_memory=self.metrics.cuda_graph_bytes)

    def profile_scratch_bytes(self) -> int:
        prefill = PREFILL_BYTES_PER_ELEMENT * self.max_model_len * self.num_kv_heads * self.head_size
        return max(prefill, SCRATCH_BYTES)

    def _layer(self, layer: AttentionLayer) -> int:
        if self.layer_index is None:
            from vllm.model_executor.models.utils import extract_layer_index

            self.layer_index = extract_layer_index(layer.layer_name)
        return self.layer_index

    def _arena(self, kv_cache: torch.Tensor) -> CacheArena:
        if self.arena is None:
            layout = layout_for(self.options, self.dtype, kv_cache.shape[2])
            key = (kv_cache.untyped_storage().data_ptr(), id(layout))
            if key not in _arenas:
                from vllm.forward_context import get_forward_context
                from vllm.model_executor.models.utils import extract_layer_index

                layers = {extract_layer_index(name): module
                          for name, module in get_forward_context().no_compile_layers.items()
                          if isinstance(getattr(module, "impl", None), FourierImpl)}
                views = [layers[i].kv_cache for i in sorted(layers)]
                if sorted(layers) != list(range(len(layers))):
                    raise KvfoldConfigError(f"{NAME}: attention layers {sorted(layers)} are not "
                                            f"0..{len(layers) - 1}; the dims file indexes layers so")
                _arenas[key] = CacheArena(views, layout)
            self.arena = _arenas[key]
        return self.arena

    def attend(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: PagedMetadata,
        output: torch.Tensor,
    ) -> None:
        self.tables = attend_step(
            self._arena(kv_cache), self._layer(layer), self.tables, query, key, value,
            metadata.block_table, list(metadata.requests()), output, scale=self.scale, window=self.window,
            graphed=self.graphed)


class FourierBackend(KvfoldBackend):
    options_model = FourierOptions
    forward_includes_kv_cache_update = True  # writes need positions, reserved blocks and the past
    supported_kv_cache_dtypes = ["auto"]
    prefix_caching_refusal = (
        "keeps per-request spectral coefficients of the whole middle, which prefix caching cannot share"
    )

    @staticmethod
    def get_name() -> str:
        return NAME

    @staticmethod
    def get_impl_cls() -> type[FourierImpl]:
        return FourierImpl

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        if isinstance(spec, ReservedBlocksSpec):
            return spec  # vLLM may call this more than once
        layout = layout_for(spec_options(NAME), spec.dtype, spec.block_size)
        return reserved_spec(spec, reserved_blocks=layout.reserved_blocks,
                             state_content_bytes=layout.cell_bytes, num_head_slots=1)

    @classmethod
    def check_vllm_config(cls, options: FourierOptions, vllm_config: VllmConfig) -> None:
        parallel = vllm_config.parallel_config
        if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
            raise KvfoldConfigError(
                f"{NAME} runs with tensor and pipeline parallel size 1 (its layout places every "
                "layer's heads in one allocation; sharding it per rank is not implemented)")
        if vllm_config.speculative_config is not None:
            raise KvfoldConfigError(f"{NAME} does not support speculative decoding (rejected draft "
                                    "tokens would already be in the coefficients)")
        model = vllm_config.model_config
        dims = dims_at(options.dims)
        layers = model.get_num_layers(parallel)
        found = (dims.num_layers, dims.num_kv_heads, dims.head_size)
        wanted = (layers, model.get_total_num_kv_heads(), model.get_head_size())
        if found != wanted:
            raise KvfoldConfigError(
                f"{NAME}: dims at {options.dims} are for {found[0]} layers, {found[1]} KV heads and "
                f"head size {found[2]}; {model.model} has {wanted[0]}, {wanted[1]} and {wanted[2]}: "
                "run `kvfold calibrate fourier` for this model")
        if len(dims.layers) != dims.num_layers:
            raise KvfoldConfigError(f"{NAME}: dims at {options.dims} list {len(dims.layers)} of "
                                    f"{dims.num_layers} layers")
        for i, layer in enumerate(dims.layers):
            for kind, heads, size in (("key", layer.key_dims, dims.head_size),
                                      ("value", layer.value_dims, dims.head_size_v)):
                if len(heads) != dims.num_kv_heads or any(
                        len(set(h)) != len(h) or not all(0 <= d < size for d in h) for h in heads):
                    raise KvfoldConfigError(f"{NAME}: dims at {options.dims}: layer {i}'s {kind} dims "
                                            f"are not {dims.num_kv_heads} lists of distinct dims < {size}")
        sink, recent, freqs = settings(options)
        max_len = model.max_model_len
        if sink + recent + 2 * freqs >= max_len:
            raise KvfoldConfigError(
                f"{NAME}: sink {sink} + recent {recent} + 2 x {freqs} frequencies >= max model length "
                f"{max_len}: a request's middle would never outgrow its {2 * freqs} coefficient rows, "
                "so nothing would be compressed (use the dense backend, or fewer frequencies)")
        window = window_for(options, max_len)
        if window < max_len - sink - recent:
            raise KvfoldConfigError(
                f"{NAME}: window {window} is shorter than the longest middle ({max_len - sink - recent} "
                "tokens at this max model length): the basis would repeat and alias old tokens")
