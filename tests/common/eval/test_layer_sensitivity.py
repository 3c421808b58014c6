"""`common.eval.layer_sensitivity`: the simulated storage equals the dequant backend's decode steps; scopes; CLI."""
from __future__ import annotations

import json

import pytest
import torch

from common.eval.backend import backend_for_sequences
from common.eval.layer_sensitivity import Scope, SimulatedKVBackend, main, window_perplexity
from common.kv.config import KVConfig
from common.kv.float_backend import FloatKVBackend
from common.kv.format import STORAGE_DTYPE
from common.kv.interface import ForwardBatch
from common.loader import load_model
from common.random_models import RandomModelSpec

GQA_3_TO_1 = RandomModelSpec(hidden_size=96, num_heads=3, num_kv_heads=1, head_dim=32, num_layers=2)
SEQUENCE = torch.randint(3, 259, (113,), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.fixture(scope="module")
def model(random_checkpoint):
    return load_model(random_checkpoint(GQA_3_TO_1), dtype="float32", device="cpu")


def decoded_logits(loaded, config: KVConfig, tokens: list[int]) -> torch.Tensor:
    """Logits of every position, fed one decode step at a time through the real backend."""
    backend = backend_for_sequences(loaded, config, [len(tokens)])
    rows = []
    for position, token in enumerate(tokens):
        batch = ForwardBatch.build([0], [position], [1])
        backend.reserve(batch)
        rows.append(loaded.model(torch.tensor([token]), batch, backend)[0])
    return torch.stack(rows)


def simulated_logits(loaded, config: KVConfig, tokens: list[int], scope: Scope = Scope()) -> torch.Tensor:
    cfg = loaded.config
    backend = SimulatedKVBackend(config, cfg.num_kv_heads, cfg.head_dim, scope)
    batch = ForwardBatch.build([0], [0], [len(tokens)])
    backend.reserve(batch)
    return loaded.model(torch.tensor(tokens), batch, backend, logits="all")


@pytest.mark.parametrize("config", [
    KVConfig(mode="dequant", partition=32, window=17, num_sinks=3),  # 113 tokens: flushes, a partial tail
    KVConfig(mode="dequant", partition=32, window=0, ranges="minmax", rotate=False, key_axis="token"),
    KVConfig(mode="dequant", partition=64, window=0, num_sinks=0, bits=4),
    KVConfig(mode="dequant", partition=32, window=17, key_bits=4),
], ids=["window-rotate-mse", "paper-token-keys", "4-bit-no-sinks", "4-bit-keys"])
def test_the_simulation_equals_dequant_decode_steps(model, config) -> None:
    expected = decoded_logits(model, config, SEQUENCE)
    got = simulated_logits(model, config, SEQUENCE)
    float_logits = simulated_logits(model, config, SEQUENCE, Scope(layers=frozenset()))
    off, effect = float((got - expected).abs().max()), float((float_logits - expected).abs().max())
    assert off < 1e-3 and off < 0.02 * effect, (off, effect)  # float rounding, far below what the codes change


def test_a_scope_without_layers_is_fp16_kv(model) -> None:
    cfg = model.config
    fp16 = FloatKVBackend.for_model(cfg, dtype=STORAGE_DTYPE)
    batch = ForwardBatch.build([0], [0], [len(SEQUENCE)])
    fp16.reserve(batch)
    expected = model.model(torch.tensor(SEQUENCE), batch, fp16, logits="all")
    got = simulated_logits(model, KVConfig(mode="dequant", rotate=False), SEQUENCE, Scope(layers=frozenset()))
    assert torch.allclose(got, expected, atol=1e-4)


def test_one_layer_or_one_part_lies_between_none_and_all(model) -> None:
    config = KVConfig(mode="dequant", partition=32, window=0, ranges="minmax", rotate=False)
    windows = [SEQUENCE]
    cfg = model.config

    def ppl(scope: Scope) -> float:
        return window_perplexity(model, windows, SimulatedKVBackend(config, cfg.num_kv_heads, cfg.head_dim, scope))

    values = {name: ppl(scope) for name, scope in {
        "none": Scope(layers=frozenset()), "all": Scope(), "layer 1": Scope(layers=frozenset({1})),
        "k": Scope(parts=("k",)), "v": Scope(parts=("v",))}.items()}
    assert len(set(values.values())) == 5  # every scope changes what is quantized


def test_only_whole_sequences_and_compressed_modes(model) -> None:
    cfg = model.config
    with pytest.raises(ValueError, match="compressed KV mode"):
        SimulatedKVBackend(KVConfig(mode="fp16"), cfg.num_kv_heads, cfg.head_dim)
    backend = SimulatedKVBackend(KVConfig(mode="dequant"), cfg.num_kv_heads, cfg.head_dim)
    with pytest.raises(ValueError, match="empty cache"):
        backend.reserve(ForwardBatch.build([0], [5], [1]))


def test_cli_prints_the_table_and_json(stories260k, tinystories_text, capsys) -> None:
    code = main(["--model", str(stories260k), "--text", str(tinystories_text), "--max-tokens", "300",
                 "--context", "150", "--partition", "32", "--window", "16"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    result = json.loads(out[-1])
    assert result["tokens"] == 300 and len(result["rows"]) == 3 + 5  # all, K, V, then stories260K's 5 layers
    assert [r["scope"] for r in result["rows"][:4]] == ["all layers", "all layers, K only", "all layers, V only",
                                                        "layer 0"]
    assert "| layer 4 |" in "\n".join(out)


def test_cli_names_bad_input(capsys, tmp_path) -> None:
    assert main(["--text", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
