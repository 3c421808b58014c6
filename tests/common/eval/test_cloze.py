"""`python -m common.eval.cloze`: seeded questions, one pass giving perplexity and accuracy, bad input."""
from __future__ import annotations

import json

import pytest

from common.eval import perplexity
from common.eval.cloze import CHOICES, evaluate, main, make_questions, word_tokens
from common.kv.config import KVConfig


@pytest.fixture(scope="module")
def text(tinystories_text) -> str:
    return perplexity.read_text_prefix(str(tinystories_text), 400)


class CharTokenizer:
    """Token i is the i-th word of a fixed list; SentencePiece-style word starts."""

    pieces = ["▁the", "▁cat", "s", "▁sat", "▁on", "▁a", "▁mat", "▁dog", "!", "▁ran"]

    def convert_ids_to_tokens(self, token: int) -> str:
        return self.pieces[token]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.pieces[i] for i in ids).replace("▁", " ")


def test_word_tokens_are_word_starts_of_three_letters_or_more() -> None:
    assert word_tokens(CharTokenizer(), set(range(10))) == {0, 1, 3, 6, 7, 9}


def test_questions_are_seeded_and_well_formed(stories_model, text) -> None:
    windows = perplexity.text_windows(stories_model.tokenizer, text, 128, 400)
    first = make_questions(stories_model.tokenizer, windows, 20, seed=3, min_position=32)
    assert first == make_questions(stories_model.tokenizer, windows, 20, seed=3, min_position=32)
    assert first != make_questions(stories_model.tokenizer, windows, 20, seed=4, min_position=32)
    assert 0 < len(first) <= 20
    for q in first:
        assert q.position >= 32 and windows[q.window][q.position + 1] == q.choices[0]
        assert len(set(q.choices)) == CHOICES


def test_one_pass_gives_the_perplexity_and_an_accuracy(stories_model, text) -> None:
    result = evaluate(stories_model, KVConfig(mode="fp16"), text, context=128, max_tokens=300, count=30,
                      min_position=32)
    plain = perplexity.evaluate(stories_model, KVConfig(mode="fp16"), text, context=128, max_tokens=300)
    assert result["perplexity"] == pytest.approx(plain["perplexity"], rel=1e-6)
    assert result["tokens"] == plain["tokens"] == 300
    assert 0 < result["questions"] <= 30 and 0 <= result["exact_match"] <= result["accuracy"] <= 1
    assert result["accuracy"] > 1 / CHOICES  # far better than chance, even for stories260K
    assert result["wire_bytes"] == result["fp16_wire_bytes"]


@pytest.mark.parametrize("args, message", [
    (["--questions", "0"], "--questions must be >= 1"),
    (["--min-position", "600"], "--context must be in"),
    (["--text", "/nonexistent.txt"], "No such file"),
])
def test_bad_input_exits_2(capsys, stories260k, tinystories_text, args, message) -> None:
    text = [] if "--text" in args else ["--text", str(tinystories_text)]
    code = main(["--model", str(stories260k), *text, "--max-tokens", "100", "--context", "128", *args])
    captured = capsys.readouterr()
    assert code == 2 and message in captured.err


def test_cli_prints_json(capsys, stories260k, tinystories_text) -> None:
    code = main(["--model", str(stories260k), "--text", str(tinystories_text), "--max-tokens", "200",
                 "--context", "128", "--min-position", "32", "--questions", "10", "--kv-mode", "hack"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and result["kv_config"]["mode"] == "hack" and result["questions"] <= 10
