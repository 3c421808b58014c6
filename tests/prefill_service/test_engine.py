"""Token-budget batching of queued prompts."""
from __future__ import annotations

from collections import deque

from prefill_service.engine import PrefillJob, take_batch


def job(length: int) -> PrefillJob:
    return PrefillJob(f"r{length}", [5] * length, params=None, decode_address="", seq_id=length, result=None)


def batches(lengths: list[int], token_budget: int, max_seqs: int) -> list[list[int]]:
    queue = deque(job(n) for n in lengths)
    taken = []
    while queue:
        taken.append([len(j.token_ids) for j in take_batch(queue, token_budget, max_seqs)])
    return taken


def test_prompts_go_in_order_while_they_fit_the_budget() -> None:
    assert batches([30, 9, 25, 12, 2, 17], token_budget=40, max_seqs=3) == [[30, 9], [25, 12, 2], [17]]


def test_a_prompt_longer_than_the_budget_runs_alone() -> None:
    assert batches([3, 100, 1], token_budget=40, max_seqs=8) == [[3], [100], [1]]


def test_the_batch_size_is_capped() -> None:
    assert batches([1] * 7, token_budget=1000, max_seqs=3) == [[1, 1, 1], [1, 1, 1], [1]]
