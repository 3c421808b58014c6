"""The prefill worker: one batched forward whose KV leaves layer by layer, as the layers run."""
from __future__ import annotations

import pytest
import torch

from common.engine import Engine
from common.kv.config import KVConfig
from common.kv.factory import make_kv_backend
from common.kv.wire import decode_layer
from common.loader import load_model
from common.sampling import SamplingParams
from prefill_service.worker import PrefillWorker
from tests.decode_service.harness import SPEC


@pytest.fixture(scope="module")
def loaded(random_checkpoint):
    return load_model(random_checkpoint(SPEC), device="cpu")


def backend(loaded, mode: str):
    return make_kv_backend(KVConfig(mode=mode, partition=32), loaded.config, "cpu", torch.float32, max_tokens=512)


@pytest.mark.parametrize("mode", ["fp16", "hack"])
def test_each_layer_is_exported_right_after_its_attention(loaded, mode: str) -> None:
    kv = backend(loaded, mode)
    events: list[tuple] = []
    attend = kv.attend
    kv.attend = lambda layer, *args: (events.append(("attend", layer)), attend(layer, *args))[1]
    chunks: dict[tuple[int, int], list[bytes]] = {}

    def on_layer(seq_id: int, layer: int, data: list[bytes]) -> None:
        events.append(("export", layer, seq_id))
        chunks[seq_id, layer] = data

    prompts = [torch.randint(3, SPEC.vocab_size, (n,)).tolist() for n in (1, 17, 45)]
    params = [SamplingParams(temperature=0.0)] * 3
    first = PrefillWorker(loaded, kv).run([10, 11, 12], prompts, params, on_layer)

    expected_events = []
    for layer in range(SPEC.num_layers):
        expected_events += [("attend", layer)] + [("export", layer, seq) for seq in (10, 11, 12)]
    assert events == expected_events
    for (seq_id, layer), data in chunks.items():
        prompt = prompts[seq_id - 10]
        assert decode_layer(kv.layout, data).num_tokens == len(prompt)
        assert sum(map(len, data)) == kv.layout.wire_bytes(len(prompt))
    assert kv.pool.used_blocks == 0 and kv.pool.num_seqs == 0
    reference = Engine(loaded, backend(loaded, mode)).generate(prompts, [SamplingParams(1, temperature=0.0)] * 3)
    assert [output.first_token for output in first] == [c.token_ids[0] for c in reference]


def test_a_failing_forward_frees_the_pool(loaded) -> None:
    kv = backend(loaded, "hack")

    def broken_sender(seq_id: int, layer: int, data: list[bytes]) -> None:
        raise ConnectionError("the sender is gone")

    with pytest.raises(ConnectionError):
        PrefillWorker(loaded, kv).run([1], [[5, 6, 7]], [SamplingParams()], broken_sender)
    assert kv.pool.used_blocks == 0 and kv.pool.num_seqs == 0


def test_each_choice_samples_its_first_token_with_seed_plus_its_index(loaded) -> None:
    prompts = [torch.randint(3, SPEC.vocab_size, (n,)).tolist() for n in (9, 30)]
    seeded = SamplingParams(temperature=1.5, seed=5, logprobs=2)
    worker = PrefillWorker(loaded, backend(loaded, "hack"))
    ignore = lambda *args: None  # noqa: E731 - the KV is not looked at here
    forked = worker.run([1, 2], prompts, [seeded, seeded], ignore, choices=[4, 1])
    assert [len(output.first_tokens) for output in forked] == [4, 1]
    alone = [worker.run([3], prompts[:1], [SamplingParams(temperature=1.5, seed=5 + i, logprobs=2)], ignore)[0]
             for i in range(4)]
    assert forked[0].first_tokens == tuple(output.first_token for output in alone)
    for logprobs, output in zip(forked[0].first_logprobs, alone):  # the same up to the batch's float rounding
        assert logprobs.top_ids == output.first_logprobs[0].top_ids
        assert logprobs.logprob == pytest.approx(output.first_logprobs[0].logprob, abs=1e-4)  # measured up to 1.1e-5
    assert len(set(forked[0].first_tokens)) > 1  # temperature 1.5 over a random model's logits
