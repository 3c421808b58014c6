"""Sampler: greedy, seeds, top-k and top-p cut-offs, parameter validation."""
from __future__ import annotations

import pytest
import torch

from common.sampling import Sampler, SamplingParams, TokenHistory, choice_params, filtered_probabilities


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


# ---------------------------------------------------------------------------------------------------------------
# vLLM parity: penalties, logit_bias, min_tokens, logprobs, one transfer per step
# ---------------------------------------------------------------------------------------------------------------


def vllm_penalized(logits: torch.Tensor, prompt: list[int], output: list[int], repetition: float,
                   frequency: float, presence: float) -> torch.Tensor:
    """vLLM's definitions, token by token: repetition divides a positive / multiplies a negative logit of any
    token seen in prompt or output; frequency subtracts count * f, presence (count > 0) * p, over the output."""
    out = logits.clone()
    for token in range(logits.shape[0]):
        count = output.count(token)
        if token in prompt or count:
            out[token] = out[token] / repetition if out[token] > 0 else out[token] * repetition
        out[token] -= count * frequency + (count > 0) * presence
    return out


def test_penalties_match_vllm_definitions() -> None:
    from common.sampling import TokenHistory, apply_penalties

    torch.manual_seed(0)
    logits = torch.randn(3, 40) * 3
    histories = [TokenHistory([1, 2, 3], [3, 3, 5, 7]), TokenHistory([], [0, 0, 0]), TokenHistory([9] * 5, [])]
    params = [SamplingParams(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=-0.7),
              SamplingParams(frequency_penalty=2.0, presence_penalty=1.0),
              SamplingParams(repetition_penalty=0.5)]
    got = apply_penalties(logits, params, histories)
    for row, (p, h) in enumerate(zip(params, histories)):
        expected = vllm_penalized(logits[row], list(h.prompt_ids), list(h.output_ids), p.repetition_penalty,
                                  p.frequency_penalty, p.presence_penalty)
        assert torch.allclose(got[row], expected, atol=1e-6)


def test_a_penalty_changes_the_greedy_choice() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.9, -1.0]])
    plain = Sampler().sample(logits, [SamplingParams(temperature=0)], [3], [TokenHistory([0], [1, 1])])
    penalized = Sampler().sample(logits, [SamplingParams(temperature=0, frequency_penalty=0.1)], [3],
                                 [TokenHistory([0], [1, 1])])
    assert plain == [1] and penalized == [2]  # 2.0 - 2 * 0.1 < 1.9


def test_logit_bias_and_min_tokens() -> None:
    logits = torch.zeros(2, 10)
    biased = SamplingParams(temperature=0, logit_bias=((7, 5.0),))
    eos_early = SamplingParams(temperature=0, logit_bias=((2, 100.0),), stop_token_ids=(2,), min_tokens=3)
    assert Sampler().sample(logits, [biased, eos_early], [0, 2]) == [7, 0]  # EOS masked before 3 tokens
    assert Sampler().sample(logits, [biased, eos_early], [0, 3]) == [7, 2]


def test_logprobs_are_the_raw_log_softmax_with_top_k() -> None:
    torch.manual_seed(1)
    logits = torch.randn(3, 30)
    params = [SamplingParams(temperature=0.7, seed=5, logprobs=3, presence_penalty=1.0),
              SamplingParams(temperature=0), SamplingParams(temperature=0, logprobs=0)]
    out = Sampler().run(logits, params, [0, 0, 0], [TokenHistory([1], [2])] * 3)
    reference = torch.log_softmax(logits, dim=-1)
    first = out.logprobs[0]
    assert first.logprob == pytest.approx(reference[0, out.tokens[0]].item(), abs=1e-6)
    top = reference[0].topk(3)
    assert list(first.top_ids) == top.indices.tolist()
    assert first.top_logprobs == pytest.approx(top.values.tolist(), abs=1e-6)
    assert out.logprobs[1] is None
    assert out.logprobs[2].top_ids == () and out.logprobs[2].logprob == pytest.approx(reference[2].max().item())


def test_batched_filters_equal_the_one_row_filter() -> None:
    torch.manual_seed(2)
    logits = torch.randn(4, 64)
    params = [SamplingParams(temperature=0.5, top_k=5), SamplingParams(top_p=0.6),
              SamplingParams(temperature=1.3, top_k=10, top_p=0.8), SamplingParams()]
    from common.sampling import filtered_probabilities_batch

    batched = filtered_probabilities_batch(logits, params)
    for row, p in enumerate(params):
        assert torch.allclose(batched[row], filtered_probabilities(logits[row], p), atol=1e-6)


def test_seeded_draws_follow_the_distribution() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1])
    params = [SamplingParams(temperature=1.0, seed=seed) for seed in range(3000)]
    tokens = Sampler().sample(probs.log().expand(3000, -1), params, [0] * 3000)
    counts = torch.bincount(torch.tensor(tokens), minlength=3).float() / 3000
    assert torch.allclose(counts, probs, atol=0.03)


def test_one_device_to_host_transfer_per_step(monkeypatch) -> None:
    transfers = []
    original = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: (transfers.append(1), original(self, *a, **k))[1])
    monkeypatch.setattr(torch.Tensor, "tolist", _counting_tolist(transfers, torch.Tensor.tolist))
    params = [SamplingParams(temperature=0.8, seed=1, logprobs=2, frequency_penalty=0.5), SamplingParams(top_k=3)]
    Sampler().run(torch.randn(2, 50), params, [1, 0], [TokenHistory([1, 2], [3])] * 2)
    assert len(transfers) == 1


def _counting_tolist(transfers: list, original):
    def tolist(self):
        if self.device.type != "cpu":
            transfers.append(1)
        return original(self)
    return tolist


@pytest.mark.parametrize("bad", [dict(presence_penalty=3), dict(repetition_penalty=0), dict(min_tokens=-1),
                                 dict(logprobs=21)])
def test_invalid_vllm_params_rejected(bad: dict) -> None:
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


def test_choices_differ_only_by_their_seeds() -> None:
    seeded = SamplingParams(temperature=0.8, seed=2**64 - 2, top_k=5)
    assert [p.seed for p in choice_params(seeded, 3)] == [2**64 - 2, 2**64 - 1, 0]
    assert all(p.top_k == 5 for p in choice_params(seeded, 3))
    assert choice_params(SamplingParams(), 2) == [SamplingParams()] * 2  # unseeded: each draws its own noise
    with pytest.raises(ValueError, match="n"):
        choice_params(seeded, 0)
