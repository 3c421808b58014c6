"""`python -m common.eval.agreement`: prompts, divergence positions, fp16 against itself, bad input."""
from __future__ import annotations

import json

import pytest

from common.eval.agreement import (agreement, first_divergence, greedy_outputs, load_prompts, long_prompts, main,
                                   read_paragraphs, spread_lengths)
from common.kv.config import KVConfig


def run(capsys, *args: str) -> tuple[int, dict | None, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, json.loads(captured.out.strip().splitlines()[-1]) if code == 0 else None, captured.err


@pytest.mark.parametrize("a, b, expected", [([1, 2, 3], [1, 2, 3], 3), ([1, 2, 3], [1, 5, 3], 1),
                                            ([4], [5], 0), ([1, 2, 3], [1, 2], 2)])
def test_first_divergence(a, b, expected) -> None:
    assert first_divergence(a, b) == expected


def test_spread_lengths_cover_a_partition() -> None:
    prompts = spread_lengths([list(range(200))] * 32, partition=64)
    cuts = sorted(200 - len(p) for p in prompts)
    assert len(set(cuts)) == 32 and cuts[0] == 0 and cuts[-1] == 63
    assert all(p == list(range(len(p))) for p in prompts)


def test_fp16_agrees_with_itself(capsys, stories260k, tinystories_text) -> None:
    code, result, _ = run(capsys, "--model", str(stories260k), "--text", str(tinystories_text), "--kv-mode", "fp16",
                          "--prompts", "3", "--max-tokens", "9")
    assert code == 0
    assert result["prompts"] == 3 and result["max_tokens"] == 9
    assert result["first_divergence"] == [9, 9, 9]
    assert result["mean_first_divergence"] == 9 and result["identical_fraction"] == 1.0


def test_long_prompts_start_at_paragraphs(stories_model, tinystories_text) -> None:
    prompts = long_prompts(stories_model, str(tinystories_text), count=3, prompt_tokens=37)
    assert [len(p) for p in prompts] == [37, 37, 37]
    tokenizer = stories_model.tokenizer
    for prompt, paragraph in zip(prompts, read_paragraphs(str(tinystories_text), 3)):
        assert prompt[0] == stories_model.config.bos_token_id
        text = tokenizer.decode(prompt, skip_special_tokens=True).strip()
        assert paragraph.startswith(text) or text.startswith(paragraph[:40])


def test_compressed_modes_are_exact_while_everything_is_16_bit(stories_model, tinystories_text) -> None:
    # first-sentence prompts (< 40 tokens) + 8 tokens stay within 4 sinks + one open partition of 128
    prompts = load_prompts(stories_model, str(tinystories_text), 3, prompt_tokens=None)
    reference = greedy_outputs(stories_model, KVConfig(mode="fp16"), prompts, 8)
    for mode in ("dequant", "hack"):
        result = agreement(stories_model, KVConfig(mode=mode, partition=128), prompts, 8, reference)
        assert result["first_divergence"] == [8, 8, 8] and result["identical_fraction"] == 1.0
        assert result["prompt_tokens"] == sum(len(p) for p in prompts) / 3 < 40


def test_teacher_forced_divergence_is_where_free_running_greedy_departs(stories_model, tinystories_text) -> None:
    prompts = load_prompts(stories_model, str(tinystories_text), 4, prompt_tokens=70)
    reference = greedy_outputs(stories_model, KVConfig(mode="fp16"), prompts, 12)
    lossy = KVConfig(mode="hack", partition=32, num_sinks=0, ranges="minmax", rotate=False, window=0)
    free_running = greedy_outputs(stories_model, lossy, prompts, 12)
    result = agreement(stories_model, lossy, prompts, 12, reference)
    assert result["first_divergence"] == [first_divergence(r, c) for r, c in zip(reference, free_running)]
    assert result["first_divergence"] != [12] * 4  # the check means something: some output departs
    diverged = sum(p < 12 for p in result["first_divergence"])
    assert len(result["divergence_margins"]) == diverged and all(m >= 0 for m in result["divergence_margins"])
    assert sum(result["first_divergence"]) / 48 <= result["token_agreement"] < 1


@pytest.mark.parametrize("args, message", [
    (["--text", "/nonexistent/text.txt"], "No such file"),
    (["--prompts", "0"], "--prompts must be >= 1"),
    (["--max-tokens", "-3"], "--max-tokens must be >= 1"),
    (["--prompt-tokens", "0"], "--prompt-tokens must be >= 1"),
    (["--prompt-tokens", "40", "--spread-lengths"], "--spread-lengths needs --prompt-tokens longer"),
])
def test_bad_input_exits_2(capsys, stories260k, tinystories_text, args, message) -> None:
    text = [] if "--text" in args else ["--text", str(tinystories_text)]
    code, _, err = run(capsys, "--model", str(stories260k), *text, *args)
    assert code == 2 and err.startswith("error: ") and message in err


def test_text_without_paragraphs_exits_2(capsys, stories260k, tmp_path) -> None:
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n\n")
    code, _, err = run(capsys, "--model", str(stories260k), "--text", str(blank))
    assert code == 2 and "no prompts found" in err
