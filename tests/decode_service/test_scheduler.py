"""Continuous batching bookkeeping: admission by reserved pages, the request states, batch selection."""
from __future__ import annotations

import random

import pytest

from common.kv.config import KVConfig
from common.kv.format import KVLayout
from common.sampling import SamplingParams
from decode_service.scheduler import AdmissionError, RequestState, Scheduler

LAYOUT = KVLayout(KVConfig(partition=32), num_kv_heads=2, head_dim=32)  # 32-token pages


def scheduler(total_blocks: int = 10, max_seqs: int = 8, max_batch_size: int = 4) -> Scheduler:
    return Scheduler(LAYOUT, total_blocks, max_seqs, max_batch_size)


def greedy(max_tokens: int, stop: tuple[int, ...] = ()) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=stop)


def test_admission_reserves_the_worst_case_and_refuses_without_reserving() -> None:
    s = scheduler(total_blocks=5)
    a = s.admit("a", prompt_len=17, params=greedy(16))  # 17 + 15 = 32 stored tokens: one page
    b = s.admit("b", prompt_len=33, params=greedy(40))  # 72 stored tokens: three pages
    assert (a.reserved_blocks, b.reserved_blocks, s.free_blocks) == (1, 3, 1)
    with pytest.raises(AdmissionError, match="needs 2 KV blocks"):
        s.admit("c", prompt_len=1, params=greedy(64))
    assert s.free_blocks == 1 and s.get("c") is None
    s.finish(a)
    assert s.free_blocks == 2 and a.state is RequestState.FINISHED
    assert s.admit("c", prompt_len=1, params=greedy(64)).reserved_blocks == 2


def test_admission_checks_slots_duplicates_and_lengths() -> None:
    s = scheduler(max_seqs=2)
    s.admit("a", 5, greedy(3))
    with pytest.raises(ValueError, match="already admitted"):
        s.admit("a", 5, greedy(3))
    with pytest.raises(ValueError, match="prompt_len"):
        s.admit("z", 0, greedy(3))
    s.admit("b", 5, greedy(3))
    with pytest.raises(AdmissionError, match="0 slots are free"):
        s.admit("c", 5, greedy(3))
    with pytest.raises(AdmissionError, match="more than this instance's 10"):
        scheduler().admit("huge", 300, greedy(100))


def test_requests_move_through_the_states_and_batch_in_arrival_order() -> None:
    s = scheduler(max_batch_size=2)
    requests = [s.admit(f"r{i}", random.randint(1, 40), greedy(3)) for i in range(3)]
    assert s.schedule() == [] and s.num_waiting == 3 and not s.has_work
    for request in reversed(requests):  # KV completes in reverse order
        s.kv_ready(request, first_token=7)
    assert [r.state for r in requests] == [RequestState.READY] * 3
    batch = s.schedule()
    assert batch == [requests[2], requests[1]]  # the first two whose KV arrived; the batch is full
    assert all(r.state is RequestState.RUNNING for r in batch) and s.num_waiting == 1
    assert requests[2].num_cached == requests[2].prompt_len  # the prefill's token is fed at the first step
    live = s.record_step(batch, [8, 9], step_s=0.01)
    assert live == batch and [r.output_ids for r in batch] == [[7, 8], [7, 9]]
    live = s.record_step(s.schedule(), [10, 11], step_s=0.01)  # third token: max_tokens reached
    assert all(r.finish_reason == "length" and r.state is RequestState.FINISHED for r in live)
    assert s.schedule() == [requests[0]] and s.free_blocks == 10 - requests[0].reserved_blocks
    assert (requests[2].num_steps, requests[2].max_batch_size, requests[2].sum_batch_size) == (2, 2, 4)


def test_a_first_token_that_stops_finishes_before_any_step() -> None:
    s = scheduler()
    stopped, single = s.admit("stop", 4, greedy(5, stop=(2,))), s.admit("one", 4, greedy(1))
    s.kv_ready(stopped, first_token=2)
    s.kv_ready(single, first_token=9)
    assert (stopped.finish_reason, single.finish_reason) == ("stop", "length")
    assert s.schedule() == [] and s.free_blocks == 10 and not s.requests


def test_a_request_cancelled_during_a_step_gets_no_token() -> None:
    s = scheduler()
    a, b = s.admit("a", 3, greedy(5)), s.admit("b", 3, greedy(5))
    s.kv_ready(a, 1)
    s.kv_ready(b, 1)
    batch = s.schedule()
    s.finish(a)  # cancelled while the model thread ran the step
    assert s.record_step(batch, [4, 5], step_s=0.01) == [b]
    assert a.output_ids == [1] and b.output_ids == [1, 5] and s.running == [b]
    s.finish(a)  # idempotent
    assert s.free_blocks == 10 - b.reserved_blocks


def test_kv_ready_twice_is_an_error() -> None:
    s = scheduler()
    request = s.admit("a", 3, greedy(5))
    s.kv_ready(request, 1)
    with pytest.raises(ValueError, match="not waiting for KV"):
        s.kv_ready(request, 1)
