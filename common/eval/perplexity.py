"""Perplexity of a model over a text file with the KV cache in a given mode.

    python -m common.eval.perplexity --model DIR --text FILE --kv-mode {fp16,dequant,hack} \
        [--bits B --partition P --max-tokens N --context C]

Teacher forcing through the decode path: the text is cut into windows of --context tokens
(each starting with BOS); every token is fed as a decode step, so it attends to the cache
exactly as it would in serving (compressed history, 16-bit open block, sinks). Windows run
as one batch. The last stdout line is JSON with perplexity, tokens, kv_bytes, fp16_kv_bytes.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

from common.default_model import model_from_env
from common.eval.options import add_kv_arguments, kv_config_from_args
from common.kv.config import KVConfig
from common.kv.factory import make_kv_backend
from common.kv.format import KVLayout
from common.kv.interface import ForwardBatch
from common.loader import LoadedModel, load_model


def text_windows(tokenizer, text: str, context: int, max_tokens: int, bos: int | None) -> list[list[int]]:
    """Consecutive windows of `context` tokens (BOS first when the model has one) covering
    at most max_tokens predicted tokens."""
    body = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    step = context - 1 if bos is not None else context
    windows = []
    for start in range(0, len(body) - 1, step):
        chunk = body[start:start + step]
        window = ([bos] if bos is not None else []) + chunk
        if len(window) < 2:
            break
        windows.append(window)
        if sum(len(w) - 1 for w in windows) >= max_tokens:
            break
    return windows


def read_text_prefix(path: str, max_tokens: int) -> str:
    """Enough of the file for max_tokens (generously assuming >= 1 character per token)."""
    with open(path, encoding="utf-8") as handle:
        return handle.read(max(64 * max_tokens, 4096))


def window_nll(loaded: LoadedModel, kv_config: KVConfig, windows: list[list[int]]) -> tuple[float, int]:
    """Sum of negative log-likelihoods of every token after the first, and their count."""
    device = next(loaded.model.parameters()).device
    backend = make_kv_backend(kv_config, loaded.config, device=device, dtype=loaded.model.lm_head.weight.dtype,
                              max_seqs=len(windows), max_tokens=sum(len(w) for w in windows))
    nll, count = 0.0, 0
    longest = max(len(w) for w in windows)
    for position in range(longest - 1):
        live = [i for i, w in enumerate(windows) if position + 1 < len(w)]
        batch = ForwardBatch.build(live, [position] * len(live), [1] * len(live), device)
        backend.reserve(batch)
        tokens = torch.tensor([windows[i][position] for i in live], device=device)
        logits = loaded.model(tokens, batch, backend)
        targets = torch.tensor([windows[i][position + 1] for i in live], device=device)
        nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        count += len(live)
        for i, w in enumerate(windows):
            if position + 2 == len(w):
                backend.free(i)
    return nll, count


def evaluate(loaded: LoadedModel, kv_config: KVConfig, text: str, context: int, max_tokens: int) -> dict:
    bos = loaded.config.bos_token_id
    windows = text_windows(loaded.tokenizer, text, context, max_tokens, bos)
    if not windows:
        raise ValueError("the text is too short: it gives no window of at least 2 tokens")
    start = time.perf_counter()
    nll, count = window_nll(loaded, kv_config, windows)
    layout = KVLayout(kv_config, loaded.config.num_kv_heads, loaded.config.head_dim)
    layers = loaded.config.num_layers
    return {
        "perplexity": math.exp(nll / count),
        "tokens": count,
        "windows": len(windows),
        "context": context,
        "kv_bytes": layout.memory_bytes(context, layers),
        "kv_wire_bytes": layout.wire_bytes(context, layers),
        "fp16_kv_bytes": layout.fp16_bytes(context, layers),
        "seconds": round(time.perf_counter() - start, 2),
        "kv_config": kv_config.__dict__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.eval.perplexity", description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--text", required=True, help="UTF-8 text file")
    parser.add_argument("--max-tokens", type=int, default=4096, help="tokens to score")
    parser.add_argument("--context", type=int, default=256, help="window length in tokens")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device")
    add_kv_arguments(parser)
    args = parser.parse_args(argv)
    try:
        kv_config = kv_config_from_args(args)
        loaded = load_model(model_from_env(args.model), dtype=args.dtype, device=args.device)
        if not 2 <= args.context <= loaded.config.context_window:
            raise ValueError(f"--context must be in [2, {loaded.config.context_window}], got {args.context}")
        result = evaluate(loaded, kv_config, read_text_prefix(args.text, args.max_tokens), args.context,
                          args.max_tokens)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
