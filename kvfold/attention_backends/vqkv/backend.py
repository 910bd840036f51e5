"""KVFOLD_VQKV on vLLM: every token's K/V stored as one-byte codebook indices, sink/recent kept exact.

Accounting: ``customize_spec`` shrinks the cell of a (token, KV head) from ``2 * head_size`` model
values to ``num_codes`` bytes and adds the blocks each request needs for its exact tokens
(:mod:`spec`), so vLLM's own capacity line, admission and max concurrency reflect the compression.
A step attends first (codes of older tokens, exact sink/recent ring, the step's own tokens exactly)
and then encodes its tokens into the cache (``forward_includes_kv_cache_update``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch
from vllm.v1.attention.backend import AttentionLayer
from vllm.v1.kv_cache_interface import AttentionSpec

from kvfold.attention_backends.paged.attention import prefill_attention
from kvfold.attention_backends.paged.backend import KvfoldBackend, KvfoldImpl, spec_options
from kvfold.attention_backends.paged.graphs import GraphedStep, bucket, kv_cache_key
from kvfold.attention_backends.paged.metadata import PagedMetadata
from kvfold.attention_backends.paged.transfer import to_device
from kvfold.attention_backends.paged.reserved import ReservedBlocksSpec, reserved_spec
from kvfold.attention_backends.vqkv import codebooks as files
from kvfold.attention_backends.vqkv import past, ring
from kvfold.attention_backends.vqkv.decode import decode_step
from kvfold.attention_backends.vqkv.options import VQKVOptions
from kvfold.attention_backends.vqkv.pages import PageLayout, write_cells
from kvfold.attention_backends.vqkv.encode import encode, encode_into
from kvfold.attention_backends.vqkv.kernels import triton_enabled
from kvfold.attention_backends.vqkv.reference import LayerCodebooks, ResidualCodebook
from kvfold.options import KvfoldConfigError

if TYPE_CHECKING:
    from vllm.config import VllmConfig

NAME = "KVFOLD_VQKV"
# The decode kernel's longest range is rounded up to a multiple of this (empty splits cost little),
# so a decode step's CUDA graph serves this many steps of growth.
LONGEST_STEP = 1024
# Block-table rows are padded to a multiple of this many columns for the same reason.
TABLE_COLUMNS = 64


@lru_cache(maxsize=8)
def manifest_at(directory: str) -> files.CodebookManifest:
    try:
        return files.read_manifest(directory)
    except FileNotFoundError as exc:
        raise KvfoldConfigError(f"{NAME}: {exc}") from None


def codebook_bytes(manifest: files.CodebookManifest) -> int:
    """float32 codebooks of one layer, as held on the device."""
    m = manifest
    # Key branches split D dims; value groups split Dv dims: every stage covers its dims once.
    floats = m.codebook_size * (m.key_stages * m.head_size + m.value_stages * m.head_size_v)
    return 4 * floats


# Temporary bytes of a prefill chunk's rebuild of one request's past, per (cached token x KV head x
# head dim), on the torch path: codes and bag indices (int64), float32 K/V, their concatenation with
# the chunk and the 16-bit copies flash attention reads. torch's profiler on CPU at 8B shape, 4k and
# 8k tokens: 58-62. The Triton path (``past.py``) holds only the model-dtype K/V flash attention reads.
PREFILL_BYTES_PER_ELEMENT = 64

class VQKVImpl(KvfoldImpl):
    method_name = NAME
    options_model = VQKVOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from vllm.config import get_current_vllm_config

        model = get_current_vllm_config().model_config
        self.dtype = model.dtype
        self.max_model_len = model.max_model_len
        self.manifest = manifest_at(self.options.codebooks)
        if (self.manifest.head_size, self.manifest.head_size_v) != (self.head_size, self.head_size):
            raise KvfoldConfigError(
                f"{NAME}: codebooks at {self.options.codebooks} are for head size "
                f"{self.manifest.head_size}, this model's is {self.head_size}"
            )
        self._books: LayerCodebooks | None = None
        self._layout: PageLayout | None = None
        self._step: tuple[torch.Tensor, PageLayout, LayerCodebooks] | None = None  # read by _decode
        self._graphed_decode = GraphedStep(self._decode, on_memory=self.metrics.cuda_graph_bytes)

    def state_bytes(self) -> int:
        return codebook_bytes(self.manifest)

    def profile_scratch_bytes(self) -> int:
        # Reserved on CUDA only, where 16-bit models with even code counts take past.py's path.
        per_element = PREFILL_BYTES_PER_ELEMENT
        if self.dtype.itemsize == 2 and self.manifest.num_codes % 2 == 0:
            per_element = 2 * self.dtype.itemsize
        return per_element * self.max_model_len * self.num_kv_heads * self.head_size

    def _layer_books(self, layer: AttentionLayer, device: torch.device) -> LayerCodebooks:
        if self._books is None:
            from vllm.model_executor.models.utils import extract_layer_index

            index = extract_layer_index(layer.layer_name)
            books = files.load_layer(self.options.codebooks, index, self.manifest)

            def moved(book: ResidualCodebook) -> ResidualCodebook:
                return ResidualCodebook(book.dims.to(device), book.codewords.to(device, torch.float32))

            self._books = LayerCodebooks(
                books.head_size, books.head_size_v, [moved(b) for b in books.key],
                [moved(b) for b in books.value],
            )
        return self._books

    def _page_layout(self, kv_cache: torch.Tensor) -> PageLayout:
        if self._layout is None:
            self._layout = PageLayout(
                num_codes=self.manifest.num_codes,
                head_size=self.head_size,
                head_size_v=self.head_size,
                dtype=self.dtype,
                sink=self.options.sink,
                recent=self.options.recent,
                block_size=kv_cache.shape[2],
            )
        return self._layout

    def _decode(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, table: torch.Tensor,
                seq_lens: torch.Tensor, written: torch.Tensor, *, longest: int,
                write: bool) -> tuple[torch.Tensor]:
        """The graphed part of a step's decoding: :func:`decode.decode_step` on this step's cache,
        then, with ``write``, the new tokens' codes and ring entries (request ``i`` of the batch at
        ``written[i]``, negative for the padding). The write follows the attention: the new token
        may take the ring entry of a position this step still reads."""
        kv_cache, layout, books = self._step
        out = decode_step(query, key, value, kv_cache, table, seq_lens, layout, books, self.scale,
                          longest=longest)
        if write:
            batch = torch.arange(query.shape[0], device=query.device)
            encode_into(kv_cache, table, batch, written, layout.reserved_blocks, key, value, books)
            ring.write_ring(kv_cache, table, batch, written, batch, key, value, layout)
        return (out,)

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
        layout = self._page_layout(kv_cache)
        books = self._layer_books(layer, query.device)
        decode = decode_batch(metadata, layout, query.device)
        # Decode tokens are written inside the decode graph: eagerly, the write's three launches
        # cost ~0.19 ms of host time per layer on an H100, 3x the graphed attention at one request.
        # Prefill chunks' tokens are written after their attention, below.
        written_in_graph = (decode is not None and triton_enabled(key.device)
                            and ring.usable(key, kv_cache, layout))
        if decode is not None:
            rows, starts, seq_lens, written, longest, num = decode
            self._step = (kv_cache, layout, books)
            (out,) = self._graphed_decode(
                kv_cache_key(kv_cache), query[starts], key[starts], value[starts],
                padded_table(metadata.block_table[rows]), seq_lens, written, longest=longest,
                write=written_in_graph,
            )
            output[starts[:num]] = out[:num].to(output.dtype)
        if written_in_graph and decode[-1] == metadata.num_actual_tokens:
            return
        fast_past = triton_enabled(query.device) and past.usable(kv_cache, layout, key.dtype)
        for i, start, end, seq_len in metadata.requests():
            if end - start == 1:
                continue
            computed = seq_len - (end - start)
            if fast_past:
                k = key.new_empty(seq_len, *key.shape[1:])
                v = value.new_empty(seq_len, *value.shape[1:])
                past.past_into(kv_cache, metadata.block_table[i], computed, layout, books, k, v)
                k[computed:], v[computed:] = key[start:end], value[start:end]
                output[start:end] = prefill_attention(query[start:end], k, v, self.scale, computed).to(output.dtype)
                del k, v
                continue
            past_k, past_v = past.read_past(kv_cache, metadata.block_table[i], computed, layout, books)
            k = torch.cat([past_k, key[start:end].float()])
            v = torch.cat([past_v, value[start:end].float()])
            del past_k, past_v  # the peak is what profile_scratch_bytes reserves
            out = prefill_attention(query[start:end], k, v, self.scale, computed)
            output[start:end] = out.to(output.dtype)
            del k, v, out
        tokens = step_tokens(metadata, query.device, without_decodes=written_in_graph)
        write_step(kv_cache, key, value, tokens, metadata, layout, books)


def decode_batch(
    metadata: PagedMetadata, layout: PageLayout, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int] | None:
    """(rows, first query token, KV length, position of the new token, longest coded range, number
    of requests) of the step's decoding requests, built on the host once per step for all layers
    (no device syncs), or None without any.

    The batch is padded (``graphs.bucket``) with requests of one token, no history, row 0 and
    position -1 (not written), and the longest range rounded up to whole tiles of
    :data:`LONGEST_STEP`, so that most steps have the shapes of an earlier one and replay its CUDA
    graph."""
    if "vqkv_decode" not in metadata.scratch:
        decoding = [i for i, start, end, _ in metadata.requests() if end - start == 1]
        batch = None
        if decoding:
            seq_lens = metadata.seq_lens_cpu[decoding]
            computed = seq_lens - 1
            coded = computed - layout.recent - computed.clamp(max=layout.sink)
            longest = -(-max(int(coded.max()), 0) // LONGEST_STEP) * LONGEST_STEP
            pad = bucket(len(decoding)) - len(decoding)
            batch = (to_device(torch.tensor(decoding + [0] * pad), device),
                     to_device(torch.cat([metadata.query_start_loc_cpu[decoding],
                                          torch.zeros(pad, dtype=torch.long)]), device),
                     to_device(torch.cat([seq_lens, torch.ones(pad, dtype=seq_lens.dtype)]), device),
                     to_device(torch.cat([computed, torch.full((pad,), -1, dtype=computed.dtype)]), device),
                     longest, len(decoding))
        metadata.scratch["vqkv_decode"] = batch
    return metadata.scratch["vqkv_decode"]


def padded_table(table: torch.Tensor, columns: int = TABLE_COLUMNS) -> torch.Tensor:
    """Block-table rows widened with null blocks to a multiple of ``columns``: vLLM hands over as
    many columns as the step's longest request needs, which would make a new graph every block."""
    return torch.nn.functional.pad(table, (0, -table.shape[1] % columns))


def step_tokens(metadata: PagedMetadata, device: torch.device,
                without_decodes: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(request index, position) of each of the step's tokens, built once per step for all layers.
    ``without_decodes``: the decode tokens (written by the decode graph) at position -1, which
    the Triton writes skip."""
    name = "vqkv_prefill_tokens" if without_decodes else "vqkv_tokens"
    cached = metadata.scratch.get(name)
    if cached is None:
        request, positions = _host_tokens(metadata)
        if without_decodes:
            decoding = metadata.query_start_loc_cpu.diff() == 1
            positions = positions.masked_fill(decoding[request], -1)
        cached = (to_device(request, device), to_device(positions, device))
        metadata.scratch[name] = cached
    return cached


def _host_tokens(metadata: PagedMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    counts = metadata.query_start_loc_cpu.diff()
    request = torch.repeat_interleave(torch.arange(metadata.num_reqs), counts)
    offset = torch.arange(metadata.num_actual_tokens) - metadata.query_start_loc_cpu[request]
    computed = metadata.seq_lens_cpu - counts
    return request, computed[request] + offset


def kept_tokens(metadata: PagedMetadata, layout: PageLayout, device: torch.device) -> torch.Tensor:
    """Indices of the step's tokens the ring keeps exact, found on the host once per step."""
    cached = metadata.scratch.get("vqkv_kept")
    if cached is None:
        request, positions = _host_tokens(metadata)
        kept = layout.is_kept_exact(positions, metadata.seq_lens_cpu[request]).nonzero().flatten()
        cached = metadata.scratch["vqkv_kept"] = to_device(kept, device)
    return cached


def write_step(
    cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    tokens: tuple[torch.Tensor, torch.Tensor],
    metadata: PagedMetadata,
    layout: PageLayout,
    books: LayerCodebooks,
) -> None:
    """Codes of every new token; exact copies of the ones the ring keeps. On the Triton path a
    token at a negative position (``step_tokens(without_decodes=True)``) is not written."""
    request, positions = tokens
    kept = kept_tokens(metadata, layout, key.device)
    if triton_enabled(key.device) and ring.usable(key, cache, layout):
        # Three launches straight into the cells: in an eager decode step the torch version's ~20
        # ops cost ~1 ms of host time per layer, more than the attention.
        table = metadata.block_table if metadata.block_table.stride(-1) == 1 else metadata.block_table.contiguous()
        encode_into(cache, table, request, positions, layout.reserved_blocks, key, value, books)
        ring.write_ring(cache, table, request, positions, kept, key, value, layout)
        return
    rows = metadata.block_table[request]
    blocks, slots = layout.code_cells(rows, positions)
    write_cells(cache, blocks, slots, encode(key, value, books))
    if layout.ring_entries and kept.numel():
        blocks, slots = layout.ring_cells(rows[kept], layout.ring_index(positions[kept]))
        write_cells(cache, blocks, slots, layout.pack_exact(key[kept], value[kept]))


class VQKVBackend(KvfoldBackend):
    options_model = VQKVOptions
    forward_includes_kv_cache_update = True  # writes need positions and the reserved-block offset
    supported_kv_cache_dtypes = ["auto"]
    prefix_caching_refusal = (
        "keeps each request's exact recent tokens in blocks of its own, which prefix caching cannot share"
    )

    @staticmethod
    def get_name() -> str:
        return NAME

    @staticmethod
    def get_impl_cls() -> type[VQKVImpl]:
        return VQKVImpl

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        if isinstance(spec, ReservedBlocksSpec):
            return spec  # vLLM may call this more than once
        options = spec_options(NAME)
        manifest = manifest_at(options.codebooks)
        layout = PageLayout(
            num_codes=manifest.num_codes,
            head_size=spec.head_size,
            head_size_v=spec.head_size_v,
            dtype=spec.dtype,
            sink=options.sink,
            recent=options.recent,
            block_size=spec.block_size,
        )
        return reserved_spec(spec, reserved_blocks=layout.reserved_blocks,
                             state_content_bytes=manifest.num_codes)

    @classmethod
    def check_vllm_config(cls, options: VQKVOptions, vllm_config: VllmConfig) -> None:
        if vllm_config.speculative_config is not None:
            raise KvfoldConfigError(f"{NAME} does not support speculative decoding (rejected "
                                    "draft tokens would stay in the exact ring)")
        model = vllm_config.model_config
        max_len = model.max_model_len
        if options.sink + options.recent >= max_len:
            raise KvfoldConfigError(
                f"{NAME}: sink {options.sink} + recent {options.recent} >= max model length "
                f"{max_len}; nothing would be quantized (use the dense backend)"
            )
        manifest = manifest_at(options.codebooks)
        head_size = model.get_head_size()
        layers = model.get_num_layers(vllm_config.parallel_config)
        found = (manifest.num_layers, manifest.head_size, manifest.head_size_v)
        if found != (layers, head_size, head_size):
            raise KvfoldConfigError(
                f"{NAME}: codebooks at {options.codebooks} are for {manifest.num_layers} layers "
                f"and head size {manifest.head_size}/{manifest.head_size_v}; {model.model} has "
                f"{layers} layers and head size {head_size}"
            )
        missing = files.missing_layers(options.codebooks, manifest)
        if missing:
            raise KvfoldConfigError(
                f"{NAME}: codebooks at {options.codebooks} lack layers {missing[:8]}"
                f"{'...' if len(missing) > 8 else ''}: rerun `kvfold calibrate vqkv` to finish them"
            )
