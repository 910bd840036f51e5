"""The VQKV page: one cell per (block, KV head, slot) holds a token's ``num_codes`` one-byte indices.

A request's block-table row starts with ``reserved_blocks`` blocks of its own that hold its exact
tokens (``sink`` first tokens and a ring of the ``recent`` newest), each spread over
``cells_per_entry`` consecutive cells; its position blocks follow, so position ``p`` is cell
``p % block_size`` of block ``row[reserved_blocks + p // block_size]`` (vLLM's slot_mapping, which
does not know the reserved blocks, is not used). ``paged.reserved.ReservedBlocksSpec`` makes vLLM allocate, admit and
count the reserved blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PageLayout:
    num_codes: int
    head_size: int
    head_size_v: int
    dtype: torch.dtype
    sink: int
    recent: int
    block_size: int

    @property
    def exact_bytes(self) -> int:
        return (self.head_size + self.head_size_v) * self.dtype.itemsize

    @property
    def cells_per_entry(self) -> int:
        return -(-self.exact_bytes // self.num_codes)

    @property
    def ring_entries(self) -> int:
        return self.sink + self.recent

    @property
    def reserved_blocks(self) -> int:
        return -(-self.ring_entries * self.cells_per_entry // self.block_size)

    def ring_index(self, positions: torch.Tensor) -> torch.Tensor:
        """Ring entry of each exact position: sinks first, then ``recent`` entries reused cyclically."""
        if self.recent == 0:
            return positions
        return torch.where(
            positions < self.sink, positions, self.sink + (positions - self.sink) % self.recent
        )

    def is_kept_exact(self, positions: torch.Tensor, seq_len: torch.Tensor) -> torch.Tensor:
        """Positions the ring holds once a request has ``seq_len`` tokens."""
        return (positions < self.sink) | (positions >= torch.maximum(seq_len - self.recent, torch.tensor(self.sink)))

    def code_cells(self, rows: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(block, slot) of each position; ``rows`` are the block-table rows of the tokens."""
        column = self.reserved_blocks + positions // self.block_size
        return rows.gather(-1, column.unsqueeze(-1)).squeeze(-1).long(), positions % self.block_size

    def ring_cells(self, rows: torch.Tensor, entries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(block, slot), each ``[..., cells_per_entry]``, of ring entries."""
        cells = entries.unsqueeze(-1) * self.cells_per_entry + torch.arange(
            self.cells_per_entry, device=entries.device
        )
        blocks = rows.gather(-1, (cells // self.block_size).reshape(*rows.shape[:-1], -1))
        return blocks.reshape(cells.shape).long(), cells % self.block_size

    def pack_exact(self, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``[N, H, D]``, ``[N, H, Dv]`` -> ``[N, cells_per_entry, H, num_codes]`` uint8."""
        raw = torch.cat([key, value], -1).to(self.dtype).contiguous().view(torch.uint8)
        pad = self.cells_per_entry * self.num_codes - raw.shape[-1]
        raw = torch.nn.functional.pad(raw, (0, pad))
        n, h = raw.shape[:2]
        return raw.view(n, h, self.cells_per_entry, self.num_codes).transpose(1, 2)

    def unpack_exact(self, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of :meth:`pack_exact`: ``[N, m, H, c]`` -> key ``[N, H, D]``, value ``[N, H, Dv]``."""
        n, _, h, _ = cells.shape
        raw = cells.transpose(1, 2).reshape(n, h, -1)[..., : self.exact_bytes].contiguous()
        exact = raw.view(self.dtype)
        return exact[..., : self.head_size], exact[..., self.head_size :]


def write_cells(cache: torch.Tensor, blocks: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """``cache[blocks, :, slots] = rows`` for ``blocks``/``slots`` ``[...]`` and rows ``[..., H, C]``."""
    cache[blocks.reshape(-1), :, slots.reshape(-1)] = rows.reshape(-1, *rows.shape[-2:])


def read_cells(cache: torch.Tensor, blocks: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``[..., H, C]`` contents of the cells at ``blocks``/``slots``."""
    return cache[blocks.reshape(-1), :, slots.reshape(-1)].reshape(*blocks.shape, *cache.shape[1:2], cache.shape[-1])
