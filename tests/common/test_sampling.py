"""Sampler: greedy, seeds, top-k and top-p cut-offs, parameter validation."""
from __future__ import annotations

import pytest
import torch

from common.sampling import Sampler, SamplingParams, filtered_probabilities


def test_greedy_takes_argmax() -> None:
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=0)] * 3
    assert Sampler().sample(logits, params, [0, 0, 0]) == logits.argmax(-1).tolist()


def test_seed_is_reproducible_and_independent_of_batch() -> None:
    logits = torch.randn(1, 100)
    seeded = SamplingParams(temperature=1.0, seed=42)
    alone = [Sampler().sample(logits, [seeded], [4])[0] for _ in range(3)]
    batched = Sampler().sample(torch.cat([torch.randn(1, 100), logits]),
                               [SamplingParams(temperature=1.0), seeded], [0, 4])[1]
    assert len(set(alone)) == 1 and batched == alone[0]


def test_seeded_positions_draw_independently() -> None:
    """Different output positions of one seeded request do not replay the same random draw."""
    logits = torch.zeros(1, 1000)
    seeded = SamplingParams(temperature=1.0, seed=7)
    draws = {Sampler().sample(logits, [seeded], [position])[0] for position in range(20)}
    assert len(draws) > 10


def test_top_k_keeps_k_tokens() -> None:
    logits = torch.arange(10, dtype=torch.float32)
    probs = filtered_probabilities(logits, SamplingParams(temperature=1.0, top_k=3))
    assert (probs > 0).nonzero().flatten().tolist() == [7, 8, 9]
    assert probs.sum().item() == pytest.approx(1.0)


def test_top_p_keeps_smallest_prefix_reaching_p() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    probs = filtered_probabilities(logits, SamplingParams(temperature=1.0, top_p=0.7))
    assert probs.tolist() == pytest.approx([0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0])


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-2),
                                 dict(stop=("",))])
def test_invalid_params_rejected(bad: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_a_resumed_request_draws_what_the_uninterrupted_one_drew() -> None:
    """position_offset (a migrated request) shifts the seeded positions: the draw at absolute position 7 is the
    same whether the request sampled 7 tokens before or was resumed after them."""
    import torch

    from common.sampling import Sampler, SamplingParams

    logits = torch.randn(2, 50)
    whole = SamplingParams(temperature=0.9, seed=42)
    resumed = SamplingParams(temperature=0.9, seed=42, position_offset=7)
    sampler = Sampler()
    draws = [sampler.sample(logits[:1], [whole], [position])[0] for position in range(7, 12)]
    assert [sampler.sample(logits[:1], [resumed], [i])[0] for i in range(5)] == draws
