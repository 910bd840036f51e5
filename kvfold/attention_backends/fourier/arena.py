"""Reads and writes of FourierAttention's data in vLLM's KV-cache allocation (see :mod:`layout`).

vLLM 0.32 views every layer's cache in one backing buffer, so one flat view of that buffer plus each
layer view's byte offset addresses any layer's cells: a layer can keep data in another layer's
cells. Token cells are addressed through the request's block-table row (position ``p`` at column
``reserved_blocks + p // block_size``, slot ``p % block_size``), state rows through its reserved
columns. Everything here is index arithmetic plus one gather or scatter per call, on any device.
"""

from __future__ import annotations

import torch

from kvfold.attention_backends.fourier.layout import FourierLayout, Item
from kvfold.errors import KvfoldConfigError


class CacheArena:
    """The layer views ``views[layer]`` (``[blocks, 1, block_size, cell_bytes]`` uint8) as one arena."""

    def __init__(self, views: list[torch.Tensor], layout: FourierLayout) -> None:
        if len(views) != layout.num_layers:
            raise KvfoldConfigError(f"KVFOLD_FOURIER: {len(views)} attention layers hold a cache, "
                                    f"the dims file describes {layout.num_layers}")
        first = views[0]
        storage = first.untyped_storage()
        for view in views:
            if view.untyped_storage().data_ptr() != storage.data_ptr() or view.stride() != first.stride():
                raise KvfoldConfigError("KVFOLD_FOURIER needs every layer's KV cache in one allocation "
                                        "with one layout (vLLM 0.32's allocator does this)")
        if first.dtype != torch.uint8 or first.shape[1] != 1 or first.shape[3] != layout.cell_bytes:
            raise KvfoldConfigError(f"KVFOLD_FOURIER: unexpected cache view {tuple(first.shape)} "
                                    f"{first.dtype}, expected cells of {layout.cell_bytes} bytes")
        self.layout = layout
        self.num_blocks = first.shape[0]
        self.bytes = torch.empty(0, dtype=torch.uint8, device=first.device).set_(
            storage, 0, (storage.nbytes(),), (1,))
        self.base = torch.tensor([v.storage_offset() for v in views], device=first.device)
        self.block_stride, self.slot_stride = first.stride(0), first.stride(2)
        if first.stride(3) != 1 or any(x % 16 for x in (self.block_stride, self.slot_stride,
                                                          *self.base.tolist())):
            raise KvfoldConfigError("KVFOLD_FOURIER: the KV-cache views are not 16-byte aligned")
        self._typed: dict[torch.dtype, torch.Tensor] = {}

    def typed(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole allocation as a flat ``dtype`` tensor (addresses divided by its item size)."""
        if dtype not in self._typed:
            usable = self.bytes.numel() // dtype.itemsize * dtype.itemsize
            self._typed[dtype] = self.bytes[:usable].view(dtype)
        return self._typed[dtype]

    # ---- token cells -------------------------------------------------------------------------
    def slot_bytes(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Byte address (within a view) of each position's slot; ``rows`` are block-table rows."""
        layout = self.layout
        column = layout.reserved_blocks + positions // layout.block_size
        blocks = rows.gather(-1, column.unsqueeze(-1)).squeeze(-1).long()
        return blocks * self.block_stride + (positions % layout.block_size) * self.slot_stride

    def kept_offsets(self, layer: int, kind: str, head: int) -> torch.Tensor:
        """Element offsets (model dtype) of a head's kept dims relative to a slot's byte address."""
        seg = self.layout.segments[layer][kind][head]
        start = (self.base[seg.view] + seg.offset) // self.layout.elem
        return start + torch.arange(seg.width, device=self.base.device)

    def read_kept(self, layer: int, kind: str, head: int, slots: torch.Tensor) -> torch.Tensor:
        """``[..., width]`` kept dims of a head at slot addresses ``slots`` (from :meth:`slot_bytes`)."""
        flat = self.typed(self.layout.dtype)
        return flat[(slots // self.layout.elem).unsqueeze(-1) + self.kept_offsets(layer, kind, head)]

    def write_kept(self, layer: int, kind: str, head: int, slots: torch.Tensor, values: torch.Tensor) -> None:
        flat = self.typed(self.layout.dtype)
        flat[(slots // self.layout.elem).unsqueeze(-1) + self.kept_offsets(layer, kind, head)] = \
            values.to(flat.dtype)

    # ---- per-request state rows --------------------------------------------------------------
    def row_bytes(self, item: Item, rows: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        """Byte address of rows ``which`` ``[R, m]`` of ``item`` for block-table rows ``rows`` ``[R, W]``."""
        layout = self.layout
        page = item.first_page + which // item.rows_per_page
        view, column = page // layout.reserved_blocks, page % layout.reserved_blocks
        blocks = rows.gather(-1, column).long()
        return self.base[view] + blocks * self.block_stride + (which % item.rows_per_page) * item.row_bytes

    def read_rows(self, item: Item, rows: torch.Tensor, which: torch.Tensor, dtype: torch.dtype,
                  width: int | None = None, skip: int = 0) -> torch.Tensor:
        """``[R, m, width]`` ``dtype`` values starting ``skip`` bytes into the given rows."""
        width = item.width if width is None else width
        flat = self.typed(dtype)
        start = (self.row_bytes(item, rows, which) + skip) // dtype.itemsize
        return flat[start.unsqueeze(-1) + torch.arange(width, device=start.device)]

    def write_rows(self, item: Item, rows: torch.Tensor, which: torch.Tensor, values: torch.Tensor,
                   skip: int = 0) -> None:
        flat = self.typed(values.dtype)
        start = (self.row_bytes(item, rows, which) + skip) // values.dtype.itemsize
        flat[start.unsqueeze(-1) + torch.arange(values.shape[-1], device=start.device)] = values

    # Pre-compression middle tokens in the coefficient rows: ``middle_per_row`` tokens per row.
    def middle_rows(self, item: Item, middle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        per = self.layout.middle_per_row
        return middle // per, (middle % per) * item.width * self.layout.elem

    def read_middle(self, item: Item, rows: torch.Tensor, middle: torch.Tensor) -> torch.Tensor:
        """``[R, m, width]`` exact middle tokens (middle indices ``middle`` ``[R, m]``), model dtype."""
        which, skip = self.middle_rows(item, middle)
        flat = self.typed(self.layout.dtype)
        start = (self.row_bytes(item, rows, which) + skip) // self.layout.elem
        return flat[start.unsqueeze(-1) + torch.arange(item.width, device=start.device)]

    def write_middle(self, item: Item, rows: torch.Tensor, middle: torch.Tensor, values: torch.Tensor) -> None:
        which, skip = self.middle_rows(item, middle)
        flat = self.typed(self.layout.dtype)
        start = (self.row_bytes(item, rows, which) + skip) // self.layout.elem
        flat[start.unsqueeze(-1) + torch.arange(item.width, device=start.device)] = values.to(flat.dtype)
