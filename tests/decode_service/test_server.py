"""The decode service behind its gRPC API, fed by a real prefill service: results, admission, bad KV, timeouts."""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import torch

from common.engine import Engine
from common.kv.config import KVConfig
from common.kv.factory import make_kv_backend
from common.kv.format import WIRE_HEADER, WIRE_TRAILER, WIRE_VERSION, KVLayout
from common.kv.wire import crc32
from common.loader import load_model
from common.sampling import SamplingParams
from common.service import chunks_per_layer
from proto import hack_pb2
from tests.decode_service.harness import SPEC, Services, generate_request, read_tokens, run_request, run_services


@pytest.fixture(scope="module")
def model_dir(random_checkpoint):
    return random_checkpoint(SPEC)


def random_prompt(length: int) -> list[int]:
    return torch.randint(3, SPEC.vocab_size, (length,)).tolist()


def engine_tokens(model_dir, mode: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    loaded = load_model(model_dir, device="cpu")
    kv = make_kv_backend(KVConfig(mode=mode, partition=32), loaded.config, "cpu", torch.float32, max_tokens=2048)
    params = [SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)] * len(prompts)
    return [c.token_ids for c in Engine(loaded, kv).generate(prompts, params)]


async def wait_for_free_pool(services: Services, timeout_s: float = 1.0) -> hack_pb2.StatsResponse:
    deadline = time.monotonic() + timeout_s
    while (stats := await services.decode_stats()).used_kv_blocks and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return stats


@pytest.mark.parametrize("mode", ["fp16", "dequant", "hack"])
def test_concurrent_requests_match_in_process_engine(model_dir, mode: str) -> None:
    # 1 token (tail only), 17 (one partial partition), 45 (a full page and a partial one).
    prompts = [random_prompt(n) for n in (1, 17, 45)]
    max_tokens = 9

    async def scenario():
        async with run_services(model_dir, mode) as services:
            results = await asyncio.gather(*(run_request(services, f"r{i}", p, max_tokens)
                                              for i, p in enumerate(prompts)))
            return results, await wait_for_free_pool(services)

    results, stats = asyncio.run(scenario())
    expected = engine_tokens(model_dir, mode, prompts, max_tokens)
    layout = KVLayout(KVConfig(mode=mode, partition=32), SPEC.num_kv_heads, SPEC.head_dim)
    for prompt, (tokens, prefill), want in zip(prompts, results, expected):
        assert [t.token_id for t in tokens] == want
        assert prefill.first_token == want[0]
        assert [t.finish_reason for t in tokens] == [hack_pb2.FINISH_REASON_NONE] * 8 + [hack_pb2.FINISH_REASON_LENGTH]
        assert tokens[-1].timers.num_steps == max_tokens - 1
        assert prefill.timings.kv_bytes == layout.wire_bytes(len(prompt), SPEC.num_layers)
    assert stats.used_kv_blocks == 0 and stats.running_seqs == 0 and stats.waiting_seqs == 0
    assert stats.counters.max_batch_size >= 2  # how many overlap depends on timing; >1 shows batching
    assert stats.counters.kv_bytes == sum(r[1].timings.kv_bytes for r in results)


def test_a_stop_token_ends_the_stream_and_frees_the_request(model_dir) -> None:
    prompt = random_prompt(20)
    expected = engine_tokens(model_dir, "hack", [prompt], 8)[0]
    stop = expected[3]

    async def scenario():
        async with run_services(model_dir) as services:
            tokens, _ = await run_request(services, "r", prompt, 8, stop_token_ids=[stop])
            return tokens, await wait_for_free_pool(services)

    tokens, stats = asyncio.run(scenario())
    cut = expected.index(stop) + 1
    assert [t.token_id for t in tokens] == expected[:cut]
    assert tokens[-1].finish_reason == hack_pb2.FINISH_REASON_STOP
    assert stats.used_kv_blocks == 0 and stats.counters.generated_tokens == cut


@pytest.mark.parametrize("fields, message", [
    ({"request_id": ""}, "request_id is empty"),
    ({"max_tokens": 0}, "max_tokens must be >= 1"),
    ({"prompt_len": 0}, "prompt_len must be >= 1"),
    ({"prompt_len": 200, "max_tokens": 57}, "exceeds the context window of 256"),
    ({"kv_mode": hack_pb2.KV_MODE_FP16}, "serves kv_mode 'hack'"),
    ({"sampling": hack_pb2.SamplingParams(top_k=-2)}, "top_k must be >= 0"),
])
def test_bad_generate_requests_are_refused(model_dir, fields: dict, message: str) -> None:
    async def scenario():
        async with run_services(model_dir) as services:
            request = {"request_id": "r", "prompt_len": 10, "max_tokens": 5, **fields}
            call = services.decode_stub.Generate(hack_pb2.GenerateRequest(**request))
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await call.read()
            return error.value, await services.decode_stats()

    error, stats = asyncio.run(scenario())
    assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
    assert message in error.details()
    assert stats.free_kv_blocks == stats.total_kv_blocks and stats.waiting_seqs == 0


def test_admission_refuses_what_does_not_fit_before_any_kv_is_stored(model_dir) -> None:
    async def scenario():
        # 4 pages of 32 tokens. Admission counts the prompt and the first decoded token, not max_tokens: a 70-token
        # prompt holds 3 pages (71 tokens, 4 of them sinks), a 40-token prompt would need 2 more.
        async with run_services(model_dir, decode_flags=["--kv-blocks", "4"]) as services:
            first = services.decode_stub.Generate(generate_request("a", 70, 30))
            admitted = await first.read()
            second = services.decode_stub.Generate(generate_request("b", 40, 30))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await second.read()
            stats = await services.decode_stats()
            too_big = services.decode_stub.Generate(generate_request("c", 100, 100))
            with pytest.raises(grpc.aio.AioRpcError) as never_fits:
                await too_big.read()
            await services.decode_stub.Cancel(hack_pb2.CancelRequest(request_id="a"))
            third = services.decode_stub.Generate(generate_request("d", 70, 30))
            return admitted, refused.value, stats, never_fits.value, await third.read()

    admitted, refused, stats, never_fits, readmitted = asyncio.run(scenario())
    assert admitted.admitted.reserved_kv_blocks == 3
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "2 KV blocks" in refused.details()
    assert (stats.total_kv_blocks, stats.free_kv_blocks, stats.used_kv_blocks) == (4, 1, 0)
    assert stats.waiting_seqs == 1
    assert never_fits.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "more than this instance's 4" in never_fits.details()
    assert readmitted.admitted.reserved_kv_blocks == 3


# ---------------------------------------------------------------------------------------------------------------
# Hand-made pushes: real chunks from the prefill worker, then corrupted, cut short or replaced.
# ---------------------------------------------------------------------------------------------------------------


def encoded_kv(services: Services, prompt: list[int]) -> tuple[list[tuple[int, bytes]], int]:
    """(layer, wire chunk) of the prompt's KV in send order, and its greedy first token."""
    chunks: list[tuple[int, bytes]] = []
    first = services.prefill.engine.worker.run([0], [prompt], [SamplingParams(temperature=0.0)],
                                               lambda seq_id, layer, data: chunks.extend((layer, c) for c in data))
    return chunks, first[0].first_token


def push_messages(services: Services, request_id: str, prompt: list[int], chunks: list[tuple[int, bytes]],
                  first_token: int | None, **header_fields) -> list[hack_pb2.KVChunk]:
    fields = {**services.decode.identity, "num_blocks": len(chunks), **header_fields}
    messages = [hack_pb2.KVChunk(header=hack_pb2.KVHeader(request_id=request_id, num_tokens=len(prompt), **fields))]
    messages += [hack_pb2.KVChunk(block=hack_pb2.KVBlock(layer=layer, data=data)) for layer, data in chunks]
    if first_token is not None:
        messages.append(hack_pb2.KVChunk(trailer=hack_pb2.KVTrailer(first_token=first_token)))
    return messages


def with_version(chunk: bytes, version: int) -> bytes:
    """The chunk re-framed as another format version, with a valid checksum."""
    body = bytearray(chunk[: -WIRE_TRAILER.size])
    fields = list(WIRE_HEADER.unpack_from(body, 0))
    fields[1] = version
    WIRE_HEADER.pack_into(body, 0, *fields)
    return bytes(body) + WIRE_TRAILER.pack(crc32(body))


async def refused_push(services: Services, messages: list[hack_pb2.KVChunk]) -> tuple[grpc.aio.AioRpcError,
                                                                                       grpc.aio.AioRpcError]:
    """Admit the request, push the messages; returns (PushKV's error, Generate's error)."""
    request_id = messages[0].header.request_id
    call = services.decode_stub.Generate(generate_request(request_id, messages[0].header.num_tokens, 5))
    await call.read()
    with pytest.raises(grpc.aio.AioRpcError) as push_error:
        await services.decode_stub.PushKV(iter(messages))
    with pytest.raises(grpc.aio.AioRpcError) as stream_error:
        await read_tokens(call)
    return push_error.value, stream_error.value


def test_a_corrupted_block_fails_the_request_with_data_loss(model_dir) -> None:
    async def scenario():
        async with run_services(model_dir) as services:
            prompt = random_prompt(40)
            chunks, first = encoded_kv(services, prompt)
            layer, data = chunks[-1]
            flipped = bytearray(data)
            flipped[WIRE_HEADER.size + 3] ^= 0x10  # one bit of the payload
            chunks[-1] = (layer, bytes(flipped))
            errors = await refused_push(services, push_messages(services, "r", prompt, chunks, first))
            return errors, await wait_for_free_pool(services)

    (push_error, stream_error), stats = asyncio.run(scenario())
    for error in (push_error, stream_error):
        assert error.code() == grpc.StatusCode.DATA_LOSS and "checksum" in error.details()
    assert stats.used_kv_blocks == 0 and stats.counters.requests_failed == 1


def test_another_format_version_is_refused_in_the_header_and_in_a_block(model_dir) -> None:
    async def scenario():
        async with run_services(model_dir) as services:
            prompt = random_prompt(33)
            chunks, first = encoded_kv(services, prompt)
            in_header = await refused_push(services, push_messages(services, "a", prompt, chunks, first,
                                                                   format_version=WIRE_VERSION + 1))
            chunks[0] = (chunks[0][0], with_version(chunks[0][1], WIRE_VERSION + 1))
            in_block = await refused_push(services, push_messages(services, "b", prompt, chunks, first))
            return in_header, in_block, await wait_for_free_pool(services)

    in_header, in_block, stats = asyncio.run(scenario())
    for error in (*in_header, *in_block):
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"version {WIRE_VERSION + 1}" in in_header[0].details()
    assert f"version {WIRE_VERSION + 1}" in in_block[0].details()
    assert stats.used_kv_blocks == 0


def test_kv_of_other_cache_options_is_refused(model_dir) -> None:
    """A prefill with another rotation seed, window, bit width or 16-bit dtype (a bf16 prefill's sinks and tail
    are bf16) would decode to wrong attention: refused."""
    async def scenario():
        async with run_services(model_dir) as services:
            prompt = random_prompt(33)
            chunks, first = encoded_kv(services, prompt)
            ours = services.decode.identity["kv_format"]
            others = {"a": KVConfig(seed=7).wire_identity,  # another rotation
                      "b": ours.replace("dtype=float16", "dtype=bfloat16")}  # a bf16 prefill's K/V
            assert ours not in others.values()
            errors = [await refused_push(services, push_messages(services, request_id, prompt, chunks, first,
                                                                 kv_format=other))
                      for request_id, other in others.items()]
            return errors, await wait_for_free_pool(services)

    errors, stats = asyncio.run(scenario())
    for error in (error for pair in errors for error in pair):
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "kv_format" in error.details()
    assert stats.used_kv_blocks == 0


def test_kv_that_stops_arriving_times_out_and_frees_its_blocks(model_dir) -> None:
    async def scenario():
        async with run_services(model_dir, decode_flags=["--kv-timeout-s", "0.3"]) as services:
            prompt = random_prompt(70)
            chunks, _ = encoded_kv(services, prompt)
            messages = push_messages(services, "r", prompt, chunks, None)
            first_layer = [m for m in messages if not m.HasField("block") or m.block.layer == 0]
            stalled = asyncio.Event()

            async def stalling_push():
                for message in first_layer:
                    yield message
                stalled.set()
                await asyncio.Event().wait()  # the prefill instance hangs

            call = services.decode_stub.Generate(generate_request("r", len(prompt), 5))
            await call.read()
            push = services.decode_stub.PushKV(stalling_push())
            await stalled.wait()
            await asyncio.sleep(0.05)
            holding = (await services.decode_stats()).used_kv_blocks
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as timed_out:
                await read_tokens(call)
            waited = time.monotonic() - started
            push.cancel()
            return holding, timed_out.value, waited, await wait_for_free_pool(services)

    holding, error, waited, stats = asyncio.run(scenario())
    assert holding == 3  # 70 tokens: three 32-token pages, allocated when the header arrived
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "0.3 s" in error.details()
    assert waited < 1.5
    assert stats.used_kv_blocks == 0 and stats.waiting_seqs == 0


def test_a_new_push_replaces_an_abandoned_one(model_dir) -> None:
    prompt = random_prompt(50)
    expected = engine_tokens(model_dir, "hack", [prompt], 6)[0]

    async def scenario():
        async with run_services(model_dir) as services:
            chunks, first = encoded_kv(services, prompt)
            messages = push_messages(services, "r", prompt, chunks, first)
            call = services.decode_stub.Generate(generate_request("r", len(prompt), 6))
            await call.read()
            abandoned = asyncio.Event()

            async def abandoned_push():
                yield messages[0]
                yield messages[1]
                abandoned.set()
                await asyncio.Event().wait()

            first_push = services.decode_stub.PushKV(abandoned_push())
            await abandoned.wait()
            # Cancel only once the server took the first header (its pages are allocated): a cancel racing ahead
            # of that header would let the stale header arrive after the retry's, which no real retry does.
            deadline = time.monotonic() + 5.0
            while not (await services.decode_stats()).used_kv_blocks and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            first_push.cancel()  # the prefill instance died mid-push; the router retries elsewhere
            reply = await services.decode_stub.PushKV(iter(messages))
            return reply, await read_tokens(call), await wait_for_free_pool(services)

    reply, tokens, stats = asyncio.run(scenario())
    layout = KVLayout(KVConfig(partition=32), SPEC.num_kv_heads, SPEC.head_dim)
    assert reply.blocks_received == SPEC.num_layers * chunks_per_layer(layout, len(prompt))
    assert [t.token_id for t in tokens] == expected
    assert stats.used_kv_blocks == 0


def test_cancel_ends_the_stream_and_frees_the_blocks(model_dir) -> None:
    async def scenario():
        async with run_services(model_dir) as services:
            prompt = random_prompt(30)
            call = services.decode_stub.Generate(generate_request("r", len(prompt), 200))
            await call.read()
            await services.prefill_stub.Prefill(hack_pb2.PrefillRequest(
                request_id="r", token_ids=prompt, decode_address=services.decode_address))
            first_tokens = [await call.read() for _ in range(3)]
            found = await services.decode_stub.Cancel(hack_pb2.CancelRequest(request_id="r"))
            with pytest.raises(grpc.aio.AioRpcError) as cancelled:
                await read_tokens(call)
            again = await services.decode_stub.Cancel(hack_pb2.CancelRequest(request_id="r"))
            return first_tokens, found.found, cancelled.value, again.found, await wait_for_free_pool(services)

    first_tokens, found, error, found_again, stats = asyncio.run(scenario())
    assert all(m.HasField("token") for m in first_tokens)
    assert found and not found_again
    assert error.code() == grpc.StatusCode.CANCELLED
    assert stats.used_kv_blocks == 0 and stats.counters.requests_cancelled == 1
