"""The decode engine: the asyncio side of continuous batching.

One loop task runs `scheduler.schedule()` → `runner.step()` → `scheduler.record_step()` for as long as any
request is ready, running or swapped, or imported KV waits to be written; the model work (steps, swaps, KV writes,
frees) runs on one dedicated thread, so the event loop keeps serving RPCs while a step computes and the pool is
only ever touched by that thread, in submission order.

KV imports stay off the step's critical path: a pushed layer is verified, parsed and staged on the device (one
copy per field, sums recomputed) on a separate import thread; the model thread then writes staged layers into
the pool (one scatter per field) before each step, at most `import_budget_bytes` of them per step (at least
one layer), so a long prompt's arriving KV delays each running request's next token by a bounded amount.
Every request has an event queue its Generate stream reads: `TokenEvent`s (each tagged with its choice), then
STREAM_END once every choice finished (or was cancelled on its own), or a `ServiceError` when the request fails
(cancel, KV-transfer timeout, bad KV, model error): a failure ends every choice of the request.

A request with n > 1 choices gets one push, into its first choice's sequence; `fork_kv` then copies those pages
and state into the other choices' sequences on the model thread (a copy, not shared pages: each choice then
appends, quantizes its window and is swapped out on its own, so nothing in the KV backends knows about choices).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TypeVar

import grpc

from common.sampling import SamplingParams, TokenLogprobs
from common.service import Counters, ServiceError
from common.kv.backends import PreparedImport
from decode_service.runner import DecodeRunner, StepResult
from decode_service.scheduler import AdmissionError, DecodeRequest, RequestState, Scheduler, StepPlan

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class DecodeTimers:
    kv_wait_s: float  # admitted -> KV complete
    queue_s: float  # KV complete -> first decode step
    decode_s: float  # first decode step -> last token
    num_steps: int
    max_batch_size: int
    mean_batch_size: float
    attention_s: float  # part of decode_s inside the KV backend's attend (0 when not measured)


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    finish_reason: str | None = None
    step_s: float = 0.0  # 0 for the first token (sampled by the prefill instance)
    batch_size: int = 0
    timers: DecodeTimers | None = None  # on the last token only
    logprobs: TokenLogprobs | None = None  # when the request asked for logprobs
    choice: int = 0  # which of the request's n choices


class StreamEnd:
    """Every choice of the request ended: its Generate stream closes."""


STREAM_END = StreamEnd()
Event = TokenEvent | ServiceError | StreamEnd
DEFAULT_IMPORT_BUDGET_BYTES = 32 << 20


@dataclass
class StagedLayer:
    """A pushed layer staged on the device, waiting for the model thread to write it into the pool."""

    request: DecodeRequest
    layer: int
    staged: PreparedImport
    nbytes: int
    written: asyncio.Future


class DecodeEngine:
    def __init__(self, runner: DecodeRunner, scheduler: Scheduler, kv_timeout_s: float,
                 import_budget_bytes: int = DEFAULT_IMPORT_BUDGET_BYTES) -> None:
        if kv_timeout_s <= 0:
            raise ValueError(f"kv_timeout_s must be > 0, got {kv_timeout_s}")
        if import_budget_bytes < 1:
            raise ValueError(f"import_budget_bytes must be >= 1, got {import_budget_bytes}")
        self.runner, self.scheduler, self.kv_timeout_s = runner, scheduler, kv_timeout_s
        self.import_budget_bytes = import_budget_bytes
        self.counters = Counters()
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode-model")
        self._import_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode-kv-import")
        self._staged: deque[StagedLayer] = deque()
        self._events: dict[str, asyncio.Queue[Event]] = {}
        self._choices: dict[str, list[DecodeRequest]] = {}  # every choice of each request not yet ended
        self._open: dict[str, set[int]] = {}  # per request, the choices whose last event is still to come
        self._kv_deadlines: dict[str, asyncio.TimerHandle] = {}
        self._wakeup = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self.draining = False

    async def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name="decode-loop")

    async def stop(self) -> None:
        for request in list(self.scheduler.requests.values()):
            self.fail(request, ServiceError(grpc.StatusCode.UNAVAILABLE, "the decode instance is shutting down"))
        if self._loop_task is not None:
            self._loop_task.cancel()
        self._import_thread.shutdown(wait=True)
        self._model_thread.shutdown(wait=True)

    def begin_drain(self) -> None:
        self.draining = True

    @property
    def active_requests(self) -> int:
        return len(self.scheduler.requests)

    async def on_model_thread(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._model_thread, fn, *args)

    async def import_layer(self, request: DecodeRequest, layer: int, chunks: list[bytes]) -> None:
        """Stage a pushed layer on the import thread, then have the model thread write it before a step; returns
        once it is in the pool (WireFormatError / WireChecksumError if the chunks are bad)."""
        loop = asyncio.get_running_loop()
        staged = await loop.run_in_executor(self._import_thread, self.runner.stage_import, layer, chunks)
        written = loop.create_future()
        self._staged.append(StagedLayer(request, layer, staged, sum(map(len, chunks)), written))
        self._wakeup.set()
        await written

    def _take_staged(self) -> list[StagedLayer]:
        """Staged layers for the next model-thread call: up to the byte budget, at least one; those of requests
        no longer waiting for their KV are dropped."""
        taken, nbytes = [], 0
        while self._staged and (not taken or nbytes + self._staged[0].nbytes <= self.import_budget_bytes):
            item = self._staged.popleft()
            if item.request.state is not RequestState.WAITING_FOR_KV:
                item.written.set_exception(ServiceError(grpc.StatusCode.CANCELLED, f"request "
                                                        f"{item.request.request_id!r} ended before its KV was stored"))
                continue
            taken.append(item)
            nbytes += item.nbytes
        return taken

    # -- request life cycle ---------------------------------------------------------------------------------------

    def admit(self, request_id: str, prompt_len: int, params: SamplingParams, prompt_ids: tuple[int, ...] = (),
              n: int = 1) -> tuple[list[DecodeRequest], asyncio.Queue]:
        """Register a request's n choices (their KV room reserved) and return them with the request's event queue."""
        if params.repetition_penalty != 1 and len(prompt_ids) != prompt_len:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"repetition_penalty needs the {prompt_len} "
                               f"prompt token ids, got {len(prompt_ids)}")
        if self.draining:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the decode instance is draining (shutting down)")
        try:
            choices = self.scheduler.admit_choices(request_id, prompt_len, params, n)
        except AdmissionError as error:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)) from None
        except ValueError as error:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        for request in choices:
            request.prompt_ids = prompt_ids if params.repetition_penalty != 1 else ()
        self.counters.requests_total += 1
        self.counters.prompt_tokens += prompt_len
        events: asyncio.Queue[Event] = asyncio.Queue()
        self._events[request_id] = events
        self._choices[request_id] = choices
        self._open[request_id] = set(range(n))
        self._kv_deadlines[request_id] = asyncio.get_running_loop().call_later(
            self.kv_timeout_s, self._kv_timeout, choices[0])
        return choices, events

    async def fork_kv(self, request: DecodeRequest) -> None:
        """Copy the prompt's KV, pushed into the first choice's sequence, into the request's other live choices'
        (KVCacheFull if the pool cannot hold them: admission counted their blocks, so that is a bug)."""
        others = [c for c in self._choices.get(request.request_id, ())[1:]
                  if c.state is RequestState.WAITING_FOR_KV and not c.cancel_pending]
        if others:
            await self.on_model_thread(self.runner.fork, request.seq_id, [c.seq_id for c in others])

    def kv_ready(self, request: DecodeRequest, first_tokens: Sequence[int],
                 first_logprobs: Sequence[TokenLogprobs | None] = ()) -> None:
        """The prompt's KV is stored for every choice: emit each choice's first token (sampled by the prefill)
        and queue the choices for decoding; choices cancelled meanwhile end here."""
        choices = self._choices[request.request_id]
        if len(first_tokens) != len(choices):
            raise ValueError(f"{len(first_tokens)} first tokens for {len(choices)} choices")
        self._kv_deadlines.pop(request.request_id).cancel()
        for choice, token, logprobs in zip(choices, first_tokens, list(first_logprobs) or [None] * len(choices)):
            if choice.cancel_pending:
                self.scheduler.finish(choice)
                self._release(choice)
                continue
            self.scheduler.kv_ready(choice, token)
            self._emit(choice, TokenEvent(token, choice.finish_reason, logprobs=logprobs, choice=choice.choice))
        self._wakeup.set()

    def fail(self, request: DecodeRequest, error: ServiceError) -> None:
        """End a live request, every choice of it, with an error status and free its KV (no-op once it ended)."""
        if request.state is not RequestState.FINISHED:
            self.fail_request(request, error)

    def fail_request(self, request: DecodeRequest, error: ServiceError) -> None:
        """End the request `request` is a choice of (finished or not) with an error status: every choice stops and
        its KV is freed. A no-op once the request ended (another request may reuse its id later)."""
        choices = self._choices.get(request.request_id)
        if choices is None or not any(c is request for c in choices):
            return
        del self._choices[request.request_id], self._open[request.request_id]
        log.info("request %s failed: %s: %s", request.request_id, error.code.name, error.message)
        self.counters.count_failure(error.code)
        self._events.pop(request.request_id).put_nowait(error)
        deadline = self._kv_deadlines.pop(request.request_id, None)
        if deadline is not None:
            deadline.cancel()
        for choice in choices:
            self.scheduler.finish(choice)
            self._free(choice)

    def cancel(self, request_id: str, choice: int | None = None) -> bool:
        """Cancel a request (every choice), or one choice of it; False when there is no such live one. A choice
        whose KV is still on the way ends once it landed (its pages are the source of the others' copies)."""
        choices = self._choices.get(request_id)
        if choice is None:
            if choices is not None:
                self.fail_request(choices[0], ServiceError(grpc.StatusCode.CANCELLED,
                                                           f"request {request_id!r} was cancelled"))
            return choices is not None
        if choices is None or not 0 <= choice < len(choices):
            return False
        target = choices[choice]
        if target.state is RequestState.FINISHED or target.cancel_pending:
            return False
        if target.state is RequestState.WAITING_FOR_KV:
            target.cancel_pending = True
        else:
            self.scheduler.finish(target)
            self._release(target)
        return True

    def _kv_timeout(self, request: DecodeRequest) -> None:
        if request.state is RequestState.WAITING_FOR_KV:
            self.fail(request, ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                            f"the KV of request {request.request_id!r} did not arrive within "
                                            f"{self.kv_timeout_s:g} s"))

    def _release(self, request: DecodeRequest) -> None:
        """Free a choice the scheduler finished; once every choice of its request ended, close the stream."""
        self._free(request)
        choices, open_choices = self._choices.get(request.request_id), self._open.get(request.request_id)
        if choices is None or not any(c is request for c in choices):
            return
        open_choices.discard(request.choice)
        if not open_choices:
            del self._choices[request.request_id], self._open[request.request_id]
            deadline = self._kv_deadlines.pop(request.request_id, None)
            if deadline is not None:
                deadline.cancel()
            self._events.pop(request.request_id).put_nowait(STREAM_END)

    def _free(self, request: DecodeRequest) -> None:
        """Free a choice's KV on the model thread (after any step still using it)."""
        self._model_thread.submit(self.runner.free, request.seq_id).add_done_callback(_log_failure)
        self._wakeup.set()  # its blocks may let a swapped or ready request run

    def _emit(self, request: DecodeRequest, event: TokenEvent) -> None:
        self.counters.generated_tokens += 1
        if request.state is RequestState.FINISHED:
            event = replace(event, timers=_timers(request))
        self._events[request.request_id].put_nowait(event)
        if request.state is RequestState.FINISHED:
            self._release(request)

    # -- the batching loop ----------------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            plan = self.scheduler.schedule()
            for request, message in plan.failed:
                self.fail_request(request, ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, message))
            if plan.failed:  # a failed request's other choices may be in the plan: they are gone now
                plan.drop_finished()
            imports = self._take_staged()
            if not (plan.batch or plan.swap_out or plan.swap_in or imports):
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._step(plan, imports)

    async def _step(self, plan: StepPlan, imports: list[StagedLayer]) -> None:
        start = time.monotonic()
        import_errors, result, failure = await self.on_model_thread(self._model_step, plan, imports)
        for item, error in zip(imports, import_errors):
            if not item.written.done():
                item.written.set_result(None) if error is None else item.written.set_exception(error)
        if failure is not None:  # a model error fails this step's requests, not the instance
            for request in plan.batch + plan.swap_in + plan.swap_out:
                self.fail(request, ServiceError(grpc.StatusCode.INTERNAL, f"decode step failed: {failure}"))
            return
        step_s = time.monotonic() - start
        if not plan.batch:
            return
        self.counters.max_batch_size = max(self.counters.max_batch_size, len(plan.batch))
        logprobs = {request.seq_id: lp for request, lp in zip(plan.batch, result.logprobs)}
        for request in self.scheduler.record_step(plan.batch, result.tokens, step_s, result.attention_s):
            self._emit(request, TokenEvent(request.last_token, request.finish_reason, step_s, len(plan.batch),
                                           logprobs=logprobs[request.seq_id], choice=request.choice))

    def _model_step(self, plan: StepPlan, imports: list[StagedLayer]
                    ) -> tuple[list[Exception | None], StepResult | None, Exception | None]:
        """On the model thread: write the staged KV (an error fails its push, not the step), then run the plan."""
        import_errors = [_call(self.runner.write_import, item.request.seq_id, item.layer, item.staged)
                         for item in imports]
        try:
            return import_errors, self.runner.step(plan), None
        except Exception as error:
            log.exception("decode step failed")
            return import_errors, None, error


def _call(fn: Callable[..., object], *args: object) -> Exception | None:
    try:
        fn(*args)
    except Exception as error:
        return error
    return None


def _timers(request: DecodeRequest) -> DecodeTimers:
    now = time.monotonic()
    first_step = request.first_step_at or now
    return DecodeTimers(
        kv_wait_s=request.kv_done_at - request.admitted_at,
        queue_s=max(0.0, first_step - request.kv_done_at),
        decode_s=now - first_step,
        num_steps=request.num_steps,
        max_batch_size=request.max_batch_size,
        mean_batch_size=request.sum_batch_size / request.num_steps if request.num_steps else 0.0,
        attention_s=request.attention_s,
    )


def _log_failure(future) -> None:
    if future.exception() is not None:
        log.error("freeing KV failed", exc_info=future.exception())
