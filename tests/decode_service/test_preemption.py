"""Decode capacity like vLLM's: blocks allocated as sequences grow, preemption (swap to host) when the pool is full.

Every request must finish with exactly the greedy tokens it gets with room to spare, and the pool must end empty.
"""
from __future__ import annotations

import asyncio

import pytest
import torch

from tests.decode_service.harness import SPEC, generate_request, read_tokens, run_services
from proto import hack_pb2

PROMPT_LEN, MAX_TOKENS, REQUESTS = 40, 40, 4


async def _generate_all(model_dir, mode: str, kv_blocks: int) -> tuple[list[list[int]], int, hack_pb2.StatsResponse]:
    """Admit every request first (2 pages each: 41 tokens, 4 of them sinks), then prefill them; each grows to
    79 stored tokens (3 pages) while decoding."""
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, SPEC.vocab_size, (PROMPT_LEN,), generator=generator).tolist() for _ in range(REQUESTS)]
    async with run_services(model_dir, mode, decode_flags=["--kv-blocks", str(kv_blocks)]) as services:
        calls = []
        for i in range(REQUESTS):
            call = services.decode_stub.Generate(generate_request(f"r{i}", PROMPT_LEN, MAX_TOKENS))
            assert (await call.read()).HasField("admitted")
            calls.append(call)
        await asyncio.gather(*(services.prefill_stub.Prefill(hack_pb2.PrefillRequest(
            request_id=f"r{i}", token_ids=prompt, decode_address=services.decode_address))
            for i, prompt in enumerate(prompts)))
        outputs = await asyncio.gather(*(read_tokens(call) for call in calls))
        await asyncio.sleep(0.05)  # the last frees run on the model thread
        stats = await services.decode_stats()
        preemptions = services.decode.engine.scheduler.num_preemptions
    return [[t.token_id for t in tokens] for tokens in outputs], preemptions, stats


@pytest.mark.parametrize("mode", ["hack", "fp16"])
def test_preemption_under_a_full_pool_gives_the_same_greedy_output(random_checkpoint, mode: str) -> None:
    model_dir = random_checkpoint(SPEC)
    roomy, roomy_preemptions, _ = asyncio.run(_generate_all(model_dir, mode, kv_blocks=64))
    # 9 pages: all four are admitted (8 pages), and they need 12 by the end. (fp16 pages hold every token, no
    # sinks: the same 2 and 3 pages.)
    tight, preemptions, stats = asyncio.run(_generate_all(model_dir, mode, kv_blocks=9))
    assert roomy_preemptions == 0 and preemptions > 0
    assert all(len(tokens) == MAX_TOKENS for tokens in tight)
    assert tight == roomy
    assert stats.free_kv_blocks == stats.total_kv_blocks and stats.used_kv_blocks == 0
    assert stats.counters.requests_failed == 0
