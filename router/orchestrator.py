"""One request's trip through a decode and a prefill instance.

    pick D ── D.Generate ──▶ Admitted (KV room reserved on D)
                │
    pick P ── P.Prefill ──▶ P runs the prompt and pushes its KV to D ──▶ PrefillResponse (timings)
                │             a failure before D streamed a token: retry on another P
                ▼
    D's stream: token, token, ..., token with finish_reason  ──▶ yielded by `Orchestrator.generate`

D is opened first so that it has admitted the request (and reserved KV room, or refused with
RESOURCE_EXHAUSTED, in which case another D is tried) before any prefill compute is spent, and so that the
KV pushed by P always finds the request registered. Closing the generator early (stop string, client gone,
error) cancels the Generate call and the running prefill, and sends Cancel to both instances.

Migration: when D fails mid-request (connection lost, UNAVAILABLE or another server-side status, silent past
the token timeout, or refusing the KV for such a reason), the request resumes on another D: a new attempt whose
prompt is the original prompt plus every token streamed so far, max_tokens what is left, and sampling positions
offset by the tokens already out (seeded draws stay those of the uninterrupted run). P runs the whole new prompt
again, so the client's stream just goes on, with no token repeated or missing. At most `max_migrations` times.

n choices (OpenAI's `n`) run as one request: one Generate (D reserves room for every choice), one Prefill (P runs
the prompt once and samples each choice's first token), one KV push; D copies the KV into each choice and streams
their tokens interleaved, tagged with `choice`. A choice the client is done with (a stop string) is cancelled on
its own. Migrated after tokens were streamed, the choices part ways: each unfinished one resumes as its own
one-choice request (prompt + its tokens, seed + its index), so each output stays that of the uninterrupted run.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Set
from dataclasses import dataclass, field, replace
from typing import TypeVar

import grpc

from common.sampling import choice_seed
from proto import FAILED_ROLE_METADATA_KEY, hack_pb2, kv_mode_from_proto
from router.errors import RouterError, upstream_error
from router.instances import Instance, InstancePool, Role
from router.metrics import RouterMetrics

logger = logging.getLogger(__name__)
T = TypeVar("T")

# A decode instance that answers these is skipped and the next one tried.
_ADMISSION_RETRY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
# A prefill that fails with these (before the first token) is retried on another prefill instance.
_PREFILL_RETRY_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.ABORTED,
})
# A decode instance that fails a running request with these is left for another one (migration); other codes
# (INVALID_ARGUMENT, FAILED_PRECONDITION, CANCELLED, ...) say the request itself cannot go on.
_MIGRATION_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
})


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: hack_pb2.SamplingParams
    stop_token_ids: tuple[int, ...]
    max_tokens: int
    kv_mode: hack_pb2.KVMode
    prompt_logprobs: int | None = None  # score the prompt: each token's logprob and the top k (from P)
    n: int = 1  # choices sharing the prompt's prefill and KV push

    @property
    def decode_needs_prompt(self) -> bool:
        """Repetition penalty counts prompt tokens: only then does D get the prompt's ids."""
        return self.sampling.repetition_penalty not in (0.0, 1.0)

    def resumed(self, attempt: int, generated: list[int]) -> "GenerationRequest":
        """The request again, from after the `generated` tokens (a migration to another decode instance)."""
        sampling = hack_pb2.SamplingParams()
        sampling.CopyFrom(self.sampling)
        sampling.position_offset += len(generated)
        return GenerationRequest(request_id=f"{self.request_id}-m{attempt}",
                                 prompt_ids=self.prompt_ids + tuple(generated), sampling=sampling,
                                 stop_token_ids=self.stop_token_ids, max_tokens=self.max_tokens - len(generated),
                                 kv_mode=self.kv_mode, n=self.n)

    def choice(self, index: int) -> "GenerationRequest":
        """Choice `index` of an n > 1 request as a request of its own (its seed: common.sampling.choice_seed)."""
        sampling = hack_pb2.SamplingParams()
        sampling.CopyFrom(self.sampling)
        if sampling.HasField("seed"):
            sampling.seed = choice_seed(sampling.seed, index)
        return replace(self, request_id=f"{self.request_id}-c{index}", sampling=sampling, prompt_logprobs=None, n=1)


class _DecodeFailed(Exception):
    """The decode instance failed the request in a way another decode instance may not (migration)."""

    def __init__(self, error: RouterError) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass(eq=False)
class _Run:
    """What one request holds on the instances while it runs."""

    request: GenerationRequest
    decode: Instance | None = None
    call: grpc.aio.UnaryStreamCall | None = None  # D.Generate
    call_closed_by_decode: bool = False  # D ended the call (error or end of stream): D holds nothing more
    prefill: Instance | None = None  # the prefill instance working on it right now
    prefill_task: asyncio.Task[hack_pb2.PrefillResponse | None] | None = None
    num_tokens: int = 0
    finished_choices: set[int] = field(default_factory=set)  # D sent their finish reason
    cancelled_choices: set[int] = field(default_factory=set)  # stopped by the client, cancelled on D

    @property
    def finished(self) -> bool:
        """D sent every choice's finish reason: nothing left to cancel there."""
        return len(self.finished_choices) == self.request.n


class Orchestrator:
    def __init__(
        self,
        pool: InstancePool,
        metrics: RouterMetrics,
        *,
        prefill_timeout_s: float,
        rpc_timeout_s: float,
        max_prefill_attempts: int,
        token_timeout_s: float = 120.0,
        max_migrations: int = 2,
    ) -> None:
        self._pool = pool
        self._metrics = metrics
        self._prefill_timeout_s = prefill_timeout_s
        self._rpc_timeout_s = rpc_timeout_s
        self._max_prefill_attempts = max_prefill_attempts
        self._token_timeout_s = token_timeout_s
        self._max_migrations = max_migrations
        self._background: set[asyncio.Task[None]] = set()

    def generate(
        self, request: GenerationRequest, on_prefill: Callable[[hack_pb2.PrefillResponse], None] | None = None,
        stopped: Set[int] = frozenset(),
    ) -> AsyncIterator[hack_pb2.GeneratedToken]:
        """Every token of the request, the first one included, each tagged with its choice; raises RouterError
        when an instance fails and the request cannot be migrated (no attempt or no other decode instance left).

        `on_prefill` gets the first prefill's reply before the first token is yielded (prompt logprobs live there).
        `stopped`: the choices the caller is done with (it adds to the set as they end on stop strings); each is
        cancelled on the decode instance when its next token arrives, and yields nothing more.
        """
        return self._generate(request, on_prefill, stopped, [])

    async def _generate(
        self, request: GenerationRequest, on_prefill: Callable[[hack_pb2.PrefillResponse], None] | None,
        stopped: Set[int], failed_decodes: list[Instance],
    ) -> AsyncIterator[hack_pb2.GeneratedToken]:
        generated: dict[int, list[int]] = {index: [] for index in range(request.n)}
        attempt = request
        while True:
            run = _Run(attempt)
            try:
                await self._admit(run, failed_decodes)
                assert run.decode is not None
                with self._pool.track(run.decode):
                    run.prefill_task = asyncio.create_task(self._prefill(run), name=f"prefill-{attempt.request_id}")
                    async for token in self._read_tokens(run):
                        if token.choice in stopped:
                            self._cancel_choice(run, token)
                            continue
                        if on_prefill is not None and not any(generated.values()):
                            on_prefill(await self._prefill_reply(run))
                        generated[token.choice].append(token.token_id)
                        yield token
                return
            except _DecodeFailed as failure:
                if run.decode is not None:
                    failed_decodes.append(run.decode)
                self._check_migration(request, failure.error, failed_decodes, sum(map(len, generated.values())))
                if request.n > 1 and any(generated.values()):  # the choices part ways
                    break
                attempt = request.resumed(len(failed_decodes), generated[0])
            finally:
                self._release(run)
        unfinished = [i for i in range(request.n) if i not in run.finished_choices and i not in stopped]
        streams = [_as_choice(i, self._generate(request.choice(i).resumed(len(failed_decodes), generated[i]), None,
                                                frozenset(), list(failed_decodes)), stopped) for i in unfinished]
        async for token in merge_streams(streams):
            yield token

    def _check_migration(self, request: GenerationRequest, error: RouterError, failed_decodes: list[Instance],
                         num_generated: int) -> None:
        """Raise the error when a request whose decode instance failed cannot be migrated (no attempt or no
        other decode instance left)."""
        migrations = len(failed_decodes)
        if migrations > self._max_migrations:
            error.message += f" (the request was already migrated {self._max_migrations} times)"
            raise error
        if not any(i.healthy and i not in failed_decodes for i in self._pool.of_role(Role.DECODE)):
            error.message += " (no other healthy decode instance to migrate the request to)"
            raise error
        logger.warning("request %s: %s; migrating it to another decode instance after %d tokens (attempt %d)",
                       request.request_id, error.message, num_generated, migrations + 1)
        self._metrics.migrations.inc()

    def _cancel_choice(self, run: _Run, token: hack_pb2.GeneratedToken) -> None:
        """A token of a choice the caller stopped: cancel that choice on D (once), unless this token ended it."""
        if token.finish_reason != hack_pb2.FINISH_REASON_NONE or token.choice in run.cancelled_choices:
            return
        run.cancelled_choices.add(token.choice)
        assert run.decode is not None
        self._cancel_remote(run.decode, run.request.request_id, token.choice)

    async def _prefill_reply(self, run: _Run) -> hack_pb2.PrefillResponse:
        assert run.prefill_task is not None and run.decode is not None
        reply = await run.prefill_task
        if reply is None:
            raise RouterError(f"the prefill of request {run.request.request_id} failed after its KV reached "
                              f"{run.decode.address}; its prompt logprobs are lost", status=502, code="prefill_lost")
        return reply

    # ------------------------------------------------------------ decode side

    async def _admit(self, run: _Run, exclude: list[Instance]) -> None:
        """Open Generate on a decode instance (not in `exclude`) that accepts the request."""
        request = run.request
        message = hack_pb2.GenerateRequest(
            request_id=request.request_id,
            prompt_len=len(request.prompt_ids),
            sampling=request.sampling,
            stop_token_ids=request.stop_token_ids,
            max_tokens=request.max_tokens,
            kv_mode=request.kv_mode,
            prompt_token_ids=request.prompt_ids if request.decode_needs_prompt else (),
            n=request.n,
        )
        failed: list[tuple[Instance, grpc.aio.AioRpcError]] = []
        while True:
            decode = self._pick(Role.DECODE, failed, request.kv_mode, exclude)
            run.decode, run.call, run.call_closed_by_decode = decode, decode.stub.Generate(message), False
            try:
                first = await run.call.read()
            except grpc.aio.AioRpcError as error:
                run.call_closed_by_decode = True
                self._pool.report_failure(decode, error)
                if error.code() not in _ADMISSION_RETRY_CODES:
                    raise upstream_error(Role.DECODE.value, decode.address, error) from error
                logger.info("request %s: decode %s refused it (%s), trying another", request.request_id,
                            decode.address, error.code().name)
                failed.append((decode, error))
                continue
            if first is grpc.aio.EOF or not first.HasField("admitted"):
                run.call_closed_by_decode = first is grpc.aio.EOF
                raise _protocol_error(decode, "Generate must start with an `admitted` message")
            decode.dispatched_since_poll += first.admitted.reserved_kv_blocks
            return

    async def _read_tokens(self, run: _Run) -> AsyncIterator[hack_pb2.GeneratedToken]:
        assert run.decode is not None
        while True:
            message = await self._next_message(run)
            if message is None:
                if len(run.finished_choices | run.cancelled_choices) == run.request.n:
                    return  # the stopped choices were cancelled, every other one finished
                raise _protocol_error(run.decode, "Generate ended without a finish reason")
            if not message.HasField("token"):
                raise _protocol_error(run.decode, "Generate sent a second `admitted` message")
            token = message.token
            if token.choice >= run.request.n or token.choice in run.finished_choices:
                raise _protocol_error(run.decode, f"Generate sent a token for choice {token.choice} of a request "
                                                  f"with {run.request.n}, after its finish reason or out of range")
            run.num_tokens += 1
            if token.finish_reason != hack_pb2.FINISH_REASON_NONE:
                run.finished_choices.add(token.choice)
                if token.HasField("timers"):
                    self._metrics.observe_decode(token.timers)
            yield token
            if run.finished:
                return

    async def _next_message(self, run: _Run) -> hack_pb2.GenerateResponse | None:
        """D's next message (None at the end of the stream).

        While the prefill runs, a prefill failure that comes first fails the request.
        """
        assert run.call is not None and run.decode is not None and run.prefill_task is not None
        read = asyncio.ensure_future(run.call.read())
        try:
            if not run.prefill_task.done():
                await asyncio.wait((read, run.prefill_task), return_when=asyncio.FIRST_COMPLETED)
            if not read.done():
                run.prefill_task.result()  # the prefill ended first: raises its error, else keep waiting for D
                # The KV is delivered: a decode instance that stays silent now is stuck, not busy with prefill.
                await asyncio.wait((read,), timeout=self._token_timeout_s)
                if not read.done():
                    raise _DecodeFailed(RouterError(f"decode instance {run.decode.address} sent no token for "
                                                    f"{self._token_timeout_s:g} s", status=504,
                                                    code="decode_timeout"))
            message = await read
            if message is grpc.aio.EOF:
                run.call_closed_by_decode = True
                return None
            return message
        except grpc.aio.AioRpcError as error:
            run.call_closed_by_decode = True
            raise self._decode_error(run.decode, error) from error
        finally:
            if not read.done():
                read.cancel()  # cancels the Generate call too; we only get here when failing

    # ------------------------------------------------------------ prefill side

    async def _prefill(self, run: _Run) -> hack_pb2.PrefillResponse | None:
        """Prefill on some instance, retrying elsewhere while no token has been streamed.

        Returns None when the prefill failed after D started streaming: the KV arrived, the request goes on.
        """
        assert run.decode is not None
        request = run.request
        message = hack_pb2.PrefillRequest(
            request_id=request.request_id,
            token_ids=request.prompt_ids,
            sampling=request.sampling,
            decode_address=run.decode.kv_address,
            kv_mode=request.kv_mode,
            prompt_logprobs=request.prompt_logprobs,
            stop_token_ids=request.stop_token_ids,
            n=request.n,
        )
        failed: list[tuple[Instance, grpc.aio.AioRpcError]] = []
        for attempt in range(1, self._max_prefill_attempts + 1):
            prefill = self._pick(Role.PREFILL, failed, request.kv_mode)
            try:
                response = await self._prefill_on(prefill, run, message)
            except grpc.aio.AioRpcError as error:
                if _blames_decode(error):  # the decode instance refused or lost the KV: it is the one to replace
                    raise self._decode_error(run.decode, error) from error
                failed.append((prefill, error))
                if error.code() not in _PREFILL_RETRY_CODES or run.num_tokens or attempt == self._max_prefill_attempts:
                    break
                logger.warning("request %s: prefill on %s failed (%s), retrying on another instance",
                               request.request_id, prefill.address, error.code().name)
                self._metrics.prefill_retries.inc()
                continue
            self._metrics.observe_prefill(response.timings)
            return response
        prefill, error = failed[-1]
        if run.num_tokens:
            logger.warning("request %s: prefill on %s failed after tokens were streamed (%s); ignored",
                           request.request_id, prefill.address, error.code().name)
            return None
        raise upstream_error(Role.PREFILL.value, prefill.address, error) from error

    async def _prefill_on(
        self, prefill: Instance, run: _Run, message: hack_pb2.PrefillRequest
    ) -> hack_pb2.PrefillResponse:
        run.prefill = prefill
        prefill.dispatched_since_poll += 1
        try:
            with self._pool.track(prefill):
                return await prefill.stub.Prefill(message, timeout=self._prefill_timeout_s)
        except grpc.aio.AioRpcError as error:
            if not _blames_decode(error):
                self._pool.report_failure(prefill, error)
            raise
        finally:
            run.prefill = None

    # ------------------------------------------------------------ shared

    def _pick(self, role: Role, failed: list[tuple[Instance, grpc.aio.AioRpcError]], kv_mode: int,
              exclude: list[Instance] = ()) -> Instance:
        """The next instance to try: healthy, serving the request's KV mode, not failed or excluded. When none
        is left, the last failure is the error worth reporting; a KV mode no instance serves is the client's."""
        other_mode = [i for i in self._pool.of_role(role) if i.stats is not None
                      and i.stats.kv_mode not in (kv_mode, hack_pb2.KV_MODE_UNSPECIFIED)]
        try:
            return self._pool.pick(role, exclude=[*other_mode, *exclude, *(instance for instance, _ in failed)])
        except RouterError:
            if failed:
                instance, error = failed[-1]
                raise upstream_error(role.value, instance.address, error) from error
            served = sorted({kv_mode_from_proto(i.stats.kv_mode) for i in other_mode if i.healthy})
            if served and not exclude:
                raise RouterError(f"kv_mode {kv_mode_from_proto(kv_mode)!r} is not served by this deployment "
                                  f"(it serves {', '.join(served)})", status=400, param="kv_mode",
                                  code="kv_mode_not_served") from None
            raise

    def _decode_error(self, decode: Instance, error: grpc.aio.AioRpcError) -> RouterError | _DecodeFailed:
        """A failed decode RPC as the client would see it, wrapped for migration when another instance may do."""
        self._pool.report_failure(decode, error)
        client_error = upstream_error(Role.DECODE.value, decode.address, error)
        return _DecodeFailed(client_error) if error.code() in _MIGRATION_CODES else client_error

    def _release(self, run: _Run) -> None:
        """Stop whatever the request still holds on the instances.

        Never awaits: it runs while the request's task may be cancelled (client gone), so the Cancel RPCs are
        sent from background tasks.
        """
        task = run.prefill_task
        if task is not None and not task.done() and run.finished:
            # D streamed every token, so the KV arrived; the prefill only has its reply (timings) left to send.
            self._keep_in_background(task)
        elif task is not None and not task.done():
            task.cancel()
            if run.prefill is not None:
                self._cancel_remote(run.prefill, run.request.request_id)
        elif task is not None and not task.cancelled():
            task.exception()  # mark retrieved: a failure here was either raised already or made moot by tokens
        if run.call is not None and not run.finished and not run.call_closed_by_decode:
            run.call.cancel()  # may have been cancelled already, with a pending read
            assert run.decode is not None
            self._cancel_remote(run.decode, run.request.request_id)

    def _cancel_remote(self, instance: Instance, request_id: str, choice: int | None = None) -> None:
        self._keep_in_background(asyncio.create_task(self._send_cancel(instance, request_id, choice),
                                                     name=f"cancel-{request_id}"))

    def _keep_in_background(self, task: asyncio.Task) -> None:
        """Hold a reference until the task ends, then retrieve its outcome (errors were handled or are moot)."""
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _send_cancel(self, instance: Instance, request_id: str, choice: int | None = None) -> None:
        try:
            await instance.stub.Cancel(hack_pb2.CancelRequest(request_id=request_id, choice=choice),
                                       timeout=self._rpc_timeout_s)
        except grpc.aio.AioRpcError as error:
            self._pool.report_failure(instance, error)
            logger.info("Cancel(%s) on %s %s failed: %s", request_id, instance.role.value, instance.address,
                        error.code().name)


def _blames_decode(error: grpc.aio.AioRpcError) -> bool:
    """A Prefill that failed because of its decode instance (trailing metadata set by the prefill instance)."""
    metadata = error.trailing_metadata() or ()
    return any(key == FAILED_ROLE_METADATA_KEY and value == "decode" for key, value in metadata)


def _protocol_error(instance: Instance, what: str) -> RouterError:
    return RouterError(f"{instance.role.value} instance {instance.address} broke the protocol: {what}",
                       status=502, code="protocol_error")


async def _as_choice(index: int, stream: AsyncIterator[hack_pb2.GeneratedToken],
                     stopped: Set[int]) -> AsyncIterator[hack_pb2.GeneratedToken]:
    """A one-choice request's tokens as choice `index` of its parent; closed (cancelled) once the caller stopped it."""
    async with contextlib.aclosing(stream):
        async for token in stream:
            if index in stopped:
                return
            token.choice = index
            yield token


async def merge_streams(streams: list[AsyncIterator[T]]) -> AsyncIterator[T]:
    """Items of several streams as they come. A failing stream fails the merge; closing it closes them all."""
    pending = {asyncio.ensure_future(anext(stream)): stream for stream in streams}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                stream = pending.pop(future)
                try:
                    item = future.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(stream))] = stream
                yield item
    finally:
        for future in pending:
            future.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for stream in streams:
            await stream.aclose()
