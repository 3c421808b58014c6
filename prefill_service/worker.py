"""The prefill service's model side: one batched prompt forward whose KV leaves layer by layer.

`LayerExporter` sits between the model and the paged backend: right after a layer's attention stored that
layer's K/V, it exports and encodes it (common/kv/wire.py chunks) for every sequence of the batch and hands the
chunks to a callback, so the KV sender streams layer l while layer l + 1 computes. Runs on the model thread.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from common.kv.backends import PagedKVBackend
from common.kv.interface import ForwardBatch, KVBackend
from common.kv.wire import encode_layer
from common.loader import LoadedModel
from common.sampling import Sampler, SamplingParams

LayerCallback = Callable[[int, int, list[bytes]], None]  # (seq_id, layer, that layer's wire chunks)


class LayerExporter(KVBackend):
    def __init__(self, backend: PagedKVBackend, on_layer: LayerCallback) -> None:
        self.backend, self.on_layer = backend, on_layer

    def reserve(self, batch: ForwardBatch) -> None:
        self.backend.reserve(batch)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               batch: ForwardBatch) -> torch.Tensor:
        out = self.backend.attend(layer, q, k, v, batch)
        for seq_id in batch.seq_ids:
            self.on_layer(seq_id, layer, encode_layer(self.backend.layout, layer,
                                                      self.backend.export_layer(seq_id, layer)))
        return out

    def free(self, seq_id: int) -> None:
        self.backend.free(seq_id)

    def num_tokens(self, seq_id: int) -> int:
        return self.backend.num_tokens(seq_id)


class PrefillWorker:
    def __init__(self, loaded: LoadedModel, backend: PagedKVBackend) -> None:
        self.loaded, self.backend = loaded, backend
        self.device = next(loaded.model.parameters()).device

    def run(self, seq_ids: list[int], prompts: list[list[int]], params: list[SamplingParams],
            on_layer: LayerCallback) -> list[int]:
        """Prefill the prompts together, stream their KV through on_layer, return each one's first token.
        The pool holds the prompts only for the duration of the call."""
        batch = ForwardBatch.build(seq_ids, [0] * len(seq_ids), [len(p) for p in prompts], self.device)
        exporter = LayerExporter(self.backend, on_layer)
        sampler = Sampler()
        try:
            exporter.reserve(batch)
            tokens = torch.tensor([t for prompt in prompts for t in prompt], device=self.device)
            logits = self.loaded.model(tokens, batch, exporter)
            return sampler.sample(logits, params, [0] * len(params))
        finally:
            for seq_id in seq_ids:
                self.backend.free(seq_id)
