"""The prefill engine: a FIFO of prompts, batched by a token budget, each batch's KV streamed as it is made.

    submit ──> queue ──(batch: FIFO while the prompt tokens fit the budget)──> model thread forward
                                                                                  │ every layer
                           KVSender per request (PushKV to its decode instance) <─┘
    result = first token + timings, once the decode instance acknowledged the KV

The loop starts the next batch as soon as the forward returns; the previous batch's pushes (paced by the link
token bucket, if any) finish meanwhile, so compute and transfer overlap across batches as well as across layers
(across batches only with kv_push="after-forward", which holds each request's KV until its forward is done).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from common.grpc_security import TransportSecurity
from common.sampling import SamplingParams, TokenLogprobs
from common.service import Counters, ServiceError, chunks_per_layer
from prefill_service.kv_sender import KV_PUSH_MODES, DecodeStubs, KVSender, SendResult
from prefill_service.token_bucket import TokenBucket
from prefill_service.worker import PrefillOutput, PrefillWorker
from proto import hack_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefillResult:
    first_tokens: tuple[int, ...]  # one per choice
    queue_s: float
    compute_s: float
    transfer_s: float
    kv_bytes: int
    prompt_logprobs: list[TokenLogprobs] | None = None


@dataclass
class PrefillJob:
    request_id: str
    token_ids: list[int]
    params: SamplingParams
    decode_address: str
    seq_id: int
    result: asyncio.Future = field(repr=False)
    prompt_logprobs: int | None = None  # top logprobs per prompt token, when the request scores its prompt
    n: int = 1  # choices: a first token is sampled for each, the KV is pushed once
    received_at: float = field(default_factory=time.monotonic)
    sender: KVSender | None = field(default=None, repr=False)
    output: PrefillOutput | None = None  # known once the forward ran
    compute_s: float = 0.0


class PrefillEngine:
    def __init__(self, worker: PrefillWorker, identity: dict[str, str | int], token_budget: int,
                 max_batch_seqs: int, link: TokenBucket | None = None,
                 security: TransportSecurity | None = None, kv_push: str = "layerwise") -> None:
        if token_budget < 1 or max_batch_seqs < 1:
            raise ValueError(f"token_budget and max_batch_seqs must be >= 1, got {token_budget}, {max_batch_seqs}")
        if kv_push not in KV_PUSH_MODES:
            raise ValueError(f"kv_push must be one of {', '.join(KV_PUSH_MODES)}, got {kv_push!r}")
        self.kv_push = kv_push
        self.worker, self.identity, self.link = worker, identity, link
        self.token_budget, self.max_batch_seqs = token_budget, max_batch_seqs
        self.counters = Counters()
        self.stubs = DecodeStubs(security)
        self.draining = False
        self._queue: deque[PrefillJob] = deque()
        self._jobs: dict[str, PrefillJob] = {}  # queued or running, until their result is set
        self._wakeup = asyncio.Event()
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefill-model")
        self._next_seq_id = 0
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._spawn(self._run())

    async def stop(self) -> None:
        for job in list(self._jobs.values()):
            self._fail(job, ServiceError(grpc.StatusCode.UNAVAILABLE, "the prefill instance is shutting down"))
        for task in self._tasks:
            task.cancel()
        self._model_thread.shutdown(wait=True)
        await self.stubs.close()

    def begin_drain(self) -> None:
        self.draining = True

    @property
    def active_requests(self) -> int:
        return len(self._jobs)

    @property
    def queue_len(self) -> int:
        """Requests received and not finished (queued, computing or pushing KV)."""
        return len(self._jobs)

    async def prefill(self, request_id: str, token_ids: list[int], params: SamplingParams,
                      decode_address: str, prompt_logprobs: int | None = None, n: int = 1) -> PrefillResult:
        if self.draining:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the prefill instance is draining (shutting down)")
        if request_id in self._jobs:
            raise ServiceError(grpc.StatusCode.ALREADY_EXISTS, f"request {request_id!r} is already being prefilled")
        job = PrefillJob(request_id, token_ids, params, decode_address, self._next_seq_id,
                         asyncio.get_running_loop().create_future(), prompt_logprobs, n)
        self._next_seq_id += 1
        self._jobs[request_id] = job
        self._queue.append(job)
        self.counters.requests_total += 1
        self.counters.prompt_tokens += len(token_ids)
        self._wakeup.set()
        return await job.result

    def cancel(self, request_id: str) -> bool:
        job = self._jobs.get(request_id)
        if job is None:
            return False
        self._fail(job, ServiceError(grpc.StatusCode.CANCELLED, f"request {request_id!r} was cancelled"))
        return True

    def _fail(self, job: PrefillJob, error: ServiceError) -> None:
        if self._jobs.pop(job.request_id, None) is None:
            return
        if job in self._queue:
            self._queue.remove(job)
        if job.sender is not None:
            job.sender.abort()
        self.counters.count_failure(error.code)
        if not job.result.done():
            job.result.set_exception(error)

    # -- the batching loop ----------------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._prefill_batch(take_batch(self._queue, self.token_budget, self.max_batch_seqs))

    async def _prefill_batch(self, batch: list[PrefillJob]) -> None:
        started = time.monotonic()
        by_seq = {job.seq_id: job for job in batch}
        for job in batch:
            job.sender = KVSender(self.stubs.get(job.decode_address), job.decode_address, self._header(job), self.link,
                                  after_forward=self.kv_push == "after-forward")
            self._spawn(self._push(job, started))
        loop = asyncio.get_running_loop()

        def on_layer(seq_id: int, layer: int, chunks: list[bytes]) -> None:  # model thread
            loop.call_soon_threadsafe(by_seq[seq_id].sender.put_layer, layer, chunks)

        try:
            outputs = await loop.run_in_executor(
                self._model_thread, self.worker.run, list(by_seq), [j.token_ids for j in batch],
                [j.params for j in batch], on_layer, [j.prompt_logprobs for j in batch], [j.n for j in batch])
        except Exception as error:  # a model error fails this batch, not the instance
            log.exception("prefill failed")
            for job in batch:
                self._fail(job, ServiceError(grpc.StatusCode.INTERNAL, f"prefill failed: {error}"))
            return
        compute_s = time.monotonic() - started
        self.counters.max_batch_size = max(self.counters.max_batch_size, len(batch))
        for job, output in zip(batch, outputs):
            job.sender.finish(*output.first_tokens, first_logprobs=output.first_logprobs)
            job.output, job.compute_s = output, compute_s

    async def _push(self, job: PrefillJob, started: float) -> None:
        try:
            sent: SendResult = await job.sender.run()
        except ServiceError as error:
            self._fail(job, error)
            return
        self.counters.kv_bytes += sent.kv_bytes
        if self._jobs.pop(job.request_id, None) is None:  # cancelled meanwhile
            return
        self.counters.generated_tokens += job.n
        if job.result.done():  # the Prefill call was cancelled or abandoned while the push finished
            return
        job.result.set_result(PrefillResult(job.output.first_tokens, started - job.received_at, job.compute_s,
                                            sent.transfer_s, sent.kv_bytes, job.output.prompt_logprobs))

    def _header(self, job: PrefillJob) -> hack_pb2.KVHeader:
        num_blocks = self.identity["num_layers"] * chunks_per_layer(self.worker.backend.layout, len(job.token_ids))
        return hack_pb2.KVHeader(request_id=job.request_id, num_tokens=len(job.token_ids), num_blocks=num_blocks,
                                 **self.identity)

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def take_batch(queue: deque[PrefillJob], token_budget: int, max_seqs: int) -> list[PrefillJob]:
    """Pop the next batch: FIFO while the prompt tokens fit the budget; the first prompt always goes, however long."""
    batch = [queue.popleft()]
    tokens = len(batch[0].token_ids)
    while queue and len(batch) < max_seqs and tokens + len(queue[0].token_ids) <= token_budget:
        batch.append(queue.popleft())
        tokens += len(batch[-1].token_ids)
    return batch
