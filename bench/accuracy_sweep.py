"""Accuracy sweep of the KV modes: perplexity and greedy agreement on a real model, attention error at head_dim 128.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.accuracy_sweep --model ../shared/models/stories260K \
        --text ../shared/data/tinystories_val.txt [--tokens 12288 --write docs/accuracy.md]

Runs everything in one process (the model loads once, the fp16 greedy reference is generated once) through the
same functions as the CLI tools `common.eval.perplexity`, `common.eval.agreement` and
`common.eval.attention_error`; each row of the tables names the tool flags that reproduce it. Every measurement
is appended to --results (JSON lines) as soon as it is done, and a rerun skips what is already there, so an
interrupted sweep resumes. The tables go to stdout and, with --write, into their sections of a markdown file.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
from pathlib import Path
from typing import Callable

import torch

from bench.report import write_section
from common.default_model import model_from_env
from common.eval import agreement, attention_error, attention_profile, perplexity
from common.kv.options import kv_flags
from common.kv.config import KVConfig
from common.kv.format import STORAGE_DTYPE, KVLayout
from common.loader import LoadedModel, load_model

MAIN_FLAGS = ("--kv-mode", "--bits", "--partition", "--key-axis")
PROFILE_WINDOWS = 16  # attention profile: windows of --context tokens
LLAMA3_8B = {"num_layers": 32, "num_kv_heads": 8, "head_dim": 128}  # its 32 query heads do not change KV bytes


# -- what is measured ----------------------------------------------------------------------------------------------


def grid_configs() -> list[KVConfig]:
    """fp16, then dequant and hack at every bits x partition x key axis."""
    configs = [KVConfig(mode="fp16")]
    for mode, bits, partition, axis in itertools.product(("dequant", "hack"), (2, 4), (32, 64, 128),
                                                         ("token", "channel")):
        configs.append(KVConfig(mode=mode, bits=bits, partition=partition, key_axis=axis))
    return configs


def ablation_configs() -> list[KVConfig]:
    """One setting changed at a time from a grid row: each ablation on hack at 2 bits, Π=64, both key axes;
    the two that change accuracy also on dequant (storage or homomorphic compute?); no sinks also at 4 bits."""
    configs = []
    for axis in ("token", "channel"):
        base = KVConfig(mode="hack", bits=2, partition=64, key_axis=axis)
        configs += [dataclasses.replace(base, num_sinks=0), dataclasses.replace(base, rounding="stochastic"),
                    dataclasses.replace(base, sum_elimination=False),
                    dataclasses.replace(base, requant_elimination=False)]
    dequant = KVConfig(mode="dequant", bits=2, partition=64, key_axis="channel")
    return configs + [dataclasses.replace(dequant, rounding="stochastic"),
                      dataclasses.replace(dequant, requant_elimination=False),
                      KVConfig(mode="hack", bits=4, partition=64, key_axis="channel", num_sinks=0)]


def agreement_configs() -> list[KVConfig]:
    """Both compressed modes at both key axes and 2 or 4 bits, plus the ablations that change accuracy."""
    configs = [KVConfig(mode=mode, bits=bits, key_axis=axis)
               for bits, axis, mode in itertools.product((2, 4), ("token", "channel"), ("dequant", "hack"))]
    base = KVConfig(mode="hack", bits=2, key_axis="channel")
    return configs + [dataclasses.replace(base, num_sinks=0), dataclasses.replace(base, rounding="stochastic"),
                      dataclasses.replace(base, requant_elimination=False),
                      KVConfig(mode="hack", bits=4, key_axis="channel", num_sinks=0)]


def sink_configs() -> list[KVConfig]:
    """hack at 2 and 4 bits, Π=64, both key axes, with and without 16-bit sinks."""
    return [KVConfig(mode="hack", bits=bits, key_axis=axis, num_sinks=sinks)
            for bits, axis, sinks in itertools.product((2, 4), ("token", "channel"), (0, 4))]


def base_of(config: KVConfig) -> KVConfig:
    """The grid configuration an ablation differs from."""
    return KVConfig(mode=config.mode, bits=config.bits, partition=config.partition, key_axis=config.key_axis)


# -- results file --------------------------------------------------------------------------------------------------


class ResultLog:
    """Measurements keyed by (kind, flags), appended to a JSON-lines file as they finish."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[tuple[str, str], dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                row = json.loads(line)
                self.rows[(row["kind"], row["flags"])] = row

    def get_or_run(self, kind: str, config: KVConfig, measure: Callable[[], dict]) -> dict:
        key = (kind, " ".join(kv_flags(config)))
        if key not in self.rows:
            row = {"kind": kind, "flags": key[1], **measure()}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            self.rows[key] = row
            print(f"{kind}: {key[1]} -> {_headline(row)}", flush=True)
        return self.rows[key]


def _headline(row: dict) -> str:
    if "perplexity" in row:
        return f"ppl {row['perplexity']:.4f} ({row['tokens']} tokens, {row['seconds']} s)"
    if "mean_first_divergence" in row:
        return f"divergence {row['mean_first_divergence']:.1f}, identical {row['identical_fraction']:.2f}"
    return f"error {row['error']:.4f}"


# -- running -------------------------------------------------------------------------------------------------------


def run_perplexity(loaded: LoadedModel, log: ResultLog, text: str, context: int, tokens: int) -> list[dict]:
    return [log.get_or_run("perplexity", c, lambda c=c: perplexity.evaluate(loaded, c, text, context, tokens))
            for c in grid_configs() + ablation_configs()]


def run_agreement(loaded: LoadedModel, log: ResultLog, text_path: str, prompts: int, prompt_tokens: int,
                  max_tokens: int) -> list[dict]:
    encoded = agreement.spread_lengths(agreement.load_prompts(loaded, text_path, prompts, prompt_tokens),
                                       KVConfig.partition)
    reference: list[list[int]] = []

    def measure(config: KVConfig) -> dict:
        if not reference:  # generated once, and only when some configuration still needs it
            reference.extend(agreement.greedy_outputs(loaded, KVConfig(mode="fp16"), encoded, max_tokens))
        return agreement.agreement(loaded, config, encoded, max_tokens, reference)

    return [log.get_or_run("agreement", c, lambda c=c: measure(c)) for c in agreement_configs()]


def run_attention_error(log: ResultLog, kind: str, configs: list[KVConfig], tokens: int, decode_steps: int,
                        sink_tokens: int) -> list[dict]:
    shape = dict(num_heads=4, num_kv_heads=1, head_dim=128)
    model = attention_error.synthetic_model(**shape, tokens=tokens + decode_steps)
    q, k, v = attention_error.synthetic_qkv(tokens + decode_steps, **shape, outliers=4,
                                            generator=torch.Generator().manual_seed(0), sink_tokens=sink_tokens)

    def measure(config: KVConfig) -> dict:
        return attention_error.attention_errors([config], model, q, k, v, tokens)[0]

    return [log.get_or_run(kind, c, lambda c=c: measure(c)) for c in configs]


# -- tables --------------------------------------------------------------------------------------------------------


def config_of(row: dict) -> KVConfig:
    return KVConfig.from_dict(row["kv_config"])


def main_columns(config: KVConfig) -> str:
    if not config.compressed:
        return f"| {config.mode} | 16 | - | - "
    return f"| {config.mode} | {config.bits} | {config.partition} | {config.key_axis} "


def other_flags(config: KVConfig) -> str:
    return " ".join(kv_flags(config, leave_out=MAIN_FLAGS)) or "-"


def perplexity_table(rows: list[dict], ablations: bool) -> str:
    """Grid rows (vs fp16) or ablation rows (vs the same configuration without the change)."""
    by_config = {config_of(r): r for r in rows}
    fp16 = by_config[KVConfig(mode="fp16")]
    against = "its grid row" if ablations else "fp16"
    lines = [f"| mode | bits | Π | key axis | other flags | perplexity | vs {against} | memory B/token "
             "| wire B/token | memory % fp16 | wire % fp16 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        config = config_of(row)
        if (config != base_of(config)) != ablations:
            continue
        baseline = by_config[base_of(config)] if ablations else fp16
        change = 100 * (row["perplexity"] / baseline["perplexity"] - 1)
        memory, wire, fp16_bytes, context = row["kv_bytes"], row["kv_wire_bytes"], row["fp16_kv_bytes"], row["context"]
        lines.append(f"{main_columns(config)}| {other_flags(config)} | {row['perplexity']:.3f} | {change:+.1f}% "
                     f"| {memory / context:.0f} | {wire / context:.0f} | {100 * memory / fp16_bytes:.1f} "
                     f"| {100 * wire / fp16_bytes:.1f} |")
    return "\n".join(lines)


def agreement_table(rows: list[dict]) -> str:
    lines = ["| mode | bits | Π | key axis | other flags | mean first divergence | identical outputs |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        config = config_of(row)
        lines.append(f"{main_columns(config)}| {other_flags(config)} | {row['mean_first_divergence']:.1f} "
                     f"/ {row['max_tokens']} | {100 * row['identical_fraction']:.0f}% |")
    return "\n".join(lines)


def attention_table(rows: list[dict]) -> str:
    lines = ["| mode | bits | Π | key axis | other flags | rel. error vs float |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['mode']} | {row['bits']} | {row['partition']} | {row['key_axis']} "
                     f"| {row['other'] or '-'} | {row['error']:.4f} |")
    return "\n".join(lines)


def llama3_bytes_table(tokens: int) -> str:
    """Exact memory and wire bytes (format.KVLayout) of one sequence's KV in a Llama-3-8B-shaped model.

    The key axis does not change the bytes: per-token partitions of Πd along head_dim and per-channel partitions
    of Π tokens hold the same number of scales when Π <= head_dim.
    """
    layers, heads, head_dim = LLAMA3_8B["num_layers"], LLAMA3_8B["num_kv_heads"], LLAMA3_8B["head_dim"]
    fp16 = KVLayout(KVConfig(mode="fp16"), heads, head_dim).fp16_bytes(tokens, layers)
    lines = ["| bits | Π | memory MiB | wire MiB | memory % fp16 | wire % fp16 |", "|---|---|---|---|---|---|",
             f"| 16 (fp16) | - | {fp16 / 2**20:.1f} | {fp16 / 2**20:.1f} | 100.00 | 100.00 |"]
    for bits, partition in itertools.product((2, 4), (32, 64, 128)):
        layout = KVLayout(KVConfig(mode="hack", bits=bits, partition=partition), heads, head_dim)
        memory, wire = layout.memory_bytes(tokens, layers), layout.wire_bytes(tokens, layers)
        lines.append(f"| {bits} | {partition} | {memory / 2**20:.1f} | {wire / 2**20:.1f} "
                     f"| {100 * memory / fp16:.2f} | {100 * wire / fp16:.2f} |")
    return "\n".join(lines + ["", *llama3_headlines(tokens)])


def llama3_headlines(tokens: int) -> list[str]:
    """The 2-bit, Π=64 wire share of one layer, and the memory each elimination costs, as sentences."""
    heads, head_dim, layers = LLAMA3_8B["num_kv_heads"], LLAMA3_8B["head_dim"], LLAMA3_8B["num_layers"]
    config = KVConfig(mode="hack", bits=2, partition=64)
    layout = KVLayout(config, heads, head_dim)
    wire, raw, memory = layout.wire_bytes(tokens), layout.fp16_bytes(tokens), layout.memory_bytes(tokens, layers)
    no_sums = KVLayout(dataclasses.replace(config, sum_elimination=False), heads, head_dim)
    sums = memory - no_sums.memory_bytes(tokens, layers)
    tail_shapes = [shape for name, shape in layout.state_shapes().items() if name.startswith("tail")]
    tail_slot = layers * sum(math.prod(shape) for shape in tail_shapes) * STORAGE_DTYPE.itemsize
    return [f"- One layer, 2 bits, Π=64, {tokens} tokens: {wire:,} bytes on the wire vs {raw:,} bytes of fp16 "
            f"K and V = **{100 * wire / raw:.2f}%**.",
            f"- Sum elimination (stored code sums) costs {sums / 2**20:.1f} MiB = +{100 * sums / (memory - sums):.1f}% "
            "memory at 2 bits, Π=64; nothing on the wire.",
            f"- Requant elimination (a 16-bit slot for the open partition) costs {tail_slot / 2**20:.1f} MiB per "
            f"sequence = {100 * tail_slot / memory:.1f}% of this sequence's 2-bit memory; on the wire the open "
            "partition's tokens travel as fp16 either way."]


# -- command line --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.accuracy_sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--text", required=True)
    parser.add_argument("--tokens", type=int, default=12288, help="perplexity: tokens scored per configuration")
    parser.add_argument("--context", type=int, default=256, help="perplexity: window length")
    parser.add_argument("--prompts", type=int, default=64, help="agreement: prompts")
    parser.add_argument("--prompt-tokens", type=int, default=192, help="agreement: prompt length")
    parser.add_argument("--max-tokens", type=int, default=64, help="agreement: greedy tokens per prompt")
    parser.add_argument("--attention-tokens", type=int, default=512, help="attention error: prompt tokens")
    parser.add_argument("--decode-steps", type=int, default=64, help="attention error: decode steps measured")
    parser.add_argument("--results", default="results/accuracy/results.jsonl", help="JSON lines, resumable")
    parser.add_argument("--write", help="markdown file whose generated sections are replaced")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for tiny models)")
    return parser.parse_args(argv)


def sections(args: argparse.Namespace, model_name: str, layers: int, ppl: list[dict], agree: list[dict],
             attention: list[dict], sinks: list[dict], focus: list[dict]) -> dict[str, str]:
    """The generated markdown sections, by title."""
    ppl_intro = (f"{model_name}, {ppl[0]['tokens']} tokens in windows of {args.context}. Bytes: one {args.context}-"
                 f"token window's KV over all {layers} layers (pool memory and serialized wire), per token.")
    agree_intro = (f"{model_name}, {agree[0]['prompts']} prompts of {args.prompt_tokens - 63}-{args.prompt_tokens} "
                   f"tokens (mean {agree[0]['prompt_tokens']:.1f}), {args.max_tokens} greedy tokens each, compared "
                   "with fp16 KV.")
    attention_intro = (f"4 query heads on 1 KV head, head_dim 128, 4 outlier key channels, a {args.attention_tokens}"
                       f"-token prompt, error over {args.decode_steps} decode steps.")
    sink_intro = f"The same, with token 0 an attention sink (`--sink-tokens 1`, about 40% of the attention)."
    focus_intro = (f"{model_name}, {PROFILE_WINDOWS} windows of {args.context} tokens prefilled with float KV "
                   f"(`common.eval.attention_profile`); mean over heads and over queries at positions >= 64.")
    bytes_intro = ("32 layers, 8 KV heads, head_dim 128, one sequence of 4096 tokens. Memory counts the stored code "
                   "sums, the wire does not carry them; the key axis does not change the bytes.")
    return {
        "Perplexity": f"{ppl_intro}\n\n{perplexity_table(ppl, ablations=False)}",
        "Perplexity ablations": perplexity_table(ppl, ablations=True),
        f"Where {model_name}'s attention goes": f"{focus_intro}\n\n{attention_profile.markdown_table(focus, 4, 64)}",
        "Greedy agreement": f"{agree_intro}\n\n{agreement_table(agree)}",
        "Attention error at head_dim 128": f"{attention_intro}\n\n{attention_table(attention)}",
        "Attention error with an attention sink": f"{sink_intro}\n\n{attention_table(sinks)}",
        "KV bytes of a Llama-3-8B-shaped model": f"{bytes_intro}\n\n{llama3_bytes_table(4096)}",
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    log = ResultLog(Path(args.results))
    loaded = load_model(model_from_env(args.model), dtype="float32", device="cpu")
    text = perplexity.read_text_prefix(args.text, args.tokens)
    ppl = run_perplexity(loaded, log, text, args.context, args.tokens)
    agree = run_agreement(loaded, log, args.text, args.prompts, args.prompt_tokens, args.max_tokens)
    attention = run_attention_error(log, "attention_error", grid_configs() + ablation_configs(),
                                    args.attention_tokens, args.decode_steps, sink_tokens=0)
    sinks = run_attention_error(log, "attention_error_sink", sink_configs(), args.attention_tokens,
                                args.decode_steps, sink_tokens=1)
    focus = attention_profile.profile(loaded, text, args.context, PROFILE_WINDOWS, sinks=4, recent=64)
    tables = sections(args, Path(loaded.path).name, loaded.config.num_layers, ppl, agree, attention, sinks, focus)
    for title, body in tables.items():
        print(f"\n## {title}\n\n{body}")
        if args.write:
            write_section(args.write, title, body)


if __name__ == "__main__":
    main()
