"""Prefill and decode tokens/s of our runtime beside transformers' on the same model.

    .venv/bin/python -m bench.model --model ../shared/models/stories260K [--batch 1 16] [--write docs/benchmarks.md]

Both run in the same process, alternating, so machine noise hits them alike; the ratio is the result.
Prefill: a batch of prompts of --prompt-len tokens. Decode: --decode-steps greedy steps after that.
"""
from __future__ import annotations

import argparse
import platform
import time

import torch
from transformers import AutoModelForCausalLM

from common.default_model import model_from_env
from common.kv.float_backend import FloatKVBackend
from common.kv.interface import ForwardBatch
from common.loader import load_model

from bench.report import write_section


def ours_tokens_per_s(loaded, prompts: torch.Tensor, steps: int) -> tuple[float, float]:
    batch_size, length = prompts.shape
    kv = FloatKVBackend.for_model(loaded.config)
    ids = list(range(batch_size))
    batch = ForwardBatch.build(ids, [0] * batch_size, [length] * batch_size)
    kv.reserve(batch)
    start = time.perf_counter()
    logits = loaded.model(prompts.flatten(), batch, kv)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for step in range(steps):
        batch = ForwardBatch.build(ids, [length + step] * batch_size, [1] * batch_size)
        kv.reserve(batch)
        logits = loaded.model(logits.argmax(-1), batch, kv)
    decode_s = time.perf_counter() - start
    return batch_size * length / prefill_s, batch_size * steps / decode_s


@torch.inference_mode()
def hf_tokens_per_s(model, prompts: torch.Tensor, steps: int) -> tuple[float, float]:
    batch_size, length = prompts.shape
    start = time.perf_counter()
    out = model(prompts, use_cache=True)
    prefill_s = time.perf_counter() - start
    past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    decode_s = time.perf_counter() - start
    return batch_size * length / prefill_s, batch_size * steps / decode_s


def best_of(repeats: int, fn, *args) -> tuple[float, float]:
    results = [fn(*args) for _ in range(repeats)]
    return max(r[0] for r in results), max(r[1] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", help="markdown file to update (section 'Model runtime')")
    args = parser.parse_args()
    torch.manual_seed(0)
    model_path = model_from_env(args.model)
    loaded = load_model(model_path, dtype="float32", device="cpu")
    reference = AutoModelForCausalLM.from_pretrained(loaded.path, dtype=torch.float32).eval()
    rows = ["| batch | ours prefill tok/s | HF prefill tok/s | ratio | ours decode tok/s | HF decode tok/s | ratio |",
            "|---|---|---|---|---|---|---|"]
    for batch_size in args.batch:
        prompts = torch.randint(3, loaded.config.vocab_size, (batch_size, args.prompt_len))
        ours = best_of(args.repeats, ours_tokens_per_s, loaded, prompts, args.decode_steps)
        theirs = best_of(args.repeats, hf_tokens_per_s, reference, prompts, args.decode_steps)
        rows.append(f"| {batch_size} | {ours[0]:,.0f} | {theirs[0]:,.0f} | {ours[0] / theirs[0]:.2f}x "
                    f"| {ours[1]:,.0f} | {theirs[1]:,.0f} | {ours[1] / theirs[1]:.2f}x |")
    device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    header = (f"Model `{loaded.name}`, float32, {device}, prompt {args.prompt_len} tokens, "
              f"{args.decode_steps} decode steps, best of {args.repeats}. Command: `python -m bench.model`.")
    table = "\n".join([header, "", *rows])
    print(table)
    if args.write:
        write_section(args.write, "Model runtime (bench/model.py)", table)


if __name__ == "__main__":
    main()
