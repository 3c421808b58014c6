"""The paged KV pool: per-layer page and state tensors, a block allocator and per-sequence bookkeeping.

Every layer has the same `num_blocks` pages (tensor names and shapes in format.py); a sequence owns a list of
page ids (its block table, shared by all layers) and, in the compressed modes, one state slot for its 16-bit
sinks and open tail. Allocation is all-or-nothing: `allocate` either grows every requested sequence or raises
KVCacheFull and changes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from common.kv.format import Cache, KVLayout
from common.kv.interface import KVCacheFull


@dataclass
class SequenceAlloc:
    slot: int  # state slot (sinks + tail); -1 in fp16 mode
    row: int  # the sequence's row of the device block table
    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0


class KVPool:
    def __init__(self, layout: KVLayout, num_layers: int, num_blocks: int, max_seqs: int,
                 device: torch.device | str = "cpu") -> None:
        if num_layers < 1 or num_blocks < 1 or max_seqs < 1:
            raise ValueError(f"need num_layers, num_blocks, max_seqs >= 1, got {num_layers}, {num_blocks}, {max_seqs}")
        self.layout, self.num_layers, self.num_blocks, self.max_seqs = layout, num_layers, num_blocks, max_seqs
        self.device = torch.device(device)
        self.layers: list[Cache] = [self._allocate_layer() for _ in range(num_layers)]
        self._free_blocks = list(range(num_blocks - 1, -1, -1))  # a stack: pop() hands out low ids first
        self._free_slots = list(range(max_seqs - 1, -1, -1))
        self._seqs: dict[int, SequenceAlloc] = {}
        # Block tables on the device, one row per live sequence, written only where pages are added: a batch's
        # tables are one row gather, not a rebuild from Python lists.
        self._table = torch.zeros((max_seqs, 1), dtype=torch.int32, device=self.device)
        self._free_rows = list(range(max_seqs - 1, -1, -1))

    @staticmethod
    def blocks_for_budget(layout: KVLayout, num_layers: int, memory_bytes: int, max_seqs: int) -> int:
        """Pages that fit in memory_bytes after the state slots of max_seqs sequences."""
        pages_budget = memory_bytes - max_seqs * layout.state_bytes * num_layers
        num_blocks = pages_budget // (layout.block_bytes * num_layers)
        if num_blocks < 1:
            raise ValueError(
                f"a memory budget of {memory_bytes} bytes does not hold one page ({layout.block_bytes * num_layers}"
                f" bytes over {num_layers} layers) plus {max_seqs} state slots"
            )
        return num_blocks

    def _allocate_layer(self) -> Cache:
        h, bs = self.layout.num_kv_heads, self.layout.config.block_size
        cache = {
            f.name: torch.zeros((self.num_blocks, h, f.rows(bs), f.width), dtype=f.dtype, device=self.device)
            for f in self.layout.page_fields()
        }
        for name, shape in self.layout.state_shapes().items():
            cache[name] = torch.zeros((self.max_seqs, *shape), dtype=self.layout.float_dtype, device=self.device)
        return cache

    @property
    def free_blocks(self) -> int:
        return len(self._free_blocks)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free_blocks)

    @property
    def free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def num_seqs(self) -> int:
        return len(self._seqs)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    def num_tokens(self, seq_id: int) -> int:
        seq = self._seqs.get(seq_id)
        return 0 if seq is None else seq.num_tokens

    def can_fit(self, num_tokens: int, seq_id: int | None = None) -> bool:
        """Whether seq_id (or a new sequence when None or unknown) can grow to num_tokens tokens."""
        blocks, slots = self._cost(self._seqs.get(seq_id) if seq_id is not None else None, num_tokens)
        return blocks <= self.free_blocks and slots <= self.free_slots

    def _cost(self, seq: SequenceAlloc | None, total: int) -> tuple[int, int]:
        """(new pages, new state slots) to grow seq (None: a new sequence) to total tokens."""
        have = len(seq.blocks) if seq else 0
        return max(0, self.layout.blocks_for(total) - have), int(seq is None and self.layout.config.compressed)

    def allocate(self, totals: dict[int, int]) -> None:
        """Grow each sequence to totals[seq_id] tokens (creating new ones); all or nothing."""
        for seq_id, total in totals.items():
            if total < self.num_tokens(seq_id):
                raise ValueError(f"sequence {seq_id} cannot shrink from {self.num_tokens(seq_id)} to {total} tokens")
        costs = [self._cost(self._seqs.get(seq_id), total) for seq_id, total in totals.items()]
        blocks, slots = sum(c[0] for c in costs), sum(c[1] for c in costs)
        if blocks > self.free_blocks or slots > self.free_slots:
            raise KVCacheFull(
                f"need {blocks} pages and {slots} state slots, have {self.free_blocks} pages and "
                f"{self.free_slots} slots free"
            )
        rows, columns, pages = [], [], []
        for seq_id, total in totals.items():
            seq = self._seqs.get(seq_id)
            if seq is None:
                slot = self._free_slots.pop() if self.layout.config.compressed else -1
                seq = self._seqs[seq_id] = SequenceAlloc(slot, self._take_row())
            while len(seq.blocks) < self.layout.blocks_for(total):
                rows.append(seq.row)
                columns.append(len(seq.blocks))
                seq.blocks.append(self._free_blocks.pop())
                pages.append(seq.blocks[-1])
            seq.num_tokens = total
        self._write_table(rows, columns, pages)

    def _take_row(self) -> int:
        if not self._free_rows:  # fp16 pools hold no state slots, so their sequences are not bounded by max_seqs
            grown = self._table.shape[0]
            self._table = torch.cat([self._table, torch.zeros_like(self._table)])
            self._free_rows = list(range(2 * grown - 1, grown - 1, -1))
        return self._free_rows.pop()

    def _write_table(self, rows: list[int], columns: list[int], pages: list[int]) -> None:
        """Add pages to the device block table: one host-to-device copy for the whole allocation."""
        if not pages:
            return
        width = max(columns) + 1
        if width > self._table.shape[1]:
            wider = torch.zeros((self._table.shape[0], max(width, 2 * self._table.shape[1])), dtype=torch.int32,
                                device=self.device)
            wider[:, : self._table.shape[1]] = self._table
            self._table = wider
        index = torch.tensor([rows, columns, pages], dtype=torch.int64).to(self.device, non_blocking=True)
        self._table[index[0], index[1]] = index[2].to(torch.int32)

    def fork(self, src: int, dsts: list[int]) -> None:
        """Give each new sequence of dsts a copy of src's KV (the n choices of one prompt): pages and state slot
        allocated (all or nothing, KVCacheFull) and filled with src's bytes, one gather and scatter per tensor."""
        seq = self._seq(src)
        taken = [d for d in dsts if d in self._seqs or d == src]
        if taken:
            raise ValueError(f"sequences {taken} already exist")
        self.allocate({dst: seq.num_tokens for dst in dsts})
        src_pages = self.page_tensor(src).repeat(len(dsts))
        dst_pages = torch.cat([self.page_tensor(dst) for dst in dsts])
        dst_slots = [self._seqs[dst].slot for dst in dsts]
        state_names = self.layout.state_shapes().keys()
        for cache in self.layers:
            for name, tensor in cache.items():
                if name in state_names:
                    tensor[dst_slots] = tensor[seq.slot].clone()
                else:
                    tensor.index_copy_(0, dst_pages, tensor.index_select(0, src_pages))

    def free(self, seq_id: int) -> None:
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return
        self._free_blocks.extend(reversed(seq.blocks))
        if seq.slot >= 0:
            self._free_slots.append(seq.slot)
        self._table[seq.row] = 0  # padding reads page 0, as before
        self._free_rows.append(seq.row)

    def block_tables(self, seq_ids: list[int] | tuple[int, ...]) -> torch.Tensor:
        """[B, max_blocks] int32 page ids, padded with 0 (padding is never read): rows of the device table."""
        seqs = [self._seq(s) for s in seq_ids]
        width = max(1, max(len(s.blocks) for s in seqs))
        rows = torch.tensor([s.row for s in seqs], dtype=torch.int64).to(self.device, non_blocking=True)
        return self._table[rows, :width]

    def page_tensor(self, seq_id: int) -> torch.Tensor:
        """int64 page ids of one sequence, on the device (no host sync)."""
        seq = self._seq(seq_id)
        return self._table[seq.row, : len(seq.blocks)].long()

    def state_slot(self, seq_id: int) -> int:
        return self._seq(seq_id).slot

    def state_slots(self, seq_ids: list[int] | tuple[int, ...]) -> torch.Tensor:
        return torch.tensor([self._seq(s).slot for s in seq_ids], dtype=torch.int64).to(self.device, non_blocking=True)

    def _seq(self, seq_id: int) -> SequenceAlloc:
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise KeyError(f"unknown sequence {seq_id}")
        return seq
