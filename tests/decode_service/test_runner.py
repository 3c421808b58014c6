"""The decode runner's attention clock, and its time reaching the DecodeTimers of a request's last token."""
from __future__ import annotations

import asyncio
import time

import pytest
import torch

from common.kv.interface import ForwardBatch, KVBackend
from decode_service.runner import AttentionClock
from tests.decode_service.harness import SPEC, run_request, run_services

ATTEND_S = 0.004


class SlowBackend(KVBackend):
    """Attends by returning q after a fixed sleep; records the other calls it receives."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def reserve(self, batch: ForwardBatch) -> None:
        self.calls.append("reserve")

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               batch: ForwardBatch) -> torch.Tensor:
        time.sleep(ATTEND_S)
        return q * 2

    def free(self, seq_id: int) -> None:
        self.calls.append(f"free {seq_id}")

    def num_tokens(self, seq_id: int) -> int:
        return 17


def test_the_clock_adds_up_attend_time_and_passes_everything_through() -> None:
    backend = SlowBackend()
    clock = AttentionClock(backend, torch.device("cpu"))
    batch = ForwardBatch.build([3], [16], [1])
    q, kv = torch.randn(1, 4, 8), torch.randn(1, 2, 8)
    layers = 3
    for layer in range(layers):
        assert torch.equal(clock.attend(layer, q, kv, kv, batch), q * 2)
    clock.reserve(batch)
    clock.free(3)
    assert layers * ATTEND_S <= clock.elapsed_s < layers * ATTEND_S + 0.5
    assert backend.calls == ["reserve", "free 3"] and clock.num_tokens(3) == 17
    assert not clock.synchronize  # a CPU clock never synchronizes


@pytest.mark.parametrize("mode", ["fp16", "hack"])
def test_the_last_token_reports_the_attention_part_of_the_decode_time(random_checkpoint, mode: str) -> None:
    prompt = torch.randint(3, SPEC.vocab_size, (45,)).tolist()
    max_tokens = 7

    async def scenario():
        async with run_services(random_checkpoint(SPEC), mode) as services:
            tokens, _ = await run_request(services, "r", prompt, max_tokens)
            return tokens

    tokens = asyncio.run(scenario())
    timers = tokens[-1].timers
    assert len(tokens) == max_tokens and timers.num_steps == max_tokens - 1
    assert 0 < timers.attention_s < timers.decode_s  # CPU steps are always timed
    assert not any(token.HasField("timers") for token in tokens[:-1])
