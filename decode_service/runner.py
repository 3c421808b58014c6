"""The decode service's model side: the paged KV backend, KV import, swapping and one batched decode step.

Every method but `stage_import` runs on the engine's single model thread, so the pool is never touched by two
threads at once. `stage_import` (checksums, parsing, the host-to-device copy, code sums) runs on the engine's
import thread and touches no pool state; the model thread then writes staged layers between steps.
"""
from __future__ import annotations

import time
from typing import NamedTuple

import torch

from common.kv.backends import PagedKVBackend, PreparedImport
from common.kv.format import LayerKV
from common.kv.interface import ForwardBatch, KVBackend
from common.kv.wire import decode_layer
from common.loader import LoadedModel
from common.sampling import Sampler, TokenHistory, TokenLogprobs
from common.structured import GrammarCompiler, advance, mask_logits
from decode_service.scheduler import DecodeRequest, StepPlan


class StepResult(NamedTuple):
    tokens: list[int]  # one sampled token per request of the batch
    attention_s: float  # wall time inside the backend's attend, all layers (0 when not measured)
    logprobs: list[TokenLogprobs | None]  # per request, where it asked for logprobs


class AttentionClock(KVBackend):
    """Passes every call through to the backend and adds up the wall time of `attend` (one call per layer).

    On CUDA, kernels run asynchronously: the clock synchronizes the device around each call so the time is
    the attention's own, which slows the step down a little. `DecodeRunner` therefore only uses the clock on
    CUDA when asked to (--profile-attention); on CPU the calls are synchronous and the clock costs nothing.
    """

    def __init__(self, backend: PagedKVBackend, device: torch.device) -> None:
        self.backend = backend
        self.synchronize = device.type == "cuda"
        self.elapsed_s = 0.0

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               batch: ForwardBatch) -> torch.Tensor:
        if self.synchronize:
            torch.cuda.synchronize(q.device)
        start = time.perf_counter()
        out = self.backend.attend(layer, q, k, v, batch)
        if self.synchronize:
            torch.cuda.synchronize(q.device)
        self.elapsed_s += time.perf_counter() - start
        return out

    def reserve(self, batch: ForwardBatch) -> None:
        self.backend.reserve(batch)

    def free(self, seq_id: int) -> None:
        self.backend.free(seq_id)

    def num_tokens(self, seq_id: int) -> int:
        return self.backend.num_tokens(seq_id)


class DecodeRunner:
    def __init__(self, loaded: LoadedModel, backend: PagedKVBackend, profile_attention: bool = False) -> None:
        self.loaded, self.backend = loaded, backend
        self.layout = backend.layout
        self.device = next(loaded.model.parameters()).device
        self.sampler = Sampler()
        self.grammars = GrammarCompiler(loaded.tokenizer, loaded.config.vocab_size)
        self.time_attention = profile_attention or self.device.type == "cpu"
        self._swapped: dict[int, list[LayerKV]] = {}  # preempted sequences' KV in host memory, by seq_id

    def allocate(self, seq_id: int, num_tokens: int) -> None:
        """Pages and a state slot for an incoming prompt, replacing whatever an earlier push stored
        (KVCacheFull if the pool cannot hold it)."""
        self.backend.free(seq_id)
        self.backend.allocate_sequence(seq_id, num_tokens)

    def fork(self, seq_id: int, copies: list[int]) -> None:
        """Give each sequence of `copies` a copy of seq_id's KV (the other choices of one prompt; KVCacheFull if the
        pool cannot hold them)."""
        self.backend.pool.fork(seq_id, copies)

    def stage_import(self, layer: int, chunks: list[bytes]) -> PreparedImport:
        """Verify (checksum, version, layout) and stage one layer's wire chunks on the device; WireFormatError if
        bad. Runs on the import thread: no pool state is read or written."""
        return self.backend.prepare_import(decode_layer(self.layout, chunks))

    def write_import(self, seq_id: int, layer: int, staged: PreparedImport) -> None:
        self.backend.write_import(seq_id, layer, staged)

    def import_layer(self, seq_id: int, layer: int, chunks: list[bytes]) -> None:
        """stage_import then write_import, on the calling thread."""
        self.write_import(seq_id, layer, self.stage_import(layer, chunks))

    def step(self, plan: StepPlan) -> StepResult:
        """Swap out, swap in, then feed every request of the batch its newest token and sample the next one."""
        for request in plan.swap_out:
            self.swap_out(request.seq_id)
        for request in plan.swap_in:
            self.swap_in(request.seq_id)
        batch = plan.batch
        if not batch:
            return StepResult([], 0.0, [])
        seq_ids = [r.seq_id for r in batch]
        forward = ForwardBatch.build(seq_ids, [r.num_cached for r in batch], [1] * len(batch), self.device)
        self.backend.reserve(forward)
        tokens = torch.tensor([r.last_token for r in batch]).to(self.device, non_blocking=True)
        kv = AttentionClock(self.backend, self.device) if self.time_attention else self.backend
        logits = self.loaded.model(tokens, forward, kv)
        params = [r.params for r in batch]
        logits = mask_logits(logits, self._grammars_of(batch))
        histories = [TokenHistory(r.prompt_ids, r.output_ids) for r in batch] if any(p.penalized for p in params) \
            else None
        sampled = self.sampler.run(logits, params, [len(r.output_ids) for r in batch], histories)
        advance([r.grammar for r in batch], sampled.tokens)
        return StepResult(sampled.tokens, kv.elapsed_s if isinstance(kv, AttentionClock) else 0.0, sampled.logprobs)

    def _grammars_of(self, batch: list[DecodeRequest]) -> list:
        """Each request's matcher (None without structured output); a new one first replays the prefill's token."""
        for request in batch:
            if request.params.json_schema is not None and request.grammar is None:
                request.grammar = self.grammars.matcher(request.params.json_schema, replay=request.output_ids)
        return [request.grammar for request in batch]

    def swap_out(self, seq_id: int) -> None:
        """Move a preempted sequence's KV to host memory (exact: the same bytes come back) and free its pages."""
        self._swapped[seq_id] = [self.backend.export_layer(seq_id, layer) for layer in range(self.num_layers)]
        self.backend.free(seq_id)

    def swap_in(self, seq_id: int) -> None:
        layers = self._swapped.pop(seq_id)
        self.backend.allocate_sequence(seq_id, layers[0].num_tokens)
        for layer, kv in enumerate(layers):
            self.backend.import_layer(seq_id, layer, kv)

    def free(self, seq_id: int) -> None:
        self._swapped.pop(seq_id, None)
        self.backend.free(seq_id)

    @property
    def num_layers(self) -> int:
        return self.backend.pool.num_layers

    @property
    def used_blocks(self) -> int:
        return self.backend.pool.used_blocks
