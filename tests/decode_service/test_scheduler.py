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


def test_admission_counts_the_prompt_not_max_tokens_and_refuses_without_holding() -> None:
    s = scheduler(total_blocks=5)
    a = s.admit("a", prompt_len=17, params=greedy(100))  # 17 + 1 stored tokens after the first step: one page
    b = s.admit("b", prompt_len=33, params=greedy(40))  # 34 stored tokens, 4 of them sinks: one page
    assert (a.reserved_blocks, b.reserved_blocks, s.free_blocks) == (1, 1, 3)
    with pytest.raises(AdmissionError, match="needs 4 KV blocks"):
        s.admit("c", prompt_len=100, params=greedy(2))
    assert s.free_blocks == 3 and s.get("c") is None
    s.finish(a)
    assert s.free_blocks == 4 and a.state is RequestState.FINISHED
    assert s.admit("c", prompt_len=100, params=greedy(2)).reserved_blocks == 4


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
    assert s.schedule().batch == [] and s.num_waiting == 3 and not s.has_work
    for request in reversed(requests):  # KV completes in reverse order
        s.kv_ready(request, first_token=7)
    assert [r.state for r in requests] == [RequestState.READY] * 3
    batch = s.schedule().batch
    assert batch == [requests[2], requests[1]]  # the first two whose KV arrived; the batch is full
    assert all(r.state is RequestState.RUNNING for r in batch) and s.num_waiting == 1
    assert requests[2].num_cached == requests[2].prompt_len  # the prefill's token is fed at the first step
    live = s.record_step(batch, [8, 9], step_s=0.01)
    assert live == batch and [r.output_ids for r in batch] == [[7, 8], [7, 9]]
    live = s.record_step(s.schedule().batch, [10, 11], step_s=0.01)  # third token: max_tokens reached
    assert all(r.finish_reason == "length" and r.state is RequestState.FINISHED for r in live)
    assert s.schedule().batch == [requests[0]] and s.free_blocks == 10 - requests[0].reserved_blocks
    assert (requests[2].num_steps, requests[2].max_batch_size, requests[2].sum_batch_size) == (2, 2, 4)


def test_a_first_token_that_stops_finishes_before_any_step() -> None:
    s = scheduler()
    stopped, single = s.admit("stop", 4, greedy(5, stop=(2,))), s.admit("one", 4, greedy(1))
    s.kv_ready(stopped, first_token=2)
    s.kv_ready(single, first_token=9)
    assert (stopped.finish_reason, single.finish_reason) == ("stop", "length")
    assert s.schedule().batch == [] and s.free_blocks == 10 and not s.requests


def test_a_request_cancelled_during_a_step_gets_no_token() -> None:
    s = scheduler()
    a, b = s.admit("a", 3, greedy(5)), s.admit("b", 3, greedy(5))
    s.kv_ready(a, 1)
    s.kv_ready(b, 1)
    batch = s.schedule().batch
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


def _run_to(s: Scheduler, request, num_cached: int) -> None:
    """Feed `request` tokens until it has num_cached stored tokens before its next step (alone in its batch)."""
    while request.num_cached < num_cached:
        plan = s.schedule()
        s.record_step(plan.batch, [5] * len(plan.batch), step_s=0.0)


def test_a_full_pool_preempts_the_newest_request_and_resumes_it_when_blocks_free() -> None:
    s = scheduler(total_blocks=3, max_batch_size=4)
    s.blocks.swap_blocks = 10
    a, b = s.admit("a", 30, greedy(60)), s.admit("b", 30, greedy(60))
    s.kv_ready(a, 1)
    s.kv_ready(b, 1)
    assert s.schedule().batch == [a, b] and s.free_blocks == 1
    _run_to(s, a, 36)  # 36 stored: 32 compressed indices fill one page; the next token needs a second page each
    plan = s.schedule()
    assert plan.batch == [a] and plan.swap_out == [b] and b.state is RequestState.SWAPPED
    assert (a.reserved_blocks, b.blocks.swap, s.free_blocks) == (2, 1, 1)
    assert s.admittable_blocks == 0  # the free block is b's to resume with
    with pytest.raises(AdmissionError):
        s.admit("c", 10, greedy(2))
    s.finish(a)
    plan = s.schedule()
    assert plan.swap_in == [b] and plan.batch == [b] and b.reserved_blocks == 2 and s.blocks.used_swap_blocks == 0
    assert s.num_preemptions == 1 and b.num_preemptions == 1


def test_preemption_without_swap_space_fails_the_request_and_frees_its_blocks() -> None:
    s = scheduler(total_blocks=3)
    a, b = s.admit("a", 30, greedy(60)), s.admit("b", 30, greedy(60))
    s.kv_ready(a, 1)
    s.kv_ready(b, 1)
    _run_to(s, a, 36)
    plan = s.schedule()
    assert plan.batch == [a] and [r for r, _ in plan.failed] == [b] and "swap space" in plan.failed[0][1]
    assert b.state is RequestState.FINISHED and s.free_blocks == 1 and s.get("b") is None


def test_a_request_that_could_never_fit_alone_is_refused() -> None:
    with pytest.raises(AdmissionError, match="more than this instance's 3"):
        scheduler(total_blocks=3).admit("a", 30, greedy(200))


def test_choices_are_admitted_together_with_a_copy_of_the_prompt_each_and_end_one_by_one() -> None:
    s = scheduler(total_blocks=7, max_seqs=4)
    seeded = SamplingParams(max_tokens=5, temperature=0.8, seed=41)
    with pytest.raises(AdmissionError, match="8 KV blocks and 4 sequence slots"):
        s.admit_choices("big", 40, seeded, 4)  # 2 pages per choice
    assert s.free_blocks == 7 and not s.requests
    choices = s.admit_choices("r", 40, seeded, 3)
    assert [c.choice for c in choices] == [0, 1, 2] and [c.params.seed for c in choices] == [41, 42, 43]
    assert len({c.seq_id for c in choices}) == 3 and s.free_blocks == 1
    assert s.get("r") == choices
    with pytest.raises(ValueError, match="already admitted"):
        s.admit_choices("r", 4, seeded, 2)
    with pytest.raises(ValueError, match=r"n \(choices\) must be in \[1, 16\]"):
        s.admit_choices("z", 4, seeded, 17)
    for choice in choices[:2]:
        s.finish(choice)
    assert s.get("r") == choices and s.free_blocks == 5  # one choice still holds its pages
    s.finish(choices[2])
    assert s.get("r") is None and s.free_blocks == 7
