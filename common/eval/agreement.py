"""Greedy agreement of a KV mode with fp16: where does its greedy output first diverge?

    python -m common.eval.agreement --model DIR --text FILE --kv-mode hack \
        [--prompts 32 --max-tokens 64 --prompt-tokens N [--spread-lengths]]

Prompts come from the paragraphs of the text file: blocks separated by blank lines, or, in a file
without blank lines (one paragraph per line, e.g. WikiText), its non-empty lines. By default a
prompt is the first sentence of each paragraph; with --prompt-tokens N, the first N tokens of the text from each paragraph's start
on (running into the next paragraphs), so that the prompt's KV alone fills compressed
partitions. --spread-lengths then cuts prompt i by (29 i mod Π) tokens: how full the 16-bit
open partition is when generation starts decides when the first flush to codes happens, and
equal prompt lengths would make that moment the same for every prompt.

For each prompt fp16 generates --max-tokens greedy tokens (EOS ignored); the configuration then
reads that same output teacher-forced (prefill of the prompt, one decode step per token) and picks
its own greedy token at each position. Its first pick that differs is the divergence (= max-tokens
when none does): up to there its free-running output would be fp16's, so this is where its greedy
output first departs. The picks after it give a steadier measure, the fraction of positions where
the configuration's choice equals fp16's on fp16's history (`token_agreement`), and fp16's own
top-1 minus top-2 logit gap at each divergence (`divergence_margins`) tells near-ties apart.
The last stdout line is JSON with the number of prompts used (fewer than --prompts when the text
runs out; stderr says so), the mean divergence position and the fraction of identical outputs.
Bad input exits with status 2 and a one-line error.
"""
from __future__ import annotations

import argparse
import bisect
import re
import sys

import torch

from common.default_model import model_from_env
from common.engine import Engine
from common.eval.backend import backend_for_sequences
from common.eval.cli import print_json_result
from common.kv.options import add_kv_arguments, kv_config_from_args
from common.kv.config import KVConfig
from common.kv.interface import ForwardBatch
from common.loader import LoadedModel, load_model
from common.sampling import SamplingParams

_TEXT_LIMIT = 1 << 22  # characters read from the text file


def read_paragraphs(path: str, count: int | None = None) -> list[str]:
    """The first `count` (default: all) non-empty paragraphs of the file: blank-line separated blocks, or the
    non-empty lines of a file that has no blank line (one paragraph per line)."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read(_TEXT_LIMIT).replace("\r\n", "\n")
    separator = "\n\n" if re.search(r"\n[ \t]*\n", text.strip()) else "\n"
    paragraphs = [p.strip() for p in re.split(r"\n[ \t]*\n" if separator == "\n\n" else "\n", text)]
    return [p for p in paragraphs if p][:count]


def paragraph_prompts(path: str, count: int) -> list[str]:
    """First sentence of each of the first `count` non-empty paragraphs."""
    return [p.split(". ")[0].strip() for p in read_paragraphs(path, count)]


def long_prompts(loaded: LoadedModel, path: str, count: int, prompt_tokens: int) -> list[list[int]]:
    """Up to `count` prompts of exactly prompt_tokens ids, each the text from a paragraph's start on, encoded
    like a short prompt (tokenizer.encode, so with BOS when the model uses one)."""
    paragraphs = read_paragraphs(path)
    text = "\n\n".join(paragraphs)
    offsets = loaded.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                               verbose=False)["offset_mapping"]
    token_ends = [end for _, end in offsets]
    prompts, start = [], 0
    for paragraph in paragraphs:
        # 8 spare tokens: encode may add BOS and merge differently at the cut
        end = bisect.bisect_right(token_ends, start) + prompt_tokens + 8
        if len(prompts) == count or end > len(token_ends):
            break
        ids = list(loaded.tokenizer.encode(text[start:token_ends[end - 1]]))[:prompt_tokens]
        if len(ids) == prompt_tokens:
            prompts.append(ids)
        start += len(paragraph) + 2
    return prompts


def spread_lengths(prompts: list[list[int]], partition: int) -> list[list[int]]:
    """Cut prompt i by (29 i mod Π) tokens; 29 is odd, so Π consecutive prompts get Π distinct cuts."""
    return [prompt[:len(prompt) - (29 * i) % partition] for i, prompt in enumerate(prompts)]


def greedy_outputs(loaded: LoadedModel, kv_config: KVConfig, prompts: list[list[int]],
                   max_tokens: int) -> list[list[int]]:
    backend = backend_for_sequences(loaded, kv_config, [len(p) + max_tokens for p in prompts])
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return [c.token_ids for c in Engine(loaded, backend).generate(prompts, [params] * len(prompts))]


def forced_choices(loaded: LoadedModel, kv_config: KVConfig, prompts: list[list[int]],
                   outputs: list[list[int]]) -> tuple[list[list[int]], list[list[float]]]:
    """Teacher-forced greedy picks: prefill every prompt, then feed outputs[i] one decode step per token (as
    Engine.generate would, batch for batch). Per prompt, the argmax after the prompt and after each fed token
    (len(outputs[i]) picks), and the top-1 minus top-2 logit gap of each pick."""
    device = next(loaded.model.parameters()).device
    backend = backend_for_sequences(loaded, kv_config, [len(p) + len(o) for p, o in zip(prompts, outputs)])
    ids = list(range(len(prompts)))
    picks: list[list[int]] = [[] for _ in ids]
    gaps: list[list[float]] = [[] for _ in ids]
    batch = ForwardBatch.build(ids, [0] * len(ids), [len(p) for p in prompts], device)
    tokens = [t for p in prompts for t in p]
    try:
        for step in range(max(len(o) for o in outputs)):
            backend.reserve(batch)
            with torch.no_grad():
                logits = loaded.model(torch.tensor(tokens, device=device), batch, backend)
            top = logits.float().topk(2, dim=-1)
            for row, i in enumerate(batch.seq_ids):
                picks[i].append(int(top.indices[row, 0]))
                gaps[i].append(float(top.values[row, 0] - top.values[row, 1]))
            live = [i for i in batch.seq_ids if step + 1 < len(outputs[i])]
            if not live:
                break
            batch = ForwardBatch.build(live, [len(prompts[i]) + step for i in live], [1] * len(live), device)
            tokens = [outputs[i][step] for i in live]
    finally:
        for i in ids:
            backend.free(i)
    return picks, gaps


def first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def agreement(loaded: LoadedModel, kv_config: KVConfig, prompts: list[list[int]], max_tokens: int,
              reference: list[list[int]] | None = None, reference_gaps: list[list[float]] | None = None) -> dict:
    """Compare kv_config's greedy choices with `reference`, fp16's greedy outputs (generated when not given), on
    fp16's history; `reference_gaps`, fp16's top-1 minus top-2 logit gaps along them (computed when not given)."""
    if reference is None:
        reference = greedy_outputs(loaded, KVConfig(mode="fp16"), prompts, max_tokens)
    if reference_gaps is None:
        reference_gaps = forced_choices(loaded, KVConfig(mode="fp16"), prompts, reference)[1]
    picks, _ = forced_choices(loaded, kv_config, prompts, reference)
    positions = [first_divergence(r, c) for r, c in zip(reference, picks)]
    matches = [sum(x == y for x, y in zip(r, c)) for r, c in zip(reference, picks)]
    margins = [gaps[p] for gaps, p in zip(reference_gaps, positions) if p < len(gaps)]
    all_gaps = sorted(g for gaps in reference_gaps for g in gaps)
    return {
        "prompts": len(prompts),
        "prompt_tokens": sum(len(p) for p in prompts) / len(prompts),
        "max_tokens": max_tokens,
        "mean_first_divergence": sum(positions) / len(positions),
        "identical_fraction": sum(p == max_tokens for p in positions) / len(positions),
        "token_agreement": sum(matches) / sum(len(r) for r in reference),
        "first_divergence": positions,
        "divergence_margins": [round(m, 4) for m in margins],
        "median_divergence_margin": _median(margins),
        "median_margin": _median(all_gaps),
        "kv_config": kv_config.__dict__,
    }


def _median(values: list[float]) -> float | None:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else None


def load_prompts(loaded: LoadedModel, path: str, count: int, prompt_tokens: int | None) -> list[list[int]]:
    if prompt_tokens is None:
        prompts = [list(loaded.tokenizer.encode(p)) for p in paragraph_prompts(path, count)]
    else:
        prompts = long_prompts(loaded, path, count, prompt_tokens)
    if not prompts:
        raise ValueError(f"no prompts found in {path}")
    return prompts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.eval.agreement", description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--text", required=True)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, help="prompt length in tokens (default: first sentence)")
    parser.add_argument("--spread-lengths", action="store_true", help="cut prompt i by 29 i mod Π tokens")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device")
    add_kv_arguments(parser)
    args = parser.parse_args(argv)

    def run() -> dict:
        kv_config = kv_config_from_args(args)
        for name in ("prompts", "max_tokens", "prompt_tokens"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        read_paragraphs(args.text, 1)  # a bad path fails before the model loads
        loaded = load_model(model_from_env(args.model), dtype=args.dtype, device=args.device)
        prompts = load_prompts(loaded, args.text, args.prompts, args.prompt_tokens)
        if args.spread_lengths:
            if args.prompt_tokens is None or args.prompt_tokens <= kv_config.partition:
                raise ValueError("--spread-lengths needs --prompt-tokens longer than the partition")
            prompts = spread_lengths(prompts, kv_config.partition)
        if len(prompts) < args.prompts:
            print(f"note: the text gives {len(prompts)} prompts of the {args.prompts} asked for", file=sys.stderr)
        result = agreement(loaded, kv_config, prompts, args.max_tokens)
        result["prompts_requested"] = args.prompts
        return result

    return print_json_result(run)


if __name__ == "__main__":
    sys.exit(main())
