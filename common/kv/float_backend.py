"""The plain float KV backend: every sequence owns a slot of a preallocated float slab.

It is the simplest correct `KVBackend` and the reference for the model tests; the paged
fp16/dequant/hack backends of the serving path live beside it. A decode step attends for
all sequences in one batched call over their slots (padded to the longest, masked).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from common.kv.interface import ForwardBatch, KVBackend, KVCacheFull


def padded_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """One query per sequence over padded caches. q: [B, Hq, D]; k, v: [B, Hkv, L, D]; lengths: [B]."""
    batch, num_heads, _ = q.shape
    group = num_heads // k.shape[1]
    keys = k.float().repeat_interleave(group, dim=1)  # [B, Hq, L, D]
    values = v.float().repeat_interleave(group, dim=1)
    mask = torch.arange(k.shape[2], device=q.device)[None, :] < lengths[:, None]  # [B, L]
    out = F.scaled_dot_product_attention(q.float()[:, :, None, :], keys, values, attn_mask=mask[:, None, None, :])
    return out[:, :, 0, :].to(q.dtype)


class FloatKVBackend(KVBackend):
    """K/V in float slabs [layers][slots, Hkv, max_len, D]; slots grow by doubling."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.num_layers, self.max_len = num_layers, max_len
        self._shape = (num_kv_heads, max_len, head_dim)
        self._dtype, self._device = dtype, torch.device(device)
        self._keys = [self._empty(1) for _ in range(num_layers)]
        self._values = [self._empty(1) for _ in range(num_layers)]
        self._slot: dict[int, int] = {}
        self._lengths: dict[int, int] = {}

    def _empty(self, slots: int) -> torch.Tensor:
        return torch.zeros(slots, *self._shape, dtype=self._dtype, device=self._device)

    def reserve(self, batch: ForwardBatch) -> None:
        for seq_id, cached, new in zip(batch.seq_ids, batch.num_cached, batch.num_new):
            if self.num_tokens(seq_id) != cached:
                raise ValueError(f"sequence {seq_id} has {self.num_tokens(seq_id)} cached tokens, batch says {cached}")
            if cached + new > self.max_len:
                raise KVCacheFull(f"sequence {seq_id} would hold {cached + new} tokens, the limit is {self.max_len}")
        for seq_id in batch.seq_ids:
            if seq_id not in self._slot:
                self._slot[seq_id] = self._free_slot()
                self._lengths[seq_id] = 0

    def _free_slot(self) -> int:
        used = set(self._slot.values())
        slot = next(i for i in range(len(used) + 1) if i not in used)
        capacity = self._keys[0].shape[0]
        if slot >= capacity:
            self._keys = [torch.cat((t, self._empty(capacity))) for t in self._keys]
            self._values = [torch.cat((t, self._empty(capacity))) for t in self._values]
        return slot

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        keys, values = self._keys[layer], self._values[layer]
        slots = [self._slot[s] for s in batch.seq_ids]
        for i, (slot, cached, new) in enumerate(zip(slots, batch.num_cached, batch.num_new)):
            rows = batch.rows(i)
            keys[slot, :, cached:cached + new] = k[rows].transpose(0, 1)
            values[slot, :, cached:cached + new] = v[rows].transpose(0, 1)
        out = self._decode(q, keys, values, slots, batch) if batch.is_decode else \
            self._padded_causal(q, keys, values, slots, batch)
        if layer == self.num_layers - 1:
            for seq_id, new in zip(batch.seq_ids, batch.num_new):
                self._lengths[seq_id] += new
        return out

    def _decode(self, q, keys, values, slots: list[int], batch: ForwardBatch) -> torch.Tensor:
        lengths = torch.tensor([c + 1 for c in batch.num_cached], device=q.device)
        longest = int(lengths.max())
        index = torch.tensor(slots, device=q.device)
        return padded_decode_attention(q, keys[index, :, :longest], values[index, :, :longest], lengths)

    def _padded_causal(self, q, keys, values, slots: list[int], batch: ForwardBatch) -> torch.Tensor:
        """Every sequence's new tokens in one masked SDPA call, padded to the longest."""
        num_heads, head_dim = q.shape[1:]
        longest_new, longest_total = max(batch.num_new), max(c + n for c, n in zip(batch.num_cached, batch.num_new))
        padded_q = q.new_zeros(len(slots), longest_new, num_heads, head_dim)
        for i, new in enumerate(batch.num_new):
            padded_q[i, :new] = q[batch.rows(i)]
        index = torch.tensor(slots, device=q.device)
        group = num_heads // keys.shape[1]
        k = keys[index, :, :longest_total].float().repeat_interleave(group, dim=1)  # [B, Hq, L, D]
        v = values[index, :, :longest_total].float().repeat_interleave(group, dim=1)
        cached = torch.tensor(batch.num_cached, device=q.device)
        query_pos = cached[:, None] + torch.arange(longest_new, device=q.device)[None, :]  # [B, Lq]
        mask = torch.arange(longest_total, device=q.device)[None, None, :] <= query_pos[:, :, None]  # [B, Lq, L]
        out = F.scaled_dot_product_attention(padded_q.float().transpose(1, 2), k, v, attn_mask=mask[:, None])
        out = out.transpose(1, 2).to(q.dtype)  # [B, Lq, Hq, D]
        return torch.cat([out[i, :new] for i, new in enumerate(batch.num_new)])

    def free(self, seq_id: int) -> None:
        self._slot.pop(seq_id, None)
        self._lengths.pop(seq_id, None)

    def num_tokens(self, seq_id: int) -> int:
        return self._lengths.get(seq_id, 0)

    @staticmethod
    def for_model(config, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "FloatKVBackend":
        return FloatKVBackend(config.num_layers, config.num_kv_heads, config.head_dim,
                              config.context_window, dtype, device)
