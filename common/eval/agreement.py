"""Greedy agreement of a KV mode with fp16: where does its greedy output first diverge?

    python -m common.eval.agreement --model DIR --text FILE --kv-mode hack [--prompts 32 --max-tokens 64]

Prompts are the first sentence of each paragraph of the text file. For each prompt both
configurations generate --max-tokens greedy tokens (EOS ignored); the first position where
the token ids differ is the divergence (= max-tokens when identical). The last stdout line is
JSON with the mean divergence position and the fraction of identical outputs.
"""
from __future__ import annotations

import argparse
import json
import sys

from common.default_model import model_from_env
from common.engine import Engine
from common.eval.options import add_kv_arguments, kv_config_from_args
from common.kv.config import KVConfig
from common.kv.factory import make_kv_backend
from common.loader import LoadedModel, load_model
from common.sampling import SamplingParams


def paragraph_prompts(path: str, count: int) -> list[str]:
    """First sentence of each of the first `count` non-empty paragraphs."""
    prompts = []
    with open(path, encoding="utf-8") as handle:
        for paragraph in handle.read(1 << 22).split("\n\n"):
            sentence = paragraph.strip().split(". ")[0].strip()
            if sentence:
                prompts.append(sentence)
            if len(prompts) == count:
                break
    return prompts


def greedy_outputs(loaded: LoadedModel, kv_config: KVConfig, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    device = next(loaded.model.parameters()).device
    backend = make_kv_backend(kv_config, loaded.config, device=device, dtype=loaded.model.lm_head.weight.dtype,
                              max_seqs=len(prompts), max_tokens=sum(len(p) + max_tokens for p in prompts))
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return [c.token_ids for c in Engine(loaded, backend).generate(prompts, [params] * len(prompts))]


def first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def agreement(loaded: LoadedModel, kv_config: KVConfig, prompts: list[str], max_tokens: int) -> dict:
    encoded = [list(loaded.tokenizer.encode(p)) for p in prompts]
    reference = greedy_outputs(loaded, KVConfig(mode="fp16"), encoded, max_tokens)
    candidate = greedy_outputs(loaded, kv_config, encoded, max_tokens)
    positions = [first_divergence(r, c) for r, c in zip(reference, candidate)]
    return {
        "prompts": len(prompts),
        "max_tokens": max_tokens,
        "mean_first_divergence": sum(positions) / len(positions),
        "identical_fraction": sum(p == max_tokens for p in positions) / len(positions),
        "first_divergence": positions,
        "kv_config": kv_config.__dict__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.eval.agreement", description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--text", required=True)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device")
    add_kv_arguments(parser)
    args = parser.parse_args(argv)
    try:
        kv_config = kv_config_from_args(args)
        loaded = load_model(model_from_env(args.model), dtype=args.dtype, device=args.device)
        prompts = paragraph_prompts(args.text, args.prompts)
        if not prompts:
            raise ValueError(f"no prompts found in {args.text}")
        result = agreement(loaded, kv_config, prompts, args.max_tokens)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
