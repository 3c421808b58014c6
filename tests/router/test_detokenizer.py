"""Incremental detokenization (sentencepiece-style stories260K tokenizer and a byte-level one) and stop strings."""
from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from router.detokenizer import IncrementalDetokenizer, StopStringMatcher


def stream_text(tokenizer, prompt_ids: list[int], output_ids: list[int]) -> tuple[str, list[str]]:
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
    deltas = [detokenizer.push(token) for token in output_ids]
    deltas.append(detokenizer.flush())
    return "".join(deltas), deltas


def expected_text(tokenizer, prompt_ids: list[int], output_ids: list[int]) -> str:
    """What the output adds to the decoded prompt (the reference the stream must reproduce)."""
    full = tokenizer.decode(prompt_ids + output_ids, skip_special_tokens=True)
    prompt = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    assert full.startswith(prompt)
    return full[len(prompt):]


@pytest.fixture(scope="module")
def stories_tokenizer(stories260k):
    return AutoTokenizer.from_pretrained(stories260k)


def test_stories_paragraphs_stream_to_the_same_text_as_a_full_decode(stories_tokenizer, tinystories_text):
    rng = random.Random()
    paragraphs = [p for p in tinystories_text.read_text().split("\n") if len(p) > 40]
    for paragraph in rng.sample(paragraphs, 5):
        ids = stories_tokenizer(paragraph).input_ids  # BOS + pieces with leading spaces
        split = rng.randint(1, len(ids) - 1)
        prompt_ids, output_ids = ids[:split], ids[split:]
        text, _ = stream_text(stories_tokenizer, prompt_ids, output_ids)
        assert text == expected_text(stories_tokenizer, prompt_ids, output_ids)


def test_stories_byte_fallback_waits_for_the_whole_character(stories_tokenizer):
    prompt_ids = stories_tokenizer("Once").input_ids
    output_ids = stories_tokenizer("café 😀 ok", add_special_tokens=False).input_ids
    text, deltas = stream_text(stories_tokenizer, prompt_ids, output_ids)
    assert text == " café 😀 ok"
    assert "\ufffd" not in text and "😀" in deltas  # the emoji's 4 byte tokens give one delta
    assert deltas.count("") >= 3  # ... after three that add nothing


def test_output_right_after_bos_has_no_leading_space(stories_tokenizer):
    output_ids = stories_tokenizer("Once upon", add_special_tokens=False).input_ids
    text, _ = stream_text(stories_tokenizer, [stories_tokenizer.bos_token_id], output_ids)
    assert text == "Once upon"


def test_byte_level_multibyte_text_round_trips(byte_tokenizer):
    output = "naïve 日本 🎉 end"
    output_ids = byte_tokenizer(output, add_special_tokens=False).input_ids
    assert len(output_ids) == len(output.encode())  # one token per byte: characters span tokens
    text, deltas = stream_text(byte_tokenizer, byte_tokenizer("x").input_ids, output_ids)
    assert text == output and "🎉" in deltas


def test_flush_returns_an_incomplete_character_as_replacement(byte_tokenizer):
    two_of_four_bytes = byte_tokenizer("🎉", add_special_tokens=False).input_ids[:2]
    text, deltas = stream_text(byte_tokenizer, [1], two_of_four_bytes)
    assert deltas[:2] == ["", ""] and text == "\ufffd"


def feed_all(matcher: StopStringMatcher, pieces: list[str]) -> str:
    out = []
    for piece in pieces:
        out.append(matcher.feed(piece))
        if matcher.stopped:
            return "".join(out)
    return "".join(out) + matcher.flush()


@pytest.mark.parametrize(
    ("stops", "pieces", "expected", "stopped"),
    [
        (["END"], ["abc", "E", "N", "D", "more"], "abc", True),  # a stop split across three deltas
        (["END"], ["abcEND"], "abc", True),
        (["END", "c"], ["abcEND"], "ab", True),  # the earliest match wins
        (["END"], ["abc", "EN", "x"], "abcENx", False),  # a false start is released
        (["\n\n"], ["line\n", "\n", "next"], "line", True),
        ([], ["a", "b"], "ab", False),
        (["x"], [""], "", False),
    ],
)
def test_stop_strings(stops, pieces, expected, stopped):
    matcher = StopStringMatcher(stops)
    assert feed_all(matcher, pieces) == expected
    assert matcher.stopped is stopped


def test_stop_matcher_never_emits_the_start_of_a_stop_string():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("abST") == "a"  # the last len("STOP") - 1 characters are held back
    assert matcher.feed("O") == "b"
    assert matcher.feed("P!") == "" and matcher.stopped  # "STO" was never shown


def test_stop_matcher_rejects_empty_stop_strings():
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher(["ok", ""])
