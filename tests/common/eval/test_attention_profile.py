"""`python -m common.eval.attention_profile`: the recorder computes the model's real attention and measures it."""
from __future__ import annotations

import json

import pytest
import torch

from common.eval.attention_profile import AttentionRecorder, causal_probabilities, main
from common.kv.float_backend import FloatKVBackend
from common.kv.interface import ForwardBatch


def test_probabilities_are_causal_and_sum_to_one() -> None:
    q, k = torch.randn(17, 4, 8), torch.randn(17, 2, 8)
    probs = causal_probabilities(q, k)
    assert probs.shape == (4, 17, 17)
    assert torch.allclose(probs.sum(-1), torch.ones(4, 17))
    assert float(probs.triu(1).abs().max()) == 0


def test_shares_of_a_sink_and_of_a_local_pattern() -> None:
    n, dim = 23, 8
    q = torch.zeros(n, 1, dim)
    q[:, 0, 0] = 10.0
    k = torch.zeros(n, 1, dim)
    k[0, 0, 0] = 10.0  # every query looks at token 0 only
    recorder = AttentionRecorder(num_layers=1, sinks=1, recent=5)
    batch = ForwardBatch.build([0], [0], [n])
    recorder.reserve(batch)
    recorder.attend(0, q, k, torch.randn(n, 1, dim), batch)
    assert recorder.sink_share[0][0] == pytest.approx(1.0, abs=1e-6)
    assert recorder.recent_share[0][0] == pytest.approx(0.0, abs=1e-6)


def test_recorder_attention_is_the_models_attention(stories_model) -> None:
    windows = [[1, *range(40, 40 + 16)], [1, *range(300, 300 + 10)]]  # 17 and 11 tokens
    tokens = torch.tensor([t for w in windows for t in w])
    batch = ForwardBatch.build([0, 1], [0, 0], [len(w) for w in windows])
    recorder, reference = AttentionRecorder(5, sinks=4, recent=8), FloatKVBackend.for_model(stories_model.config)
    for backend in (recorder, reference):
        backend.reserve(batch)
    with torch.no_grad():
        ours, theirs = stories_model.model(tokens, batch, recorder), stories_model.model(tokens, batch, reference)
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert all(len(shares) == 2 for shares in recorder.recent_share)


def test_stories260k_attends_locally_without_sinks(capsys, stories260k, tinystories_text) -> None:
    code = main(["--model", str(stories260k), "--text", str(tinystories_text), "--windows", "2"])
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["layers"]
    assert code == 0 and len(rows) == 5
    # docs/accuracy.md rests on these: no attention sink, most attention on the last 64 tokens
    assert all(r["sink_share"] < 0.05 and r["recent_share"] > 0.75 for r in rows)


def test_bad_input_exits_2(capsys, stories260k, tinystories_text) -> None:
    assert main(["--model", str(stories260k), "--text", str(tinystories_text), "--recent", "256"]) == 2
    assert main(["--model", str(stories260k), "--text", str(tinystories_text), "--context", "600"]) == 2
    assert "--context must be <= 512" in capsys.readouterr().err
