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
