"""Continuous batching for the decode service: request states, KV admission, preemption and batch selection.

A request's life (every transition happens on the event loop; the model thread runs what a StepPlan says):

    admit ──> WAITING_FOR_KV ──kv_ready──> READY ──schedule──> RUNNING ──(stop / max_tokens)──> FINISHED
                    │                        │                  │    ^
                    │                        │           preempt│    │swap in
                    │                        │                  v    │
                    │                        │                 SWAPPED
                    └───────── cancel, error, KV-transfer timeout ┴──────────────────────────> FINISHED

Blocks are allocated as sequences grow, like vLLM: admission counts the pages of the prompt plus the first
decoded token (the prefill's token, stored by the first step), not prompt + max_tokens, so max_tokens reserves
nothing it may never use. Each step every running request grows by one token, oldest first; when the pool has
no block for that, the newest running request is preempted: its KV is swapped out to host memory (exact, so its
output does not change) and it resumes, oldest first, once its blocks are free again. Admission still refuses a
request whose prompt does not fit the free blocks now, and one that could not finish even alone in the pool
(prompt + max_tokens larger than the pool). With the host swap space full too, the preempted request fails with
RESOURCE_EXHAUSTED rather than stall every other one.
A request with n choices (OpenAI's `n`) is n DecodeRequests with one request_id: each its own sequence, blocks,
seed, tokens and finish reason, admitted together (all or nothing, the prompt's blocks counted once per choice,
since each choice gets its own copy of the prompt's KV) and from then on scheduled and preempted one by one.
The scheduler only counts blocks (block_manager.py); the model thread allocates them in the pool within those
counts, in the order the plans arrive.
"""
from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from common.kv.format import KVLayout
from common.sampling import SamplingParams, choice_params
from common.sequence import finish_reason
from decode_service.block_manager import BlockCount, BlockManager


class RequestState(enum.Enum):
    WAITING_FOR_KV = "waiting_for_kv"  # admitted; its KV is being pushed by a prefill instance
    READY = "ready"  # KV imported and first token known; waiting for a batch slot
    RUNNING = "running"  # decoded at every step
    SWAPPED = "swapped"  # preempted: its KV waits in host memory for room in the pool
    FINISHED = "finished"  # stopped, failed or cancelled; its KV is (being) freed


class AdmissionError(RuntimeError):
    """The request does not fit in the KV pool or the sequence slots right now."""


@dataclass
class DecodeRequest:
    request_id: str
    seq_id: int
    prompt_len: int
    params: SamplingParams
    blocks: BlockCount = field(default_factory=BlockCount)
    state: RequestState = RequestState.WAITING_FOR_KV
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" or "length" when it ended normally
    prompt_ids: tuple[int, ...] = ()  # only kept when a repetition penalty needs them
    grammar: Any = None  # structured output: its llguidance matcher, built by the runner at the first step
    choice: int = 0  # which of the request's n choices
    cancel_pending: bool = False  # this choice was cancelled while its KV was on the way: dropped once it lands
    # Timers (time.monotonic) and batch statistics for DecodeTimers.
    admitted_at: float = field(default_factory=time.monotonic)
    kv_done_at: float = 0.0
    first_step_at: float = 0.0
    num_steps: int = 0
    max_batch_size: int = 0
    sum_batch_size: int = 0
    attention_s: float = 0.0  # summed over the steps the request was in
    num_preemptions: int = 0

    @property
    def key(self) -> tuple[str, int]:
        return self.request_id, self.choice

    @property
    def reserved_blocks(self) -> int:
        """Pool blocks the request holds now (at admission: its prompt and first decoded token)."""
        return self.blocks.pool

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


@dataclass
class StepPlan:
    """What the model thread does next, in this order: swap out, swap in, then one decode step of `batch`."""

    batch: list[DecodeRequest] = field(default_factory=list)
    swap_out: list[DecodeRequest] = field(default_factory=list)
    swap_in: list[DecodeRequest] = field(default_factory=list)
    failed: list[tuple[DecodeRequest, str]] = field(default_factory=list)  # preempted with no swap space left

    def __bool__(self) -> bool:
        return bool(self.batch or self.swap_out or self.swap_in or self.failed)

    def drop_finished(self) -> None:
        """Leave out the requests that finished since the plan was made (their KV is being freed)."""
        for name in ("batch", "swap_out", "swap_in"):
            setattr(self, name, [r for r in getattr(self, name) if r.state is not RequestState.FINISHED])


class Scheduler:
    def __init__(self, layout: KVLayout, total_blocks: int, max_seqs: int, max_batch_size: int,
                 swap_blocks: int = 0) -> None:
        if total_blocks < 1 or max_seqs < 1 or max_batch_size < 1:
            raise ValueError(
                f"need total_blocks, max_seqs and max_batch_size >= 1, got {total_blocks}, {max_seqs}, {max_batch_size}"
            )
        self.layout = layout
        self.blocks = BlockManager(layout, total_blocks, swap_blocks)
        self.total_blocks, self.max_seqs, self.max_batch_size = total_blocks, max_seqs, max_batch_size
        self.requests: dict[tuple[str, int], DecodeRequest] = {}  # live choices by (request_id, choice)
        self.groups: dict[str, list[DecodeRequest]] = {}  # every choice of each request with a live one
        self.ready: deque[DecodeRequest] = deque()
        self.running: list[DecodeRequest] = []
        self.swapped: deque[DecodeRequest] = deque()
        self.num_preemptions = 0
        self._next_seq_id = 0

    # -- admission ------------------------------------------------------------------------------------------------

    def admit(self, request_id: str, prompt_len: int, params: SamplingParams) -> DecodeRequest:
        """Register a one-choice request (see admit_choices)."""
        return self.admit_choices(request_id, prompt_len, params, 1)[0]

    def admit_choices(self, request_id: str, prompt_len: int, params: SamplingParams, n: int) -> list[DecodeRequest]:
        """Register a request's n choices and count their prompt blocks; AdmissionError when they do not fit
        (nothing held)."""
        if request_id in self.groups:
            raise ValueError(f"request {request_id!r} is already admitted")
        if prompt_len < 1:
            raise ValueError(f"prompt_len must be >= 1, got {prompt_len}")
        params_of_choices = choice_params(params, n)  # ValueError for a bad n
        longest = self.blocks.blocks_for(prompt_len + params.max_tokens - 1)
        if longest > self.total_blocks:
            raise AdmissionError(
                f"request {request_id!r} needs {longest} KV blocks for {prompt_len} prompt + {params.max_tokens} new "
                f"tokens, more than this instance's {self.total_blocks}"
            )
        need = n * self.blocks.blocks_for(prompt_len + 1)
        if need > self.admittable_blocks or len(self.requests) + n > self.max_seqs:
            slots = "a sequence slot" if n == 1 else f"{n} sequence slots (one per choice)"
            raise AdmissionError(
                f"request {request_id!r} needs {need} KV blocks and {slots}; {self.admittable_blocks} blocks "
                f"and {self.max_seqs - len(self.requests)} slots are free"
            )
        choices = []
        for choice, choice_params_ in enumerate(params_of_choices):
            request = DecodeRequest(request_id, self._next_seq_id, prompt_len, choice_params_, choice=choice)
            self.blocks.allocate(request.blocks, prompt_len + 1)
            self._next_seq_id += 1
            self.requests[request.key] = request
            choices.append(request)
        self.groups[request_id] = choices
        return choices

    @property
    def free_blocks(self) -> int:
        """Pool blocks no request holds: what growth can still hand out."""
        return self.blocks.free_blocks

    @property
    def admittable_blocks(self) -> int:
        """Free blocks less what the swapped requests need to resume: new requests do not take their room."""
        resume = sum(self.blocks.blocks_for(r.num_cached + 1) for r in self.swapped)
        return max(0, self.free_blocks - resume)

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

    def schedule(self) -> StepPlan:
        """The next step: every running request that has (or gets, by preempting newer ones) a block for its next
        token; without preemptions, swapped requests resume and ready ones start, oldest first, while they fit."""
        plan = StepPlan()
        self._grow_running(plan)
        if not plan.swap_out and not plan.failed:
            self._resume_swapped(plan)
            self._start_ready()  # ready requests already hold the blocks of their first step
        plan.batch = list(self.running)
        return plan

    def _grow_running(self, plan: StepPlan) -> None:
        queue, kept = list(self.running), []
        while queue:
            request = queue.pop(0)
            while not self.blocks.can_append(request.blocks, request.num_cached + 1):
                victim = queue.pop() if queue else request  # the newest running request gives way
                self._preempt(victim, plan)
                if victim is request:
                    break
            else:
                self.blocks.allocate(request.blocks, request.num_cached + 1)
                kept.append(request)
        self.running = kept

    def _preempt(self, request: DecodeRequest, plan: StepPlan) -> None:
        self.num_preemptions += 1
        request.num_preemptions += 1
        if not self.blocks.can_swap_out(request.blocks):
            self.finish(request)
            plan.failed.append((request, f"request {request.request_id!r} was preempted (KV pool full) and the "
                                         f"host swap space has {self.blocks.free_swap_blocks} of the "
                                         f"{request.blocks.pool} blocks it needs"))
            return
        self.blocks.swap_out(request.blocks)
        request.state = RequestState.SWAPPED
        self.swapped.append(request)
        plan.swap_out.append(request)

    def _resume_swapped(self, plan: StepPlan) -> None:
        while self.swapped and len(self.running) < self.max_batch_size:
            request = self.swapped[0]
            if not self.blocks.can_swap_in(request.blocks, request.num_cached + 1):
                return
            self.swapped.popleft()
            self.blocks.swap_in(request.blocks, request.num_cached + 1)
            request.state = RequestState.RUNNING
            self.running.append(request)
            plan.swap_in.append(request)

    def _start_ready(self) -> None:
        while self.ready and len(self.running) < self.max_batch_size:
            request = self.ready[0]
            if not self.blocks.can_append(request.blocks, request.num_cached + 1):
                return
            self.ready.popleft()
            self.blocks.allocate(request.blocks, request.num_cached + 1)
            request.state = RequestState.RUNNING
            self.running.append(request)

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
        """Take a choice out of every queue and release its blocks (idempotent)."""
        if self.requests.pop(request.key, None) is None:
            return
        if all(choice.key not in self.requests for choice in self.groups[request.request_id]):
            del self.groups[request.request_id]
        self.blocks.free(request.blocks)
        if request.state is RequestState.READY:
            self.ready.remove(request)
        elif request.state is RequestState.RUNNING:
            self.running.remove(request)
        elif request.state is RequestState.SWAPPED:
            self.swapped.remove(request)
        request.state = RequestState.FINISHED

    # -- introspection --------------------------------------------------------------------------------------------

    def get(self, request_id: str) -> list[DecodeRequest] | None:
        """Every choice of a request that still has a live one (finished choices included), in choice order."""
        return self.groups.get(request_id)

    @property
    def num_waiting(self) -> int:
        """Admitted and not running: waiting for KV, for a batch slot or for room to swap back in."""
        return len(self.requests) - len(self.running)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.ready or self.swapped)
