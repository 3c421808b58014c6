"""The plain float KV backend: each sequence keeps its K and V as growing float tensors.

It is the simplest correct `KVBackend` and the reference for the model tests; the paged
fp16/dequant/hack backends of the serving path live beside it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from common.kv.interface import ForwardBatch, KVBackend


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_cached: int) -> torch.Tensor:
    """Attention of n new queries over num_cached + n keys, causally.

    q: [n, Hq, D]; k, v: [num_cached + n, Hkv, D]. Returns [n, Hq, D] in q's dtype.
    Softmax runs in float32; GQA repeats each KV head for its query heads.
    """
    n, num_heads, head_dim = q.shape
    group = num_heads // k.shape[1]
    keys = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, L, D]
    values = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    query_pos = torch.arange(num_cached, num_cached + n, device=q.device)
    key_pos = torch.arange(k.shape[0], device=q.device)
    mask = key_pos[None, :] <= query_pos[:, None]  # [n, L]
    out = F.scaled_dot_product_attention(q.float().transpose(0, 1), keys, values, attn_mask=mask)
    return out.transpose(0, 1).to(q.dtype)


class FloatKVBackend(KVBackend):
    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self._keys: dict[int, list[torch.Tensor | None]] = {}
        self._values: dict[int, list[torch.Tensor | None]] = {}
        self._lengths: dict[int, int] = {}

    def reserve(self, batch: ForwardBatch) -> None:
        for seq_id, cached in zip(batch.seq_ids, batch.num_cached):
            if self.num_tokens(seq_id) != cached:
                raise ValueError(f"sequence {seq_id} has {self.num_tokens(seq_id)} cached tokens, batch says {cached}")
            if seq_id not in self._keys:
                self._keys[seq_id] = [None] * self.num_layers
                self._values[seq_id] = [None] * self.num_layers
                self._lengths[seq_id] = 0

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        out = torch.empty_like(q)
        for i, (seq_id, cached) in enumerate(zip(batch.seq_ids, batch.num_cached)):
            rows = batch.rows(i)
            keys = self._append(self._keys[seq_id], layer, k[rows])
            values = self._append(self._values[seq_id], layer, v[rows])
            out[rows] = causal_attention(q[rows], keys, values, cached)
        if layer == self.num_layers - 1:
            for seq_id, new in zip(batch.seq_ids, batch.num_new):
                self._lengths[seq_id] += new
        return out

    @staticmethod
    def _append(per_layer: list[torch.Tensor | None], layer: int, new: torch.Tensor) -> torch.Tensor:
        old = per_layer[layer]
        per_layer[layer] = new.clone() if old is None else torch.cat((old, new))
        return per_layer[layer]

    def free(self, seq_id: int) -> None:
        self._keys.pop(seq_id, None)
        self._values.pop(seq_id, None)
        self._lengths.pop(seq_id, None)

    def num_tokens(self, seq_id: int) -> int:
        return self._lengths.get(seq_id, 0)
