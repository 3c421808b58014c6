"""n choices of one prompt (OpenAI's `n`): one prefill, one KV push, the KV copied into each choice on the decode
instance. Each choice must be exactly what a one-choice request gives (greedy: the same tokens in every KV mode,
with prompts past the 16-bit window; seeded: the run of seed + i), and no choice may leak a block."""
from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from proto import hack_pb2
from tests.decode_service.harness import SPEC, Services, generate_request, read_tokens, run_request, run_services

N = 3


@pytest.fixture(scope="module")
def model_dir(random_checkpoint):
    return random_checkpoint(SPEC)


def random_prompt(length: int, seed: int = 0) -> list[int]:
    return torch.randint(3, SPEC.vocab_size, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


async def start_choices(services: Services, request_id: str, prompt: list[int], max_tokens: int, n: int,
                        sampling: hack_pb2.SamplingParams | None = None
                        ) -> tuple[grpc.aio.UnaryStreamCall, hack_pb2.PrefillResponse]:
    """One n-choice request as the router runs it: Generate (admitted), then Prefill; the stream to read."""
    call = services.decode_stub.Generate(generate_request(request_id, len(prompt), max_tokens, n=n, sampling=sampling))
    assert (await call.read()).HasField("admitted")
    response = await services.prefill_stub.Prefill(hack_pb2.PrefillRequest(
        request_id=request_id, token_ids=prompt, decode_address=services.decode_address, n=n, sampling=sampling))
    return call, response


async def run_choices(services: Services, request_id: str, prompt: list[int], max_tokens: int, n: int,
                      sampling: hack_pb2.SamplingParams | None = None
                      ) -> tuple[list[list[hack_pb2.GeneratedToken]], hack_pb2.PrefillResponse]:
    """One n-choice request; the tokens of each choice, in stream order."""
    call, response = await start_choices(services, request_id, prompt, max_tokens, n, sampling)
    return by_choice(await read_tokens(call), n), response


def by_choice(tokens: list[hack_pb2.GeneratedToken], n: int) -> list[list[hack_pb2.GeneratedToken]]:
    choices: list[list[hack_pb2.GeneratedToken]] = [[] for _ in range(n)]
    for token in tokens:
        choices[token.choice].append(token)
    return choices


def ids(tokens: list[hack_pb2.GeneratedToken]) -> list[int]:
    return [t.token_id for t in tokens]


async def settled_stats(services: Services) -> hack_pb2.StatsResponse:
    """Stats once the frees queued on the model thread ran."""
    for _ in range(100):
        stats = await services.decode_stats()
        if not stats.used_kv_blocks and not stats.running_seqs and not stats.waiting_seqs:
            break
        await asyncio.sleep(0.01)
    return stats


@pytest.mark.parametrize("mode", ["fp16", "dequant", "hack"])
def test_greedy_choices_equal_a_one_choice_run_from_one_prefill(model_dir, mode: str) -> None:
    # 17 tokens: a partial page; 200: past the default 128-token 16-bit window, so decoding quantizes tokens
    # that left the window in each choice's own copy of the pages (rotation and mse ranges on, the defaults).
    prompts = [random_prompt(17, 1), random_prompt(200, 2)]
    max_tokens = 12

    async def scenario():
        async with run_services(model_dir, mode) as services:
            singles = [await run_request(services, f"one{i}", p, max_tokens) for i, p in enumerate(prompts)]
            before = (await services.prefill_stub.Stats(hack_pb2.StatsRequest())).counters
            decode_before = (await services.decode_stats()).counters
            forked = await asyncio.gather(*(run_choices(services, f"n{i}", p, max_tokens, N)
                                            for i, p in enumerate(prompts)))
            after = (await services.prefill_stub.Stats(hack_pb2.StatsRequest())).counters
            return singles, forked, before, after, decode_before, await settled_stats(services)

    singles, forked, before, after, decode_before, stats = asyncio.run(scenario())
    for (single, _), (choices, prefill) in zip(singles, forked):
        for tokens in choices:
            assert ids(tokens) == ids(single)
            assert [t.finish_reason for t in tokens][-1] == hack_pb2.FINISH_REASON_LENGTH
        assert list(prefill.first_tokens) == [single[0].token_id] * N
    # One prefill and one push per request, whatever n.
    assert after.requests_total - before.requests_total == len(prompts)
    assert after.prompt_tokens - before.prompt_tokens == sum(map(len, prompts))
    pushed = sum(prefill.timings.kv_bytes for _, prefill in forked)
    assert stats.counters.kv_bytes - decode_before.kv_bytes == pushed
    assert stats.counters.requests_total - decode_before.requests_total == len(prompts)
    assert stats.used_kv_blocks == 0 and stats.free_kv_blocks == stats.total_kv_blocks


def test_seeded_choices_differ_and_each_is_the_run_of_seed_plus_its_index(model_dir) -> None:
    prompt = random_prompt(20, 3)
    sampling = hack_pb2.SamplingParams(temperature=0.8, seed=11)

    async def scenario():
        async with run_services(model_dir) as services:
            first, _ = await run_choices(services, "a", prompt, 10, N, sampling)
            again, _ = await run_choices(services, "b", prompt, 10, N, sampling)
            singles = []
            for i in range(N):
                alone = hack_pb2.SamplingParams(temperature=0.8, seed=11 + i)
                call = services.decode_stub.Generate(generate_request(f"s{i}", len(prompt), 10, sampling=alone))
                await call.read()
                await services.prefill_stub.Prefill(hack_pb2.PrefillRequest(
                    request_id=f"s{i}", token_ids=prompt, decode_address=services.decode_address, sampling=alone))
                singles.append(ids(await read_tokens(call)))
            return first, again, singles

    first, again, singles = asyncio.run(scenario())
    outputs = [ids(tokens) for tokens in first]
    assert len({tuple(o) for o in outputs}) == N
    assert outputs == [ids(tokens) for tokens in again]
    assert outputs == singles


def test_one_choice_cancelled_mid_stream_stops_alone_and_frees_its_blocks(model_dir) -> None:
    prompt = random_prompt(30, 4)

    async def scenario():
        async with run_services(model_dir) as services:
            call, _ = await start_choices(services, "r", prompt, 40, N)
            head = [(await call.read()).token for _ in range(2 * N)]
            found = await services.decode_stub.Cancel(hack_pb2.CancelRequest(request_id="r", choice=1))
            again = await services.decode_stub.Cancel(hack_pb2.CancelRequest(request_id="r", choice=1))
            rest = await read_tokens(call)  # ends normally once choices 0 and 2 finished
            return head, found.found, again.found, rest, await settled_stats(services)

    head, found, found_again, rest, stats = asyncio.run(scenario())
    assert found and not found_again
    choices = by_choice(head + rest, N)
    assert len(choices[0]) == len(choices[2]) == 40 and len(choices[1]) < 40
    assert choices[1][-1].finish_reason == hack_pb2.FINISH_REASON_NONE
    assert stats.used_kv_blocks == 0 and stats.counters.requests_cancelled == 0


def test_a_choice_cancelled_before_the_kv_arrives_is_dropped_once_it_lands(model_dir) -> None:
    prompt = random_prompt(30, 5)

    async def scenario():
        async with run_services(model_dir) as services:
            call = services.decode_stub.Generate(generate_request("r", len(prompt), 6, n=2))
            await call.read()
            found = await services.decode_stub.Cancel(hack_pb2.CancelRequest(request_id="r", choice=0))
            await services.prefill_stub.Prefill(hack_pb2.PrefillRequest(
                request_id="r", token_ids=prompt, decode_address=services.decode_address, n=2))
            return found.found, await read_tokens(call), await settled_stats(services)

    found, tokens, stats = asyncio.run(scenario())
    assert found
    assert {t.choice for t in tokens} == {1} and len(tokens) == 6  # choice 0's pages were the copy's source
    assert stats.used_kv_blocks == 0


@pytest.mark.parametrize("how", ["cancel", "disconnect"])
def test_cancelling_or_dropping_the_stream_frees_every_choice(model_dir, how: str) -> None:
    prompt = random_prompt(30, 6)

    async def scenario():
        async with run_services(model_dir) as services:
            call, _ = await start_choices(services, "r", prompt, 200, N)
            for _ in range(2 * N):
                await call.read()
            if how == "cancel":
                assert (await services.decode_stub.Cancel(hack_pb2.CancelRequest(request_id="r"))).found
                with pytest.raises(grpc.aio.AioRpcError) as cancelled:
                    await read_tokens(call)
                assert cancelled.value.code() == grpc.StatusCode.CANCELLED
            else:
                call.cancel()
            return await settled_stats(services)

    stats = asyncio.run(scenario())
    assert stats.used_kv_blocks == 0 and stats.running_seqs == 0 and stats.waiting_seqs == 0
    assert stats.counters.requests_cancelled == 1


def test_forked_choices_are_preempted_and_resumed_with_the_same_output(model_dir) -> None:
    """Four choices of a 40-token prompt hold 2 pages each at admission and grow to 3: a 9-page pool preempts."""
    prompt = random_prompt(40, 7)

    async def run(kv_blocks: int):
        async with run_services(model_dir, decode_flags=["--kv-blocks", str(kv_blocks)]) as services:
            choices, _ = await run_choices(services, "r", prompt, 40, 4)
            return ([ids(c) for c in choices], services.decode.engine.scheduler.num_preemptions,
                    await settled_stats(services))

    roomy, roomy_preemptions, _ = asyncio.run(run(64))
    tight, preemptions, stats = asyncio.run(run(9))
    assert roomy_preemptions == 0 and preemptions > 0
    assert tight == roomy and all(len(c) == 40 for c in tight)
    assert stats.used_kv_blocks == 0 and stats.counters.requests_failed == 0


def test_bad_choice_counts_are_refused_clearly(model_dir) -> None:
    prompt = random_prompt(10, 8)

    async def scenario():
        async with run_services(model_dir, decode_flags=["--kv-blocks", "4"]) as services:
            errors = {}
            for name, request in {
                "too many": generate_request("a", len(prompt), 4, n=17),
                "no room": generate_request("b", len(prompt), 4, n=5),  # 5 choices x 1 page > 4 pages
            }.items():
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    call = services.decode_stub.Generate(request)
                    await call.read()
                errors[name] = refused.value
            with pytest.raises(grpc.aio.AioRpcError) as prefill_refused:
                await services.prefill_stub.Prefill(hack_pb2.PrefillRequest(
                    request_id="c", token_ids=prompt, decode_address=services.decode_address, n=17))
            # A push whose trailer has fewer first tokens than the request has choices is refused.
            call = services.decode_stub.Generate(generate_request("d", len(prompt), 4, n=2))
            await call.read()
            with pytest.raises(grpc.aio.AioRpcError) as mismatch:
                await services.prefill_stub.Prefill(hack_pb2.PrefillRequest(
                    request_id="d", token_ids=prompt, decode_address=services.decode_address))
            with pytest.raises(grpc.aio.AioRpcError) as stream_error:
                await read_tokens(call)
            return errors, prefill_refused.value, mismatch.value, stream_error.value, await settled_stats(services)

    errors, prefill_refused, mismatch, stream_error, stats = asyncio.run(scenario())
    assert errors["too many"].code() == grpc.StatusCode.INVALID_ARGUMENT and "[1, 16]" in errors["too many"].details()
    assert errors["no room"].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "5 sequence slots (one per choice)" in errors["no room"].details()
    assert prefill_refused.code() == grpc.StatusCode.INVALID_ARGUMENT and "n must be <= 16" in prefill_refused.details()
    assert mismatch.code() == stream_error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "0 first tokens for the request's 2 choices" in stream_error.details()
    assert stats.used_kv_blocks == 0 and stats.waiting_seqs == 0


def test_a_choice_preempted_with_no_swap_space_fails_its_request_alone_and_frees_every_choice(model_dir) -> None:
    """An older one-choice request (1 page) and 4 choices (2 pages each) fill a 9-page pool; when the choices grow,
    the newest is preempted with no swap space: its request fails, the older one runs on unharmed."""
    prompt, other = random_prompt(40, 9), random_prompt(10, 10)

    async def scenario():
        async with run_services(model_dir, decode_flags=["--kv-blocks", "9", "--swap-space-mb", "0"]) as services:
            older = services.decode_stub.Generate(generate_request("older", len(other), 40))
            await older.read()
            call = services.decode_stub.Generate(generate_request("r", len(prompt), 40, n=4))
            await call.read()
            for request_id, tokens, n in (("older", other, 1), ("r", prompt, 4)):
                await services.prefill_stub.Prefill(hack_pb2.PrefillRequest(
                    request_id=request_id, token_ids=tokens, decode_address=services.decode_address, n=n))
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await read_tokens(call)
            return failed.value, await read_tokens(older), await settled_stats(services)

    error, older_tokens, stats = asyncio.run(scenario())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "preempted" in error.details()
    assert len(older_tokens) == 40 and older_tokens[-1].finish_reason == hack_pb2.FINISH_REASON_LENGTH
    assert stats.used_kv_blocks == 0 and stats.running_seqs == 0 and stats.counters.requests_failed == 1
