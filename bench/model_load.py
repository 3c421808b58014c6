"""Load time (first GGUF conversion vs the cached conversion) and generation tokens/s of a model, by default the
embedded SmolLM2-135M-Instruct.

    .venv/bin/python -m bench.model_load [--model NAME|PATH] [--batch 1 4] [--max-tokens 64] \
        [--write docs/models.md] [--json out.json]

Load times are measured the way a user meets them: a fresh Python process that imports the runtime and loads
the model, first with an empty cache directory (the GGUF is converted), then again (the conversion is reused).
Generation: in-process `Engine.generate` (prefill + greedy decode, ignoring EOS) per KV mode and batch size.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

from bench.report import write_section
from common.default_model import model_from_env, served_model_name

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


def child_load(model: str) -> None:
    """Runs in the child process: import, load, print the seconds since the process started."""
    started = float(os.environ["BENCH_STARTED"])
    from common.loader import load_model

    load_model(model, dtype="float32", device="cpu")
    print(json.dumps({"seconds": time.time() - started}))


def timed_load(model: str, cache_dir: str) -> float:
    env = dict(os.environ, HACK_CACHE_DIR=cache_dir, BENCH_STARTED=str(time.time()), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "bench.model_load", "--child-load", model], env=env,
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["seconds"]


def generation_rates(model: str, batches: list[int], max_tokens: int) -> list[dict]:
    from common.engine import Engine
    from common.kv.config import KVConfig
    from common.kv.factory import make_kv_backend
    from common.loader import load_model
    from common.sampling import SamplingParams

    loaded = load_model(model, dtype="float32", device="cpu")
    tokenizer = loaded.tokenizer
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
        prompt = tokenizer(text, add_special_tokens=False).input_ids
    else:
        prompt = tokenizer.encode(PROMPT[0]["content"])
    rows = []
    for mode in ("fp16", "dequant", "hack"):
        for batch in batches:
            def engine() -> Engine:  # a fresh KV pool per run, sized for this batch
                return Engine(loaded, make_kv_backend(KVConfig(mode=mode), loaded.config, device=torch.device("cpu"),
                                                      dtype=torch.float32, max_seqs=batch,
                                                      max_tokens=(len(prompt) + max_tokens + 64) * batch))

            params = [SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)] * batch
            engine().generate([prompt], params[:1])  # warm-up (allocations, first-call paths)
            measured = engine()
            start = time.perf_counter()
            completions = measured.generate([prompt] * batch, params)
            seconds = time.perf_counter() - start
            generated = sum(len(c.token_ids) for c in completions)
            rows.append({"kv_mode": mode, "batch": batch, "prompt_tokens": len(prompt), "generated": generated,
                         "seconds": seconds, "tokens_per_s": generated / seconds,
                         "tokens_per_s_per_stream": generated / seconds / batch})
            print(f"{mode} x{batch}: {generated / seconds:.1f} tokens/s", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--write", help="markdown file to update (section 'Measured: load time and tokens/s')")
    parser.add_argument("--json", help="also write the results as JSON here")
    parser.add_argument("--child-load", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_load:
        child_load(args.child_load)
        return
    model = model_from_env(args.model)
    with tempfile.TemporaryDirectory(prefix="hack-bench-cache-") as cache:
        first = timed_load(model, cache)
        cached = timed_load(model, cache)
    print(f"load: first {first:.1f} s, cached {cached:.1f} s", file=sys.stderr, flush=True)
    rows = generation_rates(model, args.batch, args.max_tokens)
    load = os.getloadavg()[0]
    lines = [f"Model `{served_model_name(model)}`, float32 weights, CPU ({platform.machine()}, "
             f"{torch.get_num_threads()} threads), load average {load:.1f} when measured. "
             f"Command: `python -m bench.model_load`.", "",
             "| load | seconds (fresh process: imports + load) |", "|---|---|",
             f"| first (GGUF converted into an empty cache) | {first:.1f} |",
             f"| cached (conversion reused) | {cached:.1f} |", "",
             f"Generation: a {rows[0]['prompt_tokens']}-token chat prompt, {args.max_tokens} greedy tokens per "
             f"stream, prefill included.", "",
             "| KV mode | streams | tokens/s (all streams) | tokens/s per stream |", "|---|---|---|---|"]
    lines += [f"| {r['kv_mode']} | {r['batch']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s_per_stream']:.1f} |"
              for r in rows]
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section(args.write, "Measured: load time and tokens/s", table)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"model": model, "load_first_s": first, "load_cached_s": cached, "load_average": load,
                       "generation": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
