"""A downstream check next to perplexity: multiple-choice next-word questions over a text, per KV mode.

    python -m common.eval.cloze --model DIR --text FILE --kv-mode hack [--questions 300 --seed 0 \
        --max-tokens 2048 --context 512 --min-position 128]

Questions are generated from the text with a fixed seed: at a position whose next token is a whole word (a
token that starts a word and has at least 3 letters), the model must pick that word among 4 choices, the
3 others drawn from the other whole-word tokens of the same text. Only positions at least --min-position
tokens into their window are asked, so the answer depends on a history that the compressed modes hold in
codes. The text is read exactly as `common.eval.perplexity` reads it (same windows, same teacher-forced
decode path), and one pass gives both: the model's choice is the highest of the 4 logits (accuracy), and
exact match asks whether the word is the model's top-1 token over the whole vocabulary. The last stdout line
is JSON with accuracy, exact_match, questions, the pass's perplexity and the KV bytes; bad input exits with
status 2 and a one-line error.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
from typing import NamedTuple

import torch

from common.default_model import model_from_env
from common.eval.cli import print_json_result
from common.eval.perplexity import kv_bytes, read_text_prefix, text_windows, window_nll
from common.kv.config import KVConfig
from common.kv.options import add_kv_arguments, kv_config_from_args
from common.loader import LoadedModel, load_model

CHOICES = 4
WORD_START = ("Ġ", "▁", " ")


class Question(NamedTuple):
    window: int
    position: int  # the logits at this position predict windows[window][position + 1]
    choices: tuple[int, ...]  # token ids, the answer first


def word_tokens(tokenizer, ids: set[int]) -> set[int]:
    """The ids among `ids` that are whole words: a token that starts a word (leading space) and has >= 3 letters."""
    words = set()
    for token in ids:
        piece = tokenizer.convert_ids_to_tokens(token)  # byte-level BPE marks a word start with Ġ, SentencePiece ▁
        text = tokenizer.decode([token]).strip()
        if piece[:1] in WORD_START and len(text) >= 3 and text.isalpha():
            words.add(token)
    return words


def make_questions(tokenizer, windows: list[list[int]], count: int, seed: int, min_position: int) -> list[Question]:
    """Up to `count` questions at whole-word positions >= min_position, drawn with random.Random(seed)."""
    words = word_tokens(tokenizer, {t for w in windows for t in w})
    slots = [(w, p) for w, window in enumerate(windows) for p in range(min_position, len(window) - 1)
             if window[p + 1] in words]
    if len(words) <= CHOICES:
        return []
    rng = random.Random(seed)
    pool = sorted(words)
    questions = []
    for w, p in sorted(rng.sample(slots, min(count, len(slots)))):
        answer = windows[w][p + 1]
        distractors = rng.sample([t for t in pool if t != answer], CHOICES - 1)
        questions.append(Question(w, p, (answer, *distractors)))
    return questions


def evaluate(loaded: LoadedModel, kv_config: KVConfig, text: str, context: int, max_tokens: int, count: int,
             seed: int = 0, min_position: int = 128) -> dict:
    if not min_position + 2 <= context <= loaded.config.context_window:
        raise ValueError(f"--context must be in [--min-position + 2, {loaded.config.context_window}], got {context}")
    windows = text_windows(loaded.tokenizer, text, context, max_tokens)
    questions = make_questions(loaded.tokenizer, windows, count, seed, min_position)
    if not questions:
        raise ValueError("the text gives no question: it is too short for --min-position or has too few words")
    asked = {(q.window, q.position): q for q in questions}
    correct, exact = 0, 0

    def probe(live: list[int], position: int, logits: torch.Tensor) -> None:
        nonlocal correct, exact
        for row, window in enumerate(live):
            question = asked.get((window, position))
            if question is not None:
                correct += int(int(logits[row, list(question.choices)].argmax()) == 0)
                exact += int(int(logits[row].argmax()) == question.choices[0])

    nll, tokens = window_nll(loaded, kv_config, windows, probe)
    return {
        "accuracy": correct / len(questions),
        "exact_match": exact / len(questions),
        "questions": len(questions),
        "choices": CHOICES,
        "perplexity": math.exp(nll / tokens),
        "tokens": tokens,
        "context": context,
        **kv_bytes(loaded, kv_config, context),
        "kv_config": kv_config.__dict__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.eval.cloze", description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--text", required=True, help="UTF-8 text file")
    parser.add_argument("--questions", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0, help="seeds which positions are asked and the distractors")
    parser.add_argument("--max-tokens", type=int, default=2048, help="tokens of text read")
    parser.add_argument("--context", type=int, default=512, help="window length in tokens")
    parser.add_argument("--min-position", type=int, default=128, help="earliest asked position in a window")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device")
    add_kv_arguments(parser)
    args = parser.parse_args(argv)

    def run() -> dict:
        kv_config = kv_config_from_args(args)
        for name in ("questions", "max_tokens"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if args.min_position < 0:
            raise ValueError(f"--min-position must be >= 0, got {args.min_position}")
        text = read_text_prefix(args.text, args.max_tokens)
        loaded = load_model(model_from_env(args.model), dtype=args.dtype, device=args.device)
        result = evaluate(loaded, kv_config, text, args.context, args.max_tokens, args.questions, args.seed,
                          args.min_position)
        return result

    return print_json_result(run)


if __name__ == "__main__":
    sys.exit(main())
