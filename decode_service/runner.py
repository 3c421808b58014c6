"""The decode service's model side: the paged KV backend, KV import and one batched decode step.

Every method runs on the engine's single model thread, so the pool is never touched by two threads at once.
"""
from __future__ import annotations

import torch

from common.kv.backends import PagedKVBackend
from common.kv.interface import ForwardBatch
from common.kv.wire import decode_layer
from common.loader import LoadedModel
from common.sampling import Sampler
from decode_service.scheduler import DecodeRequest


class DecodeRunner:
    def __init__(self, loaded: LoadedModel, backend: PagedKVBackend) -> None:
        self.loaded, self.backend = loaded, backend
        self.layout = backend.layout
        self.device = next(loaded.model.parameters()).device
        self.sampler = Sampler()

    def allocate(self, seq_id: int, num_tokens: int) -> None:
        """Pages and a state slot for an incoming prompt, replacing whatever an earlier push stored
        (KVCacheFull if the pool cannot hold it)."""
        self.backend.free(seq_id)
        self.backend.allocate_sequence(seq_id, num_tokens)

    def import_layer(self, seq_id: int, layer: int, chunks: list[bytes]) -> None:
        """Verify (checksum, version, layout) and store one layer's wire chunks; WireFormatError if bad."""
        self.backend.import_layer(seq_id, layer, decode_layer(self.layout, chunks))

    def step(self, batch: list[DecodeRequest]) -> list[int]:
        """Feed every request's newest token, sample the next one for each."""
        seq_ids = [r.seq_id for r in batch]
        forward = ForwardBatch.build(seq_ids, [r.num_cached for r in batch], [1] * len(batch), self.device)
        self.backend.reserve(forward)
        tokens = torch.tensor([r.last_token for r in batch], device=self.device)
        logits = self.loaded.model(tokens, forward, self.backend)
        return self.sampler.sample(logits, [r.params for r in batch], [len(r.output_ids) for r in batch])

    def free(self, seq_id: int) -> None:
        self.backend.free(seq_id)

    @property
    def used_blocks(self) -> int:
        return self.backend.pool.used_blocks
