"""Generate text in-process: `python -m common.generate --model DIR --prompt TEXT --max-tokens N`.

Prints only the completion on stdout (or one JSON object with --json). Errors go to stderr
with exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys

from common.default_model import model_from_env
from common.engine import Engine
from common.kv.options import add_kv_arguments, kv_config_from_args
from common.kv.factory import make_kv_backend
from common.loader import DTYPES, load_model
from common.sampling import SamplingParams


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m common.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint directory, .gguf file, hub id or embedded model name "
                        "(default: $HACK_MODEL, else smollm2-135m-instruct)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")
    add_kv_arguments(parser, default_mode="fp16")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto")
    parser.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    if not args.prompt:
        raise ValueError("the prompt is empty: pass some text with --prompt")
    loaded = load_model(model_from_env(args.model), dtype=args.dtype, device=args.device)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos,
    )
    kv_config = kv_config_from_args(args)
    prompt_ids = list(loaded.tokenizer.encode(args.prompt))
    device = next(loaded.model.parameters()).device
    backend = make_kv_backend(kv_config, loaded.config, device=device, dtype=loaded.model.lm_head.weight.dtype,
                              max_tokens=len(prompt_ids) + args.max_tokens, max_seqs=1)
    completion = Engine(loaded, backend).generate([prompt_ids], [params])[0]
    return {
        "text": completion.text,
        "token_ids": completion.token_ids,
        "prompt_tokens": len(completion.prompt_ids),
        "finish_reason": completion.finish_reason,
        "kv_mode": args.kv_mode,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else result["text"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
