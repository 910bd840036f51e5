"""One layer's FourierAttention step over a batch of requests, independent of vLLM's classes.

Order (the semantics of :mod:`stream`): prefill chunks attend to the cache as it was plus themselves
exactly (the past rebuilt for all heads at once, :mod:`rebuild`); then every request's tokens enter
the cache (all heads at once, :mod:`write`); then decoding tokens attend to the cache that now holds them. Decoding runs through the
Triton kernels where Triton runs (:mod:`decode`, in groups of bounded scratch), else through the
torch rebuild (:func:`paged.visible`), which is the specification's arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from kvfold.attention_backends.fourier.arena import CacheArena
from kvfold.attention_backends.fourier.decode import HeadTables, decode_core, plan_step, write_alone
from kvfold.attention_backends.fourier.kernels import triton_enabled
from kvfold.attention_backends.fourier.paged import visible
from kvfold.attention_backends.fourier.rebuild import visible_heads
from kvfold.attention_backends.fourier.write import write_heads
from kvfold.attention_backends.paged.attention import causal_gqa_attention, prefill_attention
from kvfold.attention_backends.paged.graphs import GraphedStep, bucket, kv_cache_key
from kvfold.attention_backends.paged.transfer import to_device


# A decode step allocates float32 scratch of [requests, query heads, longest request] several times
# over (spectral scores, exported probabilities and their rescaling: at most 6 live at once).
# vLLM's profiling run, where nothing is cached, never sees it, so it is bounded here: decoding
# requests go through the kernels in groups whose scratch stays under SCRATCH_BYTES.
SCRATCH_BUFFERS = 6
SCRATCH_BYTES = 512 << 20


def decode_groups(
    decode: Sequence[tuple[int, int, int]], num_heads: int, limit: int | None = None
) -> list[list[tuple[int, int, int]]]:
    """``decode`` = ``(row, query token, KV length)`` split into groups whose step scratch fits
    ``limit`` bytes (:data:`SCRATCH_BYTES`), longest requests first so lengths in a group are alike;
    a request too long for the limit alone still gets a group of its own."""
    limit = SCRATCH_BYTES if limit is None else limit
    groups: list[list[tuple[int, int, int]]] = []
    for item in sorted(decode, key=lambda d: -d[2]):
        if groups:
            longest = -(-groups[-1][0][2] // 64) * 64  # the group's first is its longest
            if (len(groups[-1]) + 1) * num_heads * longest * 4 * SCRATCH_BUFFERS <= limit:
                groups[-1].append(item)
                continue
        groups.append([item])
    return groups


# Block-table rows are padded to a multiple of this many columns: vLLM hands over as many columns
# as the step's longest request needs, which would make a new CUDA graph every block.
TABLE_COLUMNS = 64


class GraphedDecode:
    """One layer's :func:`decode.decode_core` replayed as CUDA graphs (``paged.graphs``): its
    hundreds of small operations otherwise cost milliseconds of host time per layer and step."""

    def __init__(self, on_memory: Callable[[int], None] | None = None) -> None:
        self.graphed = GraphedStep(self._core, on_memory=on_memory)
        self._bound: tuple | None = None

    def _core(self, *inputs: torch.Tensor, **static: int) -> tuple[torch.Tensor]:
        arena, tables, layer, scale, window = self._bound
        return (decode_core(arena, tables, layer, *inputs, scale=scale, window=window, **static),)

    def __call__(self, arena: CacheArena, tables: HeadTables, layer: int, inputs: Sequence[torch.Tensor], *,
                 scale: float, window: int, static: dict[str, int]) -> torch.Tensor:
        # A graph records the arena's and tables' addresses: both live as long as the engine.
        self._bound = (arena, tables, layer, scale, window)
        return self.graphed(kv_cache_key(arena.bytes), *inputs, **static)[0]


def attend_step(
    arena: CacheArena,
    layer: int,
    tables: HeadTables | None,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_table: torch.Tensor,
    requests: Sequence[tuple[int, int, int, int]],
    output: torch.Tensor,
    *,
    scale: float,
    window: int,
    graphed: GraphedDecode | None = None,
) -> HeadTables | None:
    """Attend ``requests`` = ``(row, first query token, end query token, KV length after the step)``
    and store their tokens; returns the layer's head tables (built on first use). With ``graphed``
    the decoding requests run as a padded batch replayed as a CUDA graph (on CUDA)."""
    for i, start, end, seq_len in requests:
        if end - start > 1:
            past = seq_len - (end - start)
            tables = tables or HeadTables.build(arena, layer)
            k, v = visible_heads(arena, tables, block_table[i], past, window)
            k = torch.cat([k, key[start:end].float()])
            v = torch.cat([v, value[start:end].float()])
            out = prefill_attention(query[start:end], k.to(query.dtype), v.to(query.dtype), scale, past)
            output[start:end] = out.to(output.dtype)
            del k, v, out  # one request's rebuild at a time: what the backend's profile reserves
    fast = triton_enabled(query.device)
    for i, start, end, seq_len in requests:
        if end - start > 1 or not fast:
            tables = tables or HeadTables.build(arena, layer)
            write_heads(arena, tables, block_table[i], key[start:end], value[start:end],
                        seq_len - (end - start), prefill=end - start > 1, window=window)
    decode = [(i, start, seq_len) for i, start, end, seq_len in requests if end - start == 1]
    for group in decode_groups(decode, query.shape[1]) if fast else ():
        tables = tables or HeadTables.build(arena, layer)
        num = len(group)
        padded = bucket(num) if graphed is not None else None
        pad = (padded or num) - num
        seq_lens = [n for _, _, n in group]
        plan = plan_step(arena.layout, seq_lens, window, padded)
        # Padding requests repeat the first one's rows for reads; they write nothing.
        rows = to_device(torch.tensor([i for i, _, _ in group] + [group[0][0]] * pad), query.device)
        starts = to_device(torch.tensor([s for _, s, _ in group] + [group[0][1]] * pad), query.device)
        table = block_table[rows]
        if graphed is not None:
            table = torch.nn.functional.pad(table, (0, -table.shape[1] % TABLE_COLUMNS))
        q, k, v = query[starts], key[starts], value[starts]
        write_alone(arena, tables, plan, table, k, v, seq_lens, window)
        inputs = (q, k, v, table, to_device(plan.per_request, query.device))
        if graphed is None:
            out = decode_core(arena, tables, layer, *inputs, scale=scale, window=window, **plan.static)
        else:
            out = graphed(arena, tables, layer, inputs, scale=scale, window=window, static=plan.static)
        output[starts[:num]] = out[:num].to(output.dtype)
    for i, start, seq_len in decode if not fast else ():
        k, v = visible(arena, layer, block_table[i], seq_len, window)
        out = causal_gqa_attention(query[start : start + 1], k, v, scale, seq_len - 1)
        output[start : start + 1] = out.to(output.dtype)
    return tables
