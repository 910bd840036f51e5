"""Where FourierAttention keeps each layer's data in vLLM's KV cache.

vLLM 0.32 gives every attention layer of a model the same page (``customize_spec`` is not told which
layer it shapes) and views all layers' pages in one backing allocation. The paper's schedule keeps
very different shares of dims per layer (Llama-3.1-8B: 10% of K in layers 0-3, 50% in layers
20-27), so a page as wide as the widest layer would leave most of the others' cells empty (at 32k
tokens, 1.9x less capacity than this layout). Instead the cells of one token slot over all layers
are one row: each (layer, KV head, K or V) **kept segment** sits whole in one layer's cell
(first-fit decreasing), so a slot holds the kept dims of every layer with at most a few bytes of
slack per layer.

The fixed per-request state is placed the same way. A request owns ``reserved_blocks`` blocks
(columns ``0 .. R - 1`` of its block-table row, :mod:`kvfold.attention_backends.paged.reserved`)
in every layer view: ``layers x R`` pages of ``page_bytes``; arena page ``a`` is column ``a % R`` of
the view of layer ``a // R``. Each (layer, KV head, K or V) with compressed dims has two **items**,
each on whole pages, no row across a page boundary:

* coefficients: ``2k`` rows of the compressed dims (float32, as the authors keep them) followed by
  the 5 normalisation rows ``sum, min, max`` (running, over the original middle) and
  ``scale, offset`` (the fitted affine map). Until the first compression the coefficient rows
  are not needed and hold the exact middle instead (at most ``2k`` tokens in the model dtype, two
  per row for 16-bit models): the pre-compression middle costs no memory of its own;
* the exact ring: ``sink + recent`` rows of the compressed dims in the model dtype, for the sink
  and the recent window (kept dims are always in the token's own slot).

For Llama-3.1-8B's shape with the paper's settings that is ~9.6 MiB per layer and request, the
size of 2,400 dense bf16 tokens; at 32k tokens a request holds ~3.2x fewer bytes than dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvfold.attention_backends.fourier.reference import complement

KINDS = ("k", "v")
STAT_ROWS = ("sum", "min", "max", "scale", "offset")
ALIGN = 16  # cell bytes: keeps every page, fp32 row and vector load aligned


@dataclass(frozen=True)
class Segment:
    """A head's kept dims in every token slot: ``width`` elements at byte ``offset`` of ``view``'s cell."""

    view: int
    offset: int
    width: int


@dataclass(frozen=True)
class Item:
    """A per-request state matrix ``[rows, width]`` on pages ``first_page ..`` of the arena."""

    first_page: int
    rows: int
    width: int
    row_bytes: int
    rows_per_page: int

    @property
    def pages(self) -> int:
        return -(-self.rows // self.rows_per_page)


class FourierLayout:
    """The placement for one model: ``key_dims[layer][head]`` / ``value_dims`` are compressed."""

    def __init__(
        self,
        key_dims: list[list[torch.Tensor]],
        value_dims: list[list[torch.Tensor]],
        *,
        head_size: int,
        head_size_v: int,
        dtype: torch.dtype,
        block_size: int,
        sink: int,
        recent: int,
        freqs: int,
    ) -> None:
        self.num_layers = len(key_dims)
        self.num_kv_heads = len(key_dims[0])
        self.head_size, self.head_size_v, self.dtype = head_size, head_size_v, dtype
        self.elem = dtype.itemsize
        self.block_size, self.sink, self.recent, self.freqs = block_size, sink, recent, freqs
        sizes = {"k": head_size, "v": head_size_v}
        self.compressed = [{"k": [d.long() for d in kd], "v": [d.long() for d in vd]}
                           for kd, vd in zip(key_dims, value_dims)]
        self.kept = [{kind: [complement(d, sizes[kind]) for d in layer[kind]] for kind in KINDS}
                     for layer in self.compressed]
        self._dims_on: dict[str, tuple] = {}

        coef_rows, ring_rows = 2 * freqs + len(STAT_ROWS), self.ring_entries
        rows = [(4 * d.numel(), coef_rows) for layer in self.compressed for kind in KINDS
                for d in layer[kind] if d.numel()]
        rows += [(self.elem * d.numel(), ring_rows) for layer in self.compressed for kind in KINDS
                 for d in layer[kind] if d.numel()]
        widest_row = max((b for b, _ in rows), default=0)
        self.cell_bytes, placed = self._pack_cells(-(-widest_row // block_size))
        self.segments = [{kind: [placed[(layer, kind, h)] for h in range(self.num_kv_heads)]
                          for kind in KINDS} for layer in range(self.num_layers)]
        self.page_bytes = block_size * self.cell_bytes

        self.coef: list[dict[str, list[Item | None]]] = []
        self.ring: list[dict[str, list[Item | None]]] = []
        page = 0
        for layer in self.compressed:
            coef, ring = {}, {}
            for kind in KINDS:
                coef[kind], ring[kind] = [], []
                for dims in layer[kind]:
                    for items, nrows, itemsize in ((coef, coef_rows, 4), (ring, ring_rows, self.elem)):
                        if not dims.numel():
                            items[kind].append(None)
                            continue
                        row_bytes = itemsize * dims.numel()
                        item = Item(page, nrows, dims.numel(), row_bytes, self.page_bytes // row_bytes)
                        items[kind].append(item)
                        page += item.pages
            self.coef.append(coef)
            self.ring.append(ring)
        self.arena_pages = page
        self.reserved_blocks = max(1, -(-page // self.num_layers))

    def dims_on(self, device: torch.device) -> tuple[list[dict[str, list[torch.Tensor]]],
                                                      list[dict[str, list[torch.Tensor]]]]:
        """``(kept, compressed)`` as index tensors on ``device``, made once: indexing a GPU tensor
        with host indices copies them over and waits for the GPU, several times per head and layer."""
        cached = self._dims_on.get(str(device))
        if cached is None:
            def moved(table: list[dict[str, list[torch.Tensor]]]) -> list[dict[str, list[torch.Tensor]]]:
                return [{kind: [d.to(device) for d in layer[kind]] for kind in KINDS} for layer in table]

            cached = self._dims_on[str(device)] = (moved(self.kept), moved(self.compressed))
        return cached

    @property
    def ring_entries(self) -> int:
        return self.sink + self.recent

    @property
    def middle_per_row(self) -> int:
        """Exact middle tokens stored in one float32 coefficient row before the first compression."""
        return 4 // self.elem

    def _pack_cells(self, least: int) -> tuple[int, dict[tuple[int, str, int], Segment]]:
        """The narrowest aligned cell into whose ``layers`` copies every kept segment fits whole."""
        widths = {(layer, kind, h): self.elem * dims.numel()
                  for layer, kinds in enumerate(self.kept) for kind in KINDS
                  for h, dims in enumerate(kinds[kind])}
        total, widest = sum(widths.values()), max(widths.values())
        cell = max(least, widest, -(-total // self.num_layers), 1)
        cell = -(-cell // ALIGN) * ALIGN
        order = sorted(widths, key=lambda key: (-widths[key], key))
        while True:
            used = [0] * self.num_layers
            placed = {}
            for key in order:
                view = next((j for j in range(self.num_layers) if used[j] + widths[key] <= cell), None)
                if view is None:
                    break
                placed[key] = Segment(view, used[view], widths[key] // self.elem)
                used[view] += widths[key]
            else:
                return cell, placed
            cell += ALIGN

    def ring_index(self, positions: torch.Tensor) -> torch.Tensor:
        """Ring row of each sink or recent position: sinks first, then the recent window cyclically."""
        return torch.where(positions < self.sink, positions, self.sink + (positions - self.sink) % self.recent)

    def middle_length(self, n: torch.Tensor | int):
        """Middle tokens of requests holding ``n`` tokens."""
        if isinstance(n, int):
            return max(0, n - self.sink - self.recent)
        return (n - self.sink - self.recent).clamp(min=0)

    def is_compressed(self, n: torch.Tensor | int):
        """Whether a request holding ``n`` tokens has its middle as coefficients."""
        return self.middle_length(n) > 2 * self.freqs

    @property
    def dense_cell_bytes(self) -> int:
        """What vLLM's standard page stores per token slot and layer, for comparison."""
        return self.num_kv_heads * (self.head_size + self.head_size_v) * self.elem

    def bytes_per_request(self, tokens: int) -> int:
        """KV-cache bytes (all layers) a request of ``tokens`` tokens holds, reserved blocks included."""
        blocks = -(-tokens // self.block_size) + self.reserved_blocks
        return blocks * self.page_bytes * self.num_layers
