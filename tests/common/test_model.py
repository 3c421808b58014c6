"""Our model forward against transformers' on the same checkpoints (float32)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from common.engine import Engine
from common.kv.float_backend import FloatKVBackend
from common.kv.interface import ForwardBatch
from common.loader import load_model
from common.random_models import RandomModelSpec
from common.sampling import SamplingParams

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}
SPECS = {
    "llama-gqa2-d64": RandomModelSpec("LlamaForCausalLM", num_heads=4, num_kv_heads=2, head_dim=64, seed=1),
    "llama3-rope-tied-d128": RandomModelSpec("LlamaForCausalLM", num_heads=2, num_kv_heads=2, head_dim=128,
                                             rope_theta=500000.0, rope_scaling=LLAMA3_SCALING,
                                             tie_word_embeddings=True, seed=2),
    "mistral-gqa4-d64": RandomModelSpec("MistralForCausalLM", num_heads=4, num_kv_heads=1, head_dim=64, seed=3),
    "qwen2-bias-gqa2-d64": RandomModelSpec("Qwen2ForCausalLM", num_heads=4, num_kv_heads=2, head_dim=64, seed=4),
    "qwen3-qknorm-d128": RandomModelSpec("Qwen3ForCausalLM", num_heads=2, num_kv_heads=1, head_dim=128, seed=5),
}


def hf_model(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def our_logits(loaded, prompt: list[int]) -> torch.Tensor:
    kv = FloatKVBackend.for_model(loaded.config)
    batch = ForwardBatch.build([0], [0], [len(prompt)])
    kv.reserve(batch)
    return loaded.model(torch.tensor(prompt), batch, kv, logits="all")


def random_prompt(length: int, vocab: int) -> list[int]:
    return torch.randint(3, vocab, (length,)).tolist()


@pytest.mark.parametrize("name", SPECS)
def test_logits_match_transformers(name: str, random_checkpoint) -> None:
    path = random_checkpoint(SPECS[name])
    loaded, reference = load_model(path, dtype="float32", device="cpu"), hf_model(path)
    for length in (1, 17, 100):
        prompt = random_prompt(length, loaded.config.vocab_size)
        with torch.no_grad():
            expected = reference(torch.tensor([prompt])).logits[0]
        assert (our_logits(loaded, prompt) - expected).abs().max().item() <= 1e-4


def test_stories260k_logits_match_transformers(stories260k) -> None:
    loaded, reference = load_model(stories260k, dtype="float32", device="cpu"), hf_model(stories260k)
    prompt = loaded.tokenizer.encode("Once upon a time, there was a little dog named Max.")
    with torch.no_grad():
        expected = reference(torch.tensor([prompt])).logits[0]
    assert (our_logits(loaded, prompt) - expected).abs().max().item() <= 1e-4


def greedy_hf(reference, prompt: list[int], max_new: int) -> list[int]:
    out = reference.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", ["llama-gqa2-d64", "qwen3-qknorm-d128"])
def test_greedy_generation_matches_transformers_random(name: str, random_checkpoint) -> None:
    path = random_checkpoint(SPECS[name])
    loaded, reference = load_model(path, dtype="float32", device="cpu"), hf_model(path)
    prompt = random_prompt(17, loaded.config.vocab_size)
    engine = Engine(loaded, FloatKVBackend.for_model(loaded.config))
    ours = engine.generate([prompt], [SamplingParams(max_tokens=64, temperature=0)])[0]
    assert ours.token_ids == greedy_hf(reference, prompt, 64)


def test_greedy_generation_matches_transformers_stories(stories260k) -> None:
    loaded, reference = load_model(stories260k, dtype="float32", device="cpu"), hf_model(stories260k)
    prompt = loaded.tokenizer.encode("Once upon a time")
    engine = Engine(loaded, FloatKVBackend.for_model(loaded.config))
    ours = engine.generate([prompt], [SamplingParams(max_tokens=64, temperature=0)])[0]
    assert ours.token_ids == greedy_hf(reference, prompt, 64)
    assert "Lily" in ours.text  # the model's well-known first story


def test_mixed_length_batch_equals_each_alone(stories260k) -> None:
    loaded = load_model(stories260k, dtype="float32", device="cpu")
    prompts = [loaded.tokenizer.encode(text) for text in
               ("Once upon a time", "The cat", "Tom and his sister went to the big park to play", "A")]
    params = [SamplingParams(max_tokens=n, temperature=0) for n in (30, 5, 17, 1)]
    engine = Engine(loaded, FloatKVBackend.for_model(loaded.config))
    batched = engine.generate(prompts, params)
    for prompt, p, together in zip(prompts, params, batched):
        alone = engine.generate([prompt], [p])[0]
        assert together.token_ids == alone.token_ids
        assert len(together.token_ids) <= p.max_tokens


def test_decode_steps_equal_full_prefill_logits(random_checkpoint) -> None:
    """Feeding a prompt token by token through the cache gives the same logits as one prefill."""
    loaded = load_model(random_checkpoint(SPECS["llama-gqa2-d64"]), dtype="float32", device="cpu")
    prompt = random_prompt(17, loaded.config.vocab_size)
    full = our_logits(loaded, prompt)
    kv = FloatKVBackend.for_model(loaded.config)
    for position, token in enumerate(prompt):
        batch = ForwardBatch.build([7], [position], [1])
        kv.reserve(batch)
        step = loaded.model(torch.tensor([token]), batch, kv)
        assert torch.allclose(step[0], full[position], atol=1e-4)
    assert kv.num_tokens(7) == 17
    kv.free(7)
    assert kv.num_tokens(7) == 0


def test_chunked_prefill_equals_one_prefill(random_checkpoint) -> None:
    """A 17-token prompt fed as chunks of 10 and 7 (next to another sequence) gives one prefill's logits."""
    loaded = load_model(random_checkpoint(SPECS["qwen2-bias-gqa2-d64"]), dtype="float32", device="cpu")
    prompt, other = random_prompt(17, loaded.config.vocab_size), random_prompt(5, loaded.config.vocab_size)
    full = our_logits(loaded, prompt)
    kv = FloatKVBackend.for_model(loaded.config)
    first = ForwardBatch.build([1], [0], [10])
    kv.reserve(first)
    loaded.model(torch.tensor(prompt[:10]), first, kv)
    second = ForwardBatch.build([2, 1], [0, 10], [5, 7])
    kv.reserve(second)
    logits = loaded.model(torch.tensor(other + prompt[10:]), second, kv, logits="all")
    assert torch.allclose(logits[5:], full[10:], atol=1e-4)
