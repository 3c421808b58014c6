"""The three paged KV backends (fp16, dequant, hack) behind `KVBackend`, plus per-layer export/import.

All three share the pool bookkeeping (`PagedKVBackend`); they differ in how new K/V are stored and how attention
reads them. Compute goes through `ops.dispatch`, the seam where device kernels replace the torch reference.

Export/import moves one layer of one sequence between pools without running the model: the prefill side calls
`export_layer` right after that layer's `attend`; the decode side calls `allocate_sequence` once, then
`import_layer` for every layer, then decodes with `num_cached` = the imported length.
"""
from __future__ import annotations

from abc import abstractmethod
from typing import Callable, NamedTuple

import torch

from common.kv.format import Cache, LayerKV, page_groups, quantize_tokens, rotation_matrices
from common.kv.interface import ForwardBatch, KVBackend
from common.kv.ops import dispatch
from common.kv.pool import KVPool
from common.kv.reference import rotate_heads, write_rows
from common.kv.torch_fast import select_sequences, unpack_float


class BatchTensors(NamedTuple):
    """Device tensors of one ForwardBatch, shared by every layer's attend."""

    cu_new: torch.Tensor  # [B + 1]
    num_cached: torch.Tensor  # [B]
    seq_lens: torch.Tensor  # [B] cached + new
    block_tables: torch.Tensor  # [B, max_blocks] int32
    state_slots: torch.Tensor  # [B]


SUM_PAGES = 8  # pages whose codes are unpacked at once when recomputing sums on import


class PreparedImport(NamedTuple):
    """An imported layer staged on the pool's device, waiting for `write_import` (see `prepare_import`)."""

    num_tokens: int
    num_pages: int
    groups: list[dict[str, torch.Tensor]]  # per page group: [group pages, Hkv, rows, width] per field, with sums
    state: dict[str, torch.Tensor]
    ready: "torch.cuda.Event | None"  # recorded after the host-to-device copies (CUDA)


class PagedKVBackend(KVBackend):
    def __init__(self, pool: KVPool, dtype: torch.dtype, softmax_scale: float | None = None) -> None:
        if not dtype.is_floating_point:
            raise ValueError(f"compute dtype must be a float dtype, got {dtype}")
        self.pool, self.dtype = pool, dtype
        self.layout, self.config = pool.layout, pool.layout.config
        self.softmax_scale = softmax_scale if softmax_scale is not None else self.layout.head_dim**-0.5
        self.generator = torch.Generator(device=pool.device).manual_seed(self.config.seed)
        self._batch_cache: tuple[ForwardBatch, BatchTensors] | None = None

    # -- KVBackend ------------------------------------------------------------------------------------------------

    def reserve(self, batch: ForwardBatch) -> None:
        totals = {}
        for seq_id, cached, new in zip(batch.seq_ids, batch.num_cached, batch.num_new):
            stored = self.pool.num_tokens(seq_id)
            if cached != stored:
                raise ValueError(f"sequence {seq_id}: batch has {cached} cached tokens, the KV cache has {stored}")
            totals[seq_id] = cached + new
        self._batch_cache = None
        self.pool.allocate(totals)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               batch: ForwardBatch) -> torch.Tensor:
        self._check_attend(layer, q, k, v, batch)
        return self._attend(self.pool.layers[layer], q, k, v, batch, self._tensors(batch))

    def free(self, seq_id: int) -> None:
        self._batch_cache = None
        self.pool.free(seq_id)

    def num_tokens(self, seq_id: int) -> int:
        return self.pool.num_tokens(seq_id)

    # -- export / import ------------------------------------------------------------------------------------------

    def allocate_sequence(self, seq_id: int, num_tokens: int) -> None:
        """Make room for an imported sequence of num_tokens (KVCacheFull if it does not fit)."""
        if seq_id in self.pool:
            raise ValueError(f"sequence {seq_id} already exists")
        self.pool.allocate({seq_id: num_tokens})

    def export_layer(self, seq_id: int, layer: int) -> LayerKV:
        """A host copy of everything stored for seq_id in `layer` (sums are left out: the importer recomputes
        them): one gather per field over the sequence's pages into one (pinned, on CUDA) host tensor, one device
        sync for the layer. The pages of the result are views of those tensors, framed in place by wire.py."""
        if seq_id not in self.pool:
            raise KeyError(f"unknown sequence {seq_id}")
        cache, n = self.pool.layers[layer], self.pool.num_tokens(seq_id)
        counts = self.layout.page_token_counts(n)
        pages = self.pool.page_tensor(seq_id)[: len(counts)]
        fields = self.layout.page_fields(with_sums=False)
        stacked = [{f.name: _to_host(cache[f.name].index_select(0, pages[start:stop]), fresh=True) for f in fields}
                   for start, stop in page_groups(self.layout, len(counts))]
        state = self._export_state(cache, seq_id, n)
        if self.pool.device.type == "cuda":
            torch.cuda.current_stream(self.pool.device).synchronize()  # the non-blocking copies above
        return LayerKV.from_stacked(self.layout, n, stacked, counts, state)

    def _export_state(self, cache: Cache, seq_id: int, n: int) -> dict[str, torch.Tensor]:
        if not self.config.compressed:
            return {}
        split, slot = self.layout.split(n), self.pool.state_slot(seq_id)
        tokens = {"sink_k": split.sinks, "sink_v": split.sinks, "tail_k": split.tail, "tail_v": split.tail}
        return {name: _to_host(cache[name][slot, :, :count]) for name, count in tokens.items()}

    def import_layer(self, seq_id: int, layer: int, kv: LayerKV) -> None:
        """Store an exported layer into this pool's pages for seq_id (allocated with `allocate_sequence`)."""
        self.write_import(seq_id, layer, self.prepare_import(kv))

    def prepare_import(self, kv: LayerKV) -> PreparedImport:
        """Check an exported layer and stage it on the pool's device: one host-to-device copy per field and page
        group, sums recomputed there. Touches no pool state, so it may run on another thread than the model's."""
        self._check_import(kv)
        stacked = kv.stacked if kv.stacked is not None else self._stack(kv)
        device = self.pool.device
        pin = device.type == "cuda"
        groups = []
        for group in stacked:
            fields = {name: (t.pin_memory() if pin and not t.is_pinned() else t).to(device, non_blocking=pin)
                      for name, t in group.items()}
            if self.config.compressed and self.config.sum_elimination:
                fields |= self._stacked_sums(fields)
            groups.append(fields)
        state = {name: t.to(device, non_blocking=pin) for name, t in kv.state.items()}
        event = None
        if pin:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
        return PreparedImport(kv.num_tokens, len(kv.pages), groups, state, event)

    def write_import(self, seq_id: int, layer: int, prepared: PreparedImport) -> None:
        """Scatter a staged layer into seq_id's pages: one indexed copy per field and page group (whole pages:
        the rows past a partial last page's tokens are unused slots), then the 16-bit state."""
        n = self.pool.num_tokens(seq_id)
        if seq_id not in self.pool or prepared.num_tokens != n:
            raise ValueError(f"sequence {seq_id} holds {n} tokens here, the imported layer has {prepared.num_tokens}")
        if prepared.ready is not None:
            torch.cuda.current_stream(self.pool.device).wait_event(prepared.ready)
        cache, pages = self.pool.layers[layer], self.pool.page_tensor(seq_id)[: prepared.num_pages]
        for (start, stop), group in zip(page_groups(self.layout, prepared.num_pages), prepared.groups):
            for name, values in group.items():
                cache[name].index_copy_(0, pages[start:stop], values)
        if self.config.compressed:
            self._import_state(cache, seq_id, prepared.state, self.layout.split(n).quantized)

    def _stack(self, kv: LayerKV) -> list[dict[str, torch.Tensor]]:
        """stacked for a LayerKV built page by page: [group pages, Hkv, rows per page, width] per field and
        page group, partial pages padded."""
        h, bs = self.layout.num_kv_heads, self.config.block_size
        groups = []
        for start, stop in page_groups(self.layout, len(kv.pages)):
            group = {}
            for f in self.layout.page_fields(with_sums=False):
                out = torch.zeros((stop - start, h, f.rows(bs), f.width), dtype=f.dtype)
                for i, page in enumerate(kv.pages[start:stop]):
                    out[i, :, : page[f.name].shape[1]] = page[f.name]
                group[f.name] = out
            groups.append(group)
        return groups

    def _stacked_sums(self, fields: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """k_sums/v_sums (format.recompute_sums) of stacked page fields [pages, Hkv, rows, width], through a
        byte -> codes table and float32 sums instead of shifts and sums on int32 (several times faster on CPU);
        SUM_PAGES pages at a time, so the unpacked codes stay small (cache-resident on CPU)."""
        bits, pi, pd = self.config.bits, self.config.partition, self.layout.head_partition
        k_codes, v_codes = fields["k_codes"], fields["v_codes"]
        pages, heads, rows = k_codes.shape[:3]
        d = self.layout.head_dim
        k_sums = torch.empty((pages, heads, rows, d // pd), dtype=torch.int16, device=k_codes.device)
        v_sums = torch.empty((pages, heads, rows // pi, d), dtype=torch.int16, device=k_codes.device)
        for p0 in range(0, pages, SUM_PAGES):
            p1 = min(p0 + SUM_PAGES, pages)
            k_sums[p0:p1] = unpack_float(k_codes[p0:p1], self.config.k_bits).unflatten(-1, (-1, pd)).sum(-1)  # exact in fp32
            v_sums[p0:p1] = unpack_float(v_codes[p0:p1], bits).unflatten(2, (-1, pi)).sum(3)
        return {"k_sums": k_sums, "v_sums": v_sums}

    def _import_state(self, cache: Cache, seq_id: int, state: dict[str, torch.Tensor], tail_start: int) -> None:
        slot = self.pool.state_slot(seq_id)
        for name, values in state.items():
            cache[name][slot, :, : values.shape[1]] = values
        tail = state["tail_k"].shape[1]
        if tail and not self.config.requant_elimination:  # the ablation attends to the open partition's codes
            rows = quantize_tokens(cache["tail_k"][slot, :, :tail], cache["tail_v"][slot, :, :tail], self.config,
                                   self.generator, self.config.sum_elimination)
            table = self.pool.page_tensor(seq_id)
            write_rows(cache, rows, table, tail_start, tail, self.config.block_size)

    def _check_import(self, kv: LayerKV) -> None:
        counts = self.layout.page_token_counts(kv.num_tokens)
        if len(kv.pages) != len(counts):
            raise ValueError(f"{kv.num_tokens} tokens need {len(counts)} pages, got {len(kv.pages)}")
        h, bs = self.layout.num_kv_heads, self.config.block_size
        for f in self.layout.page_fields(with_sums=False):
            groups = page_groups(self.layout, len(counts)) if kv.stacked is not None else []
            if kv.stacked is not None and len(kv.stacked) != len(groups):
                raise ValueError(f"{len(counts)} pages come in {len(groups)} groups, got {len(kv.stacked)}")
            for (start, stop), group in zip(groups, kv.stacked or []):
                _check_tensor(f"stacked {f.name}", group.get(f.name), (stop - start, *f.shape(h, bs)), f.dtype)
            for page, count in zip(kv.pages, counts):
                _check_tensor(f"page {f.name}", page.get(f.name), f.shape(h, count), f.dtype)
        split = self.layout.split(kv.num_tokens)
        for name, tokens in (("sink_k", split.sinks), ("sink_v", split.sinks), ("tail_k", split.tail),
                             ("tail_v", split.tail)):
            if self.config.compressed:
                _check_tensor(name, kv.state.get(name), (h, tokens, self.layout.head_dim),
                              self.layout.float_dtype)

    # -- per mode -------------------------------------------------------------------------------------------------

    @abstractmethod
    def _attend(self, cache: Cache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch,
                t: BatchTensors) -> torch.Tensor:
        """Store the new k, v of every sequence in `cache` (one layer) and return the attention output."""

    def _op(self, name: str) -> Callable:
        return dispatch(name, self.pool.device)

    def _tensors(self, batch: ForwardBatch) -> BatchTensors:
        if self._batch_cache is None or self._batch_cache[0] is not batch:
            self._check_reserved(batch)  # once per batch, not in every layer
            device = self.pool.device
            num_cached = torch.tensor(batch.num_cached, dtype=torch.int64, device=device)
            seq_lens = num_cached + torch.tensor(batch.num_new, dtype=torch.int64, device=device)
            tensors = BatchTensors(batch.cu_new.to(device), num_cached, seq_lens,
                                   self.pool.block_tables(batch.seq_ids), self._slots(batch.seq_ids))
            self._batch_cache = (batch, tensors)
        return self._batch_cache[1]

    def _slots(self, seq_ids: tuple[int, ...]) -> torch.Tensor:
        return self.pool.state_slots(seq_ids)

    def _check_reserved(self, batch: ForwardBatch) -> None:
        for seq_id, cached, new in zip(batch.seq_ids, batch.num_cached, batch.num_new):
            if self.pool.num_tokens(seq_id) != cached + new:
                raise ValueError(f"sequence {seq_id} was not reserved for this batch (call reserve first)")

    def _check_attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      batch: ForwardBatch) -> None:
        if not 0 <= layer < self.pool.num_layers:
            raise IndexError(f"layer {layer} out of range for {self.pool.num_layers} layers")
        h, d, t = self.layout.num_kv_heads, self.layout.head_dim, batch.num_tokens
        if q.dim() != 3 or q.shape[0] != t or q.shape[2] != d or q.shape[1] % h:
            raise ValueError(f"q must be [{t}, a multiple of {h}, {d}], got {tuple(q.shape)}")
        for name, x in (("k", k), ("v", v)):
            if tuple(x.shape) != (t, h, d):
                raise ValueError(f"{name} must be [{t}, {h}, {d}], got {tuple(x.shape)}")
        if q.dtype != self.dtype:
            raise ValueError(f"q has dtype {q.dtype}, the backend computes in {self.dtype}")


class Fp16KVBackend(PagedKVBackend):
    """Uncompressed fp16 pages: the disaggregated baseline."""

    def _attend(self, cache: Cache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch,
                t: BatchTensors) -> torch.Tensor:
        bs = self.config.block_size
        self._op("store_fp16_kv")(k, v, t.cu_new, t.num_cached, t.block_tables, cache, bs)
        return self._op("fp16_attention")(q, t.cu_new, t.seq_lens, t.block_tables, cache, bs, self.softmax_scale)

    def _slots(self, seq_ids: tuple[int, ...]) -> torch.Tensor:
        return torch.full((len(seq_ids),), -1, dtype=torch.int64, device=self.pool.device)


class CompressedKVBackend(PagedKVBackend):
    """HACK storage; attention on the codes (mode "hack") or on dequantized K/V (mode "dequant").

    With quantized_prefill off, a prompt's forward attends in float to its original K/V (FlashAttention-style, as
    KIVI and the paper's artifact prefill): what it stores, and what decode then reads, are the same codes, but
    the prompt's hidden states, hence every layer's stored K/V, carry no quantization error of earlier layers.
    In hack mode only a forward with nothing stored yet does (a later chunk attends on the codes: hack never
    dequantizes a page); dequant mode attends to the stored tokens dequantized. With rotate, K, V and q
    enter rotated per KV head and the output leaves rotated back (format.py), so the ops never see the rotation.
    """

    def __init__(self, pool: KVPool, dtype: torch.dtype, softmax_scale: float | None = None) -> None:
        super().__init__(pool, dtype, softmax_scale)
        self.rotations = None
        if self.config.rotate:
            self.rotations = rotation_matrices(self.layout.num_kv_heads, self.layout.head_dim,
                                               self.config.seed).to(pool.device)

    def _attend(self, cache: Cache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch,
                t: BatchTensors) -> torch.Tensor:
        if self.rotations is None:
            return self._attend_stored(cache, q, k, v, batch, t)
        q, k, v = (rotate_heads(x, self.rotations) for x in (q, k, v))
        return rotate_heads(self._attend_stored(cache, q, k, v, batch, t), self.rotations, inverse=True)

    def _attend_stored(self, cache: Cache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch,
                       t: BatchTensors) -> torch.Tensor:
        """Store k, v and attend, all in the stored (possibly rotated) basis."""
        float_seqs = self._float_prefill_seqs(batch)
        # what is stored already, read before the new tokens land (dequant mode only: hack's have nothing stored)
        contexts = [self._stored_float(cache, t, i) if batch.num_cached[i] else None for i in float_seqs]
        self._op("store_compressed_kv")(k, v, t.cu_new, t.num_cached, t.block_tables, t.state_slots, cache,
                                        self.config, self.generator)
        out = torch.empty_like(q)
        compressed_seqs = [i for i in range(len(batch.seq_ids)) if i not in float_seqs]
        if compressed_seqs:
            self._compressed_attention(cache, q, batch, t, compressed_seqs, out)
        for i, context in zip(float_seqs, contexts):
            rows = batch.rows(i)
            keys, values = (x[rows].transpose(0, 1).float() for x in (k, v))
            if context is not None:
                keys, values = torch.cat([context[0], keys], dim=1), torch.cat([context[1], values], dim=1)
            out[rows] = self._op("causal_attention")(q[rows], keys, values, self.softmax_scale)
        return out

    def _float_prefill_seqs(self, batch: ForwardBatch) -> list[int]:
        if self.config.quantized_prefill:
            return []
        return [i for i, (cached, new) in enumerate(zip(batch.num_cached, batch.num_new))
                if new > 1 and (cached == 0 or self.config.mode == "dequant")]

    def _stored_float(self, cache: Cache, t: BatchTensors, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._op("dequantize_sequence")(cache, t.block_tables[i], int(t.state_slots[i]),
                                               int(t.num_cached[i]), self.config)

    def _compressed_attention(self, cache: Cache, q: torch.Tensor, batch: ForwardBatch, t: BatchTensors,
                              seqs: list[int], out: torch.Tensor) -> None:
        name = "hack_attention" if self.config.mode == "hack" else "dequant_attention"
        if len(seqs) == len(batch.seq_ids):
            rows, sub = slice(None), t
        else:  # a mixed batch with float-prefill sequences: attend for the others only
            idx = torch.tensor(seqs, device=q.device)
            rows, cu = select_sequences(t.cu_new, idx)
            sub = BatchTensors(cu, t.num_cached[idx], t.seq_lens[idx], t.block_tables[idx], t.state_slots[idx])
        out[rows] = self._op(name)(q[rows], sub.cu_new, sub.seq_lens, sub.block_tables, sub.state_slots, cache,
                                   self.config, self.softmax_scale)


def _to_host(x: torch.Tensor, fresh: bool = False) -> torch.Tensor:
    """A host copy of x: pinned and non-blocking from CUDA (the caller synchronizes once); on CPU x itself when
    it is a fresh tensor (a gather), else a clone."""
    if x.device.type == "cpu":
        return x if fresh else x.clone()
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    return host.copy_(x, non_blocking=True)


def _check_tensor(name: str, x: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if x is None:
        raise ValueError(f"imported layer is missing {name}")
    if tuple(x.shape) != tuple(shape) or x.dtype != dtype:
        raise ValueError(f"imported {name} is {tuple(x.shape)} {x.dtype}, expected {tuple(shape)} {dtype}")
