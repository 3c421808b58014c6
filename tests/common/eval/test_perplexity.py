"""`python -m common.eval.perplexity`: windows, JSON fields and their values, bad input."""
from __future__ import annotations

import json

import pytest

from common.eval.perplexity import evaluate, main, read_text_prefix, text_windows
from common.kv.config import PAPER_PARTITION, PAPER_SETTING, KVConfig
from common.kv.format import KVLayout

STORIES_BYTES_PER_TOKEN_FP16 = 2 * 4 * 8 * 2 * 5  # K and V, 4 KV heads, head_dim 8, fp16, 5 layers


def run(capsys, *args: str) -> tuple[int, dict | None, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return code, json.loads(lines[-1]) if code == 0 else None, captured.err


@pytest.fixture(scope="module")
def text(tinystories_text) -> str:
    return read_text_prefix(str(tinystories_text), 300)


def test_windows_cover_exactly_max_tokens(stories_model, text) -> None:
    tokenizer, bos = stories_model.tokenizer, stories_model.config.bos_token_id
    windows = text_windows(tokenizer, text, context=17, max_tokens=40)  # stories260K's tokenizer adds a BOS
    assert [len(w) for w in windows] == [17, 17, 9]  # 16 + 16 + 8 predicted tokens
    assert all(w[0] == bos for w in windows)
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert [t for w in windows for t in w[1:]] == body[:40]


def test_windows_stop_at_the_end_of_a_short_text(stories_model) -> None:
    windows = text_windows(stories_model.tokenizer, "Tom had a red ball.", 17, 1000)
    assert len(windows) == 1 and 3 < len(windows[0]) < 17


class NoBosTokenizer:
    """Encodes characters as ids and adds no special token (as SmolLM2's tokenizer)."""

    def __call__(self, text: str, add_special_tokens: bool = True, verbose: bool = True) -> dict:
        return {"input_ids": [ord(c) for c in text]}


class BosEosTokenizer(NoBosTokenizer):
    def __call__(self, text: str, add_special_tokens: bool = True, verbose: bool = True) -> dict:
        ids = super().__call__(text)["input_ids"]
        return {"input_ids": [1, *ids, 2] if add_special_tokens else ids}


def test_windows_add_no_bos_the_tokenizer_does_not_add() -> None:
    windows = text_windows(NoBosTokenizer(), "abcdefghij", context=4, max_tokens=100)
    assert windows == [[97, 98, 99, 100], [101, 102, 103, 104], [105, 106]]


def test_windows_start_with_the_tokenizers_leading_tokens_only() -> None:
    windows = text_windows(BosEosTokenizer(), "abcdefg", context=4, max_tokens=100)
    assert windows == [[1, 97, 98, 99], [1, 100, 101, 102], [1, 103]]  # BOS yes, EOS no


def test_fp16_json_fields(capsys, stories260k, tinystories_text) -> None:
    code, result, _ = run(capsys, "--model", str(stories260k), "--text", str(tinystories_text), "--kv-mode", "fp16",
                          "--max-tokens", "255", "--context", "256")
    assert code == 0
    assert 3.5 < result["perplexity"] < 5.5  # stories260K on TinyStories val at context 256: ~4-5
    assert (result["tokens"], result["windows"], result["context"]) == (255, 1, 256)
    assert result["kv_bytes"] == result["fp16_kv_bytes"] == 256 * STORIES_BYTES_PER_TOKEN_FP16
    assert result["wire_bytes"] == result["fp16_wire_bytes"] == KVLayout(KVConfig(mode="fp16"), 4, 8).wire_bytes(256, 5)
    assert result["kv_config"]["mode"] == "fp16" and result["seconds"] >= 0


@pytest.fixture(scope="module")
def fp16_result(stories_model, text) -> dict:
    return evaluate(stories_model, KVConfig(mode="fp16"), text, context=97, max_tokens=150)


@pytest.mark.parametrize("config", [KVConfig(mode="dequant", bits=2, partition=32, key_axis="channel", window=0),
                                    KVConfig(mode="hack", bits=2, partition=32, key_axis="channel", window=0),
                                    KVConfig(mode="hack", bits=4, partition=32, key_axis="token", num_sinks=1,
                                             window=0)])
def test_compressed_modes_are_no_better_than_fp16(stories_model, text, fp16_result, config) -> None:
    result = evaluate(stories_model, config, text, context=97, max_tokens=150)  # windows of 97 and 55 tokens
    assert result["tokens"] == fp16_result["tokens"] == 150
    assert result["perplexity"] >= fp16_result["perplexity"] - 0.02
    assert result["perplexity"] < 3 * fp16_result["perplexity"]
    layout = KVLayout(config, num_kv_heads=4, head_dim=8)
    assert result["kv_bytes"] == layout.memory_bytes(97, 5)
    assert result["wire_bytes"] == layout.wire_bytes(97, 5)
    assert result["fp16_kv_bytes"] == KVLayout(KVConfig(mode="fp16"), 4, 8).memory_bytes(97, 5)
    assert result["fp16_wire_bytes"] == KVLayout(KVConfig(mode="fp16"), 4, 8).wire_bytes(97, 5)
    assert result["wire_bytes"] < result["fp16_wire_bytes"]


def test_two_bit_memory_matches_a_hand_count(stories_model, text) -> None:
    paper = KVConfig(mode="hack", partition=PAPER_PARTITION, **PAPER_SETTING)
    result = evaluate(stories_model, paper, text, context=256, max_tokens=20)
    # 2 bits, Π=64, channel keys, 4 sinks: 252 compressed tokens -> 4 pages of 64 tokens x 4 heads, each
    # K and V codes 512 B, K and V scale+min 128 B, K sums (int16 per token) 512 B, V sums 64 B = 1856 B;
    # one state slot: 4 sink + 64 tail tokens of fp16 K and V = 68 * 2 * 4 * 8 * 2 B = 8704 B; 5 layers.
    assert result["kv_bytes"] == 5 * (4 * 1856 + 8704)


@pytest.mark.parametrize("args, message", [
    (["--text", "/nonexistent/text.txt"], "No such file"),
    (["--context", "1000"], "--context must be in [2, 512]"),
    (["--context", "1"], "--context must be in [2, 512]"),
    (["--max-tokens", "0"], "--max-tokens must be >= 1"),
])
def test_bad_input_exits_2(capsys, stories260k, tinystories_text, args, message) -> None:
    base = {"--model": str(stories260k), "--text": str(tinystories_text)}
    base.update(dict(zip(args[::2], args[1::2])))
    code, _, err = run(capsys, *[part for item in base.items() for part in item])
    assert code == 2 and err.startswith("error: ") and message in err


def test_empty_text_exits_2(capsys, stories260k, tmp_path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = run(capsys, "--model", str(stories260k), "--text", str(empty))
    assert code == 2 and "too short" in err
