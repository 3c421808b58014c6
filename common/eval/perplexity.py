"""Perplexity of a model over a text file with the KV cache in a given mode.

    python -m common.eval.perplexity --model DIR --text FILE --kv-mode {fp16,dequant,hack} \
        [--bits B --partition P --max-tokens N --context C]

Teacher forcing through the decode path: the text is tokenized exactly as the tokenizer encodes
it and cut into windows of --context tokens, each starting with the special tokens the tokenizer
itself puts in front of a text (a BOS for Llama-2-style tokenizers, nothing for SmolLM2's); every
token is fed as a decode step, so it attends to the cache exactly as it would in serving
(compressed history, 16-bit sinks, recent window and open partition). Windows run as one batch.
The last stdout line is JSON with the perplexity, the tokens scored, and the bytes of one full
window's KV over all layers: kv_bytes / fp16_kv_bytes (pool memory, this mode and fp16 mode) and
wire_bytes / fp16_wire_bytes (serialized for transfer, wire.py). Bad input (missing or too short
text, a context outside the model's window) exits with status 2 and a one-line error.

On a CPU shared with other work, OMP_NUM_THREADS=1 is much faster for small models.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Callable

import torch

from common.default_model import model_from_env
from common.eval.backend import backend_for_sequences
from common.eval.cli import print_json_result
from common.kv.options import add_kv_arguments, kv_config_from_args
from common.kv.config import KVConfig
from common.kv.format import KVLayout
from common.kv.interface import ForwardBatch
from common.loader import LoadedModel, load_model


def leading_special_tokens(tokenizer, text: str) -> list[int]:
    """The ids the tokenizer puts in front of `text` when it encodes it with its special tokens (e.g. [BOS])."""
    body = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    full = list(tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])
    starts = [i for i in range(len(full) - len(body) + 1) if full[i:i + len(body)] == body]
    return full[:starts[0]] if starts else []


def text_windows(tokenizer, text: str, context: int, max_tokens: int) -> list[list[int]]:
    """Consecutive windows of at most `context` tokens whose predicted tokens (all but each window's first)
    number min(max_tokens, what the text has). Each window starts with the special tokens the tokenizer puts in
    front of a text (none for SmolLM2, BOS for Llama-2-style tokenizers): a window is scored as the tokenizer
    would encode it on its own."""
    body = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    prefix = leading_special_tokens(tokenizer, text[:256])
    step = context - len(prefix)
    if step < 1:
        raise ValueError(f"--context {context} leaves no room after the tokenizer's {len(prefix)} leading tokens")
    windows: list[list[int]] = []
    start, remaining = 0, max_tokens
    while remaining > 0 and start < len(body):
        take = min(step, remaining + 1 - len(prefix))  # a window of w tokens predicts w - 1
        window = prefix + body[start:start + take]
        if len(window) < 2:
            break
        windows.append(window)
        remaining -= len(window) - 1
        start += take
    return windows


def read_text_prefix(path: str, max_tokens: int) -> str:
    """Enough of the file for max_tokens: 64 characters per token, far more than any tokenizer needs."""
    with open(path, encoding="utf-8") as handle:
        return handle.read(max(64 * max_tokens, 4096))


LogitsProbe = Callable[[list[int], int, torch.Tensor], None]


def window_nll(loaded: LoadedModel, kv_config: KVConfig, windows: list[list[int]],
               probe: LogitsProbe | None = None) -> tuple[float, int]:
    """Sum of negative log-likelihoods of every token after the first, and their count. `probe(live, position,
    logits)` sees each step's logits [len(live), vocab] (row r predicts windows[live[r]][position + 1])."""
    device = next(loaded.model.parameters()).device
    backend = backend_for_sequences(loaded, kv_config, [len(w) for w in windows])
    nll, count = 0.0, 0
    for position in range(max(len(w) for w in windows) - 1):
        live = [i for i, w in enumerate(windows) if position + 1 < len(w)]
        batch = ForwardBatch.build(live, [position] * len(live), [1] * len(live), device)
        backend.reserve(batch)
        tokens = torch.tensor([windows[i][position] for i in live], device=device)
        with torch.no_grad():
            logits = loaded.model(tokens, batch, backend)
        targets = torch.tensor([windows[i][position + 1] for i in live], device=device)
        nll += float(torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum"))
        if probe is not None:
            probe(live, position, logits)
        count += len(live)
        for i in live:
            if position + 2 == len(windows[i]):
                backend.free(i)
    return nll, count


def evaluate(loaded: LoadedModel, kv_config: KVConfig, text: str, context: int, max_tokens: int) -> dict:
    if not 2 <= context <= loaded.config.context_window:
        raise ValueError(f"--context must be in [2, {loaded.config.context_window}], got {context}")
    if max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {max_tokens}")
    windows = text_windows(loaded.tokenizer, text, context, max_tokens)
    if not windows:
        raise ValueError("the text is too short: it gives no window of at least 2 tokens")
    start = time.perf_counter()
    nll, count = window_nll(loaded, kv_config, windows)
    return {
        "perplexity": math.exp(nll / count),
        "tokens": count,
        "windows": len(windows),
        "context": context,
        **kv_bytes(loaded, kv_config, context),
        "seconds": round(time.perf_counter() - start, 2),
        "kv_config": kv_config.__dict__,
    }


def kv_bytes(loaded: LoadedModel, kv_config: KVConfig, num_tokens: int) -> dict[str, int]:
    """Bytes of one sequence of num_tokens over all layers: pool memory and wire, this mode's and fp16's."""
    cfg = loaded.config
    layout = KVLayout(kv_config, cfg.num_kv_heads, cfg.head_dim)
    fp16 = KVLayout(KVConfig(mode="fp16"), cfg.num_kv_heads, cfg.head_dim)
    return {
        "kv_bytes": layout.memory_bytes(num_tokens, cfg.num_layers),
        "fp16_kv_bytes": fp16.memory_bytes(num_tokens, cfg.num_layers),
        "wire_bytes": layout.wire_bytes(num_tokens, cfg.num_layers),
        "fp16_wire_bytes": fp16.wire_bytes(num_tokens, cfg.num_layers),
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

    def run() -> dict:
        kv_config = kv_config_from_args(args)
        text = read_text_prefix(args.text, args.max_tokens)  # a bad path fails before the model loads
        loaded = load_model(model_from_env(args.model), dtype=args.dtype, device=args.device)
        result = evaluate(loaded, kv_config, text, args.context, args.max_tokens)
        return result

    return print_json_result(run)


if __name__ == "__main__":
    sys.exit(main())
