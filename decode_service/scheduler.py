"""Continuous batching for the decode service: request states, KV admission and batch selection.

A request's life (every transition happens on the event loop; the model thread only runs forwards):

    admit ──> WAITING_FOR_KV ──kv_ready──> READY ──schedule──> RUNNING ──(stop / max_tokens)──> FINISHED
                    │                        │                    │
                    └───────── cancel, error, KV-transfer timeout ┴──────────────────────────> FINISHED

Admission reserves a request's worst case up front: the pages of prompt_len + max_tokens - 1 stored tokens (the
last sampled token is never fed back) and one sequence slot. A request once admitted therefore never runs out of
KV room mid-decode, so there is no preemption; one that does not fit is refused before any of its KV is sent.
The scheduler only counts pages: the model thread allocates them in the pool as tokens arrive, always within
what was reserved here.
"""
from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from common.kv.format import KVLayout
from common.sampling import SamplingParams
from common.sequence import finish_reason


class RequestState(enum.Enum):
    WAITING_FOR_KV = "waiting_for_kv"  # admitted; its KV is being pushed by a prefill instance
    READY = "ready"  # KV imported and first token known; waiting for a batch slot
    RUNNING = "running"  # decoded at every step
    FINISHED = "finished"  # stopped, failed or cancelled; its KV is (being) freed


class AdmissionError(RuntimeError):
    """The request does not fit in the KV pool or the sequence slots right now."""


@dataclass
class DecodeRequest:
    request_id: str
    seq_id: int
    prompt_len: int
    params: SamplingParams
    reserved_blocks: int
    state: RequestState = RequestState.WAITING_FOR_KV
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" or "length" when it ended normally
    prompt_ids: tuple[int, ...] = ()  # only kept when a repetition penalty needs them
    grammar: Any = None  # structured output: its llguidance matcher, built by the runner at the first step
    # Timers (time.monotonic) and batch statistics for DecodeTimers.
    admitted_at: float = field(default_factory=time.monotonic)
    kv_done_at: float = 0.0
    first_step_at: float = 0.0
    num_steps: int = 0
    max_batch_size: int = 0
    sum_batch_size: int = 0
    attention_s: float = 0.0  # summed over the steps the request was in

    @property
    def num_cached(self) -> int:
        """Tokens in the KV cache before the next step: the prompt and every output but the newest."""
        return self.prompt_len + len(self.output_ids) - 1

    @property
    def last_token(self) -> int:
        return self.output_ids[-1]

    def append(self, token: int) -> str | None:
        """Record a generated token; returns the finish reason when it ends the request."""
        self.output_ids.append(token)
        self.finish_reason = finish_reason(self.output_ids, self.params)
        return self.finish_reason


class Scheduler:
    def __init__(self, layout: KVLayout, total_blocks: int, max_seqs: int, max_batch_size: int) -> None:
        if total_blocks < 1 or max_seqs < 1 or max_batch_size < 1:
            raise ValueError(
                f"need total_blocks, max_seqs and max_batch_size >= 1, got {total_blocks}, {max_seqs}, {max_batch_size}"
            )
        self.layout = layout
        self.total_blocks, self.max_seqs, self.max_batch_size = total_blocks, max_seqs, max_batch_size
        self.requests: dict[str, DecodeRequest] = {}
        self.ready: deque[DecodeRequest] = deque()
        self.running: list[DecodeRequest] = []
        self.reserved_blocks = 0
        self._next_seq_id = 0

    # -- admission ------------------------------------------------------------------------------------------------

    def blocks_needed(self, prompt_len: int, max_tokens: int) -> int:
        return self.layout.blocks_for(prompt_len + max_tokens - 1)

    def admit(self, request_id: str, prompt_len: int, params: SamplingParams) -> DecodeRequest:
        """Register a request and reserve its KV; AdmissionError when it does not fit (nothing is reserved)."""
        if request_id in self.requests:
            raise ValueError(f"request {request_id!r} is already admitted")
        if prompt_len < 1:
            raise ValueError(f"prompt_len must be >= 1, got {prompt_len}")
        need = self.blocks_needed(prompt_len, params.max_tokens)
        if need > self.total_blocks:
            raise AdmissionError(
                f"request {request_id!r} needs {need} KV blocks for {prompt_len} prompt + {params.max_tokens} new "
                f"tokens, more than this instance's {self.total_blocks}"
            )
        if need > self.free_blocks or len(self.requests) >= self.max_seqs:
            raise AdmissionError(
                f"request {request_id!r} needs {need} KV blocks and a sequence slot; {self.free_blocks} blocks and "
                f"{self.max_seqs - len(self.requests)} slots are free"
            )
        request = DecodeRequest(request_id, self._next_seq_id, prompt_len, params, need)
        self._next_seq_id += 1
        self.requests[request_id] = request
        self.reserved_blocks += need
        return request

    @property
    def free_blocks(self) -> int:
        """Blocks no admitted request has reserved: what admission can still hand out."""
        return self.total_blocks - self.reserved_blocks

    # -- transitions ----------------------------------------------------------------------------------------------

    def kv_ready(self, request: DecodeRequest, first_token: int) -> None:
        """The prompt's KV is imported and the prefill's token is known: queue the request for decoding
        (or finish it, when that first token already stops it)."""
        if request.state is not RequestState.WAITING_FOR_KV:
            raise ValueError(f"request {request.request_id!r} is {request.state.value}, not waiting for KV")
        request.kv_done_at = time.monotonic()
        if request.append(first_token) is not None:
            self.finish(request)
        else:
            request.state = RequestState.READY
            self.ready.append(request)

    def schedule(self) -> list[DecodeRequest]:
        """The next step's batch: every running request, topped up from the ready queue in arrival order."""
        while self.ready and len(self.running) < self.max_batch_size:
            request = self.ready.popleft()
            request.state = RequestState.RUNNING
            self.running.append(request)
        return list(self.running)

    def record_step(self, batch: list[DecodeRequest], tokens: list[int], step_s: float,
                    attention_s: float = 0.0) -> list[DecodeRequest]:
        """Append each request's new token; returns the requests of the batch still live (not cancelled
        while the step ran), in batch order. Finished ones leave the running set. `attention_s` is the step's
        time in attention, charged to every request of the batch (like the step's wall time)."""
        now = time.monotonic()
        live = []
        for request, token in zip(batch, tokens, strict=True):
            if request.state is not RequestState.RUNNING:
                continue
            request.first_step_at = request.first_step_at or now - step_s
            request.num_steps += 1
            request.max_batch_size = max(request.max_batch_size, len(batch))
            request.sum_batch_size += len(batch)
            request.attention_s += attention_s
            if request.append(token) is not None:
                self.finish(request)
            live.append(request)
        return live

    def finish(self, request: DecodeRequest) -> None:
        """Take a request out of every queue and release its reservation (idempotent)."""
        if self.requests.pop(request.request_id, None) is None:
            return
        self.reserved_blocks -= request.reserved_blocks
        if request.state is RequestState.READY:
            self.ready.remove(request)
        elif request.state is RequestState.RUNNING:
            self.running.remove(request)
        request.state = RequestState.FINISHED

    # -- introspection --------------------------------------------------------------------------------------------

    def get(self, request_id: str) -> DecodeRequest | None:
        return self.requests.get(request_id)

    @property
    def num_waiting(self) -> int:
        """Admitted and not running: waiting for KV or for a batch slot."""
        return len(self.requests) - len(self.running)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.ready)
