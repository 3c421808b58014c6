"""Prompt sources of bench.hack_bench.dataset: exact token lengths, vLLM's ShareGPT filter, text and long files."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from bench.hack_bench.dataset import (
    DatasetConfig,
    decode_to_exact_length,
    encode,
    is_valid_sharegpt_pair,
    load_tokenizer,
    sample_requests,
    self_contained_token_ids,
    uniform_lengths,
)
from bench.hack_bench.records import BenchmarkError


def _words(count: int, rng: np.random.Generator) -> str:
    return " ".join(f"w{i}" for i in rng.integers(0, 40, size=count))


def _assert_exact(tokenizer, samples) -> None:
    for sample in samples:
        assert len(encode(tokenizer, sample.prompt)) == sample.prompt_len
        assert encode(tokenizer, sample.prompt) == sample.prompt_token_ids


def test_uniform_lengths_stay_in_range() -> None:
    rng = np.random.default_rng(0)
    lengths = uniform_lengths(10, 0.5, 500, rng)
    assert min(lengths) == 5 and max(lengths) == 15
    assert uniform_lengths(17, 0.0, 3, rng) == [17, 17, 17]
    assert min(uniform_lengths(1, 0.9, 50, rng)) == 1


def test_random_prompts_have_exact_lengths_and_follow_the_seed(tiny_tokenizer) -> None:
    config = DatasetConfig(num_prompts=17, random_input_len=17, random_output_len=5, random_range_ratio=0.3)
    samples = sample_requests(config, tiny_tokenizer)
    assert len(samples) == 17
    assert all(11 <= s.prompt_len <= 23 and 3 <= s.expected_output_len <= 7 for s in samples)  # floor / ceil
    assert len({s.prompt_len for s in samples}) > 1
    _assert_exact(tiny_tokenizer, samples)
    assert sample_requests(config, tiny_tokenizer) == samples
    other_seed = dataclasses.replace(config, seed=1)
    assert [s.prompt for s in sample_requests(other_seed, tiny_tokenizer)] != [s.prompt for s in samples]


@pytest.mark.parametrize("input_len", [1, 17, 333])
def test_random_prompts_are_exact_with_a_byte_fallback_bpe(stories_tokenizer, input_len: int) -> None:
    config = DatasetConfig(num_prompts=5, random_input_len=input_len, random_output_len=3, seed=input_len)
    samples = sample_requests(config, stories_tokenizer)
    assert [s.prompt_len for s in samples] == [input_len] * 5
    _assert_exact(stories_tokenizer, samples)


def test_self_contained_tokens_exclude_specials_and_byte_pieces(stories_tokenizer) -> None:
    vocab = self_contained_token_ids(stories_tokenizer)
    assert not set(vocab.tolist()) & set(stories_tokenizer.all_special_ids)
    pieces = stories_tokenizer.convert_ids_to_tokens(vocab.tolist())
    assert not any(piece.startswith("<0x") for piece in pieces)
    assert len(vocab) > 50


def test_decode_to_exact_length_trims_and_tops_up(stories_tokenizer) -> None:
    rng = np.random.default_rng(3)
    vocab = self_contained_token_ids(stories_tokenizer)
    raw = rng.integers(3, 512, size=40).tolist()  # includes byte-fallback pieces that re-encode differently
    for target in (1, 33, 80):
        text, ids = decode_to_exact_length(
            stories_tokenizer, raw, target, extend=lambda n: rng.choice(vocab, size=n).tolist()
        )
        assert len(ids) == target == len(encode(stories_tokenizer, text))


def test_decode_to_exact_length_gives_up_with_a_clear_error(tiny_tokenizer) -> None:
    with pytest.raises(BenchmarkError, match="exactly 3 tokens"):
        decode_to_exact_length(tiny_tokenizer, encode(tiny_tokenizer, "w1"), 3, extend=lambda n: [])


@pytest.mark.parametrize(
    ("prompt_len", "output_len", "check_output", "valid"),
    [
        (4, 4, True, True),
        (3, 100, True, False),  # prompt too short
        (100, 3, True, False),  # output too short
        (100, 3, False, True),  # output length fixed by flag: not checked
        (1024, 1024, True, True),
        (1025, 10, True, False),  # prompt too long
        (1000, 1049, True, False),  # prompt + output too long
    ],
)
def test_sharegpt_filter_matches_vllm(prompt_len: int, output_len: int, check_output: bool, valid: bool) -> None:
    assert is_valid_sharegpt_pair(prompt_len, output_len, check_output_len=check_output) is valid


def _write_sharegpt(path: Path, rng: np.random.Generator) -> dict[str, tuple[int, int]]:
    """A ShareGPT file with 3 usable conversations among dropped ones; returns usable prompt -> lengths."""
    usable = {_words(n, rng): (n, m) for n, m in [(4, 9), (17, 4), (5, 11)]}
    conversations = [
        {"conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": _words(m, rng)}]}
        for p, (_, m) in usable.items()
    ]
    conversations += [
        {"conversations": [{"from": "human", "value": _words(9, rng)}]},  # one turn only
        {"conversations": [{"from": "human", "value": "w1 w2"}, {"from": "gpt", "value": _words(9, rng)}]},
        {"conversations": [{"from": "human", "value": _words(9, rng)}, {"from": "gpt", "value": "w3"}]},
        {"conversations": [{"from": "human", "value": _words(1025, rng)}, {"from": "gpt", "value": "w1 w2 w3 w4"}]},
        {"conversations": [{"from": "human", "value": _words(1000, rng)}, {"from": "gpt", "value": _words(1049, rng)}]},
        {"id": "no conversations key"},
    ]
    path.write_text(json.dumps(conversations))
    return usable


def test_sharegpt_keeps_valid_pairs_and_oversamples(tmp_path: Path, tiny_tokenizer) -> None:
    usable = _write_sharegpt(tmp_path / "sharegpt.json", np.random.default_rng(0))
    config = DatasetConfig(name="sharegpt", path=tmp_path / "sharegpt.json", num_prompts=3)
    samples = sample_requests(config, tiny_tokenizer)
    assert {s.prompt: (s.prompt_len, s.expected_output_len) for s in samples} == usable
    more = sample_requests(dataclasses.replace(config, num_prompts=7), tiny_tokenizer)
    assert len(more) == 7 and {s.prompt for s in more} == set(usable)


def test_sharegpt_fixed_output_len_keeps_short_replies(tmp_path: Path, tiny_tokenizer) -> None:
    _write_sharegpt(tmp_path / "sharegpt.json", np.random.default_rng(0))
    config = DatasetConfig(name="sharegpt", path=tmp_path / "sharegpt.json", num_prompts=5, sharegpt_output_len=2)
    samples = sample_requests(config, tiny_tokenizer)
    assert {s.expected_output_len for s in samples} == {2}
    # Now kept: the one-word reply (its length is not checked) and the 1000-token prompt (1000 + 2 <= 2048).
    assert sorted(s.prompt_len for s in samples) == [4, 5, 9, 17, 1000]


def test_sharegpt_rejects_a_file_that_is_not_a_list(tmp_path: Path, tiny_tokenizer) -> None:
    (tmp_path / "bad.json").write_text('{"conversations": []}')
    with pytest.raises(BenchmarkError, match="JSON list"):
        sample_requests(DatasetConfig(name="sharegpt", path=tmp_path / "bad.json"), tiny_tokenizer)


def test_text_prompts_in_order_cycled_with_optional_counts(tmp_path: Path, tiny_tokenizer) -> None:
    (tmp_path / "prompts.txt").write_text("w1 w2 w3\n\n   \nw4\nw5 w6\n")
    config = DatasetConfig(name="text", path=tmp_path / "prompts.txt", num_prompts=5, text_output_len=9)
    without_tokenizer = sample_requests(config, None)
    assert [s.prompt for s in without_tokenizer] == ["w1 w2 w3", "w4", "w5 w6", "w1 w2 w3", "w4"]
    assert {s.prompt_len for s in without_tokenizer} == {None}
    assert {s.expected_output_len for s in without_tokenizer} == {9}
    assert [s.prompt_len for s in sample_requests(config, tiny_tokenizer)] == [3, 1, 2, 3, 1]


def test_long_prompts_are_exact_windows_of_the_file(tinystories_text: Path, stories_tokenizer) -> None:
    config = DatasetConfig(name="long", path=tinystories_text, num_prompts=3, long_input_len=333, long_output_len=5)
    samples = sample_requests(config, stories_tokenizer)
    assert [s.prompt_len for s in samples] == [333] * 3
    _assert_exact(stories_tokenizer, samples)
    source = tinystories_text.read_text()
    assert all(s.prompt.strip()[:40] in source for s in samples)
    assert len({s.prompt for s in samples}) == 3


def test_long_rejects_a_file_shorter_than_the_window(tmp_path: Path, tiny_tokenizer) -> None:
    (tmp_path / "short.txt").write_text("w1 w2 w3 " * 10)
    config = DatasetConfig(name="long", path=tmp_path / "short.txt", long_input_len=17)
    with pytest.raises(BenchmarkError, match="30 tokens, too few"):
        sample_requests(config, tiny_tokenizer)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"random_range_ratio": 1.0}, "range-ratio"),
        ({"num_prompts": 0}, "num-prompts"),
        ({"random_input_len": 0}, "random-input-len"),
        ({"name": "sharegpt"}, "needs --dataset-path"),
        ({"name": "text", "path": Path("/nonexistent/prompts.txt")}, "is not a file"),
        ({"name": "sonnet"}, "unknown dataset"),
    ],
)
def test_config_is_validated(fields: dict, message: str) -> None:
    with pytest.raises(BenchmarkError, match=message):
        DatasetConfig(**fields)


def test_tokenizer_is_loaded_only_from_local_directories(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    assert load_tokenizer(None, "served-name") is None
    assert load_tokenizer(None, str(tiny_tokenizer_dir)).encode("w3", add_special_tokens=False) == [6]
    assert load_tokenizer(str(tiny_tokenizer_dir), "served-name") is not None
    with pytest.raises(BenchmarkError, match="not a local directory"):
        load_tokenizer("org/some-hub-model", None)
    with pytest.raises(BenchmarkError, match="needs a tokenizer"):
        sample_requests(DatasetConfig(num_prompts=1), None)
