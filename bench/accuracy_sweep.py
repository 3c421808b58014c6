"""Accuracy sweep of the KV configurations on a real model: perplexity on a tuning text and on a held-out text,
a next-word multiple-choice task, greedy agreement with fp16, the attention error of rotation x key axis at
head_dim 128, and stories260K as a stress test; with the exact KV bytes of each configuration.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.accuracy_sweep --model /work/models/SmolLM2-135M-Instruct \
        --tune-text ../shared/data/tinystories_val.txt --text ../shared/data/wiki.test.raw \
        --stress-model ../shared/models/stories260K --write docs/accuracy.md [--shard 0/2]

Runs in one process per shard (the model loads once, the fp16 greedy reference is generated once) through the
same functions as the CLI tools `common.eval.perplexity`, `common.eval.cloze`, `common.eval.agreement` and
`common.eval.attention_error`; each table row names the KV flags that reproduce it. Every measurement is
appended to --results (JSON lines) as soon as it is done, keyed by the full KV configuration, and a rerun skips
what is already there, so an interrupted sweep resumes and `--shard K/N` processes can share the work. The tables
go to stdout and, with --write, into their sections of a markdown file (once every measurement is in).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from pathlib import Path
from typing import Callable

import torch

from bench.report import write_section
from common.default_model import model_from_env
from common.eval import agreement, attention_error, cloze, layer_sensitivity, perplexity
from common.kv.config import KVConfig
from common.kv.format import KVLayout
from common.kv.options import kv_flags
from common.loader import LoadedModel, load_model

LLAMA3_8B = {"num_layers": 32, "num_kv_heads": 8, "head_dim": 128}  # its 32 query heads do not change KV bytes
# the measurements, as the results file names them
KINDS = ("heldout", "tune", "agreement", "tune_agreement", "attention_error", "stress", "layers", "heldout_long",
         "tune_long")
BYTES_AT = 4096  # prompt tokens at which the byte shares are stated (the acceptance point)
PAPER = KVConfig(mode="hack", bits=2, partition=64, ranges="minmax", rotate=False, window=0,
                 token_scales=False)  # HACK's setting
PREVIOUS = dataclasses.replace(PAPER, ranges="mse", rotate=True, window=128)  # the defaults before Π=128
UNSCALED = dataclasses.replace(PREVIOUS, partition=128, block_size=0, window=192)  # the defaults before token scales
ACCURATE = dataclasses.replace(UNSCALED, token_scales=True)  # the defaults: a power of two per token and head
SHORTER_WINDOW = dataclasses.replace(UNSCALED, window=160)  # the defaults before the 2,048-token contexts were measured
FINER = dataclasses.replace(PREVIOUS, window=160)  # Π=64 at the 160-token window's memory: the runner-up then
KEYS4 = dataclasses.replace(ACCURATE, key_bits=4)  # 4-bit keys, 2-bit values: what long contexts need
UNSCALED_KEYS4 = dataclasses.replace(UNSCALED, key_bits=4)
LATER_OPTIONS = {"token_scales": False}  # options added after rows were measured, and their value back then
LAYERS = dataclasses.replace(ACCURATE, mode="dequant")  # the defaults' storage, layer by layer (simulated)


# -- what is measured ----------------------------------------------------------------------------------------------


def sweep_configs() -> list[KVConfig]:
    """fp16, the paper's 2-bit setting (hack and dequant) and 4 bits, each technique alone on top of the paper's
    setting, their combinations (the previous defaults at Π=64, the window/partition choices around the defaults, the
    defaults), the defaults with 4-bit keys, and the defaults on dequant."""
    one_at_a_time = [dataclasses.replace(PAPER, **change) for change in
                     ({"ranges": "mse"}, {"rotate": True}, {"window": 128})]
    combined = [dataclasses.replace(PAPER, ranges="mse", rotate=True),
                dataclasses.replace(PAPER, ranges="mse", window=128), PREVIOUS, FINER, SHORTER_WINDOW, UNSCALED,
                UNSCALED_KEYS4, ACCURATE, KEYS4]
    return [KVConfig(mode="fp16"), PAPER, dataclasses.replace(PAPER, mode="dequant"),
            dataclasses.replace(PAPER, bits=4), *one_at_a_time, *combined, dataclasses.replace(UNSCALED, mode="dequant"),
            dataclasses.replace(ACCURATE, mode="dequant")]


def agreement_configs() -> list[KVConfig]:
    """Held-out greedy agreement: the defaults, the paper's setting, and two near-lossless noise floors (4 bits;
    a window covering prompt and output, so that nothing is quantized and only the rotation's roundoff is left)."""
    return [PAPER, PREVIOUS, SHORTER_WINDOW, UNSCALED, ACCURATE, dataclasses.replace(PAPER, bits=4),
            dataclasses.replace(PREVIOUS, window=512)]


def long_configs() -> list[KVConfig]:
    """Perplexity with 2,048-token contexts, where most of what a token reads is in codes: fp16, the defaults and
    the window/partition choices around them (on both texts), the paper's setting and 4 bits (held-out only)."""
    return [KVConfig(mode="fp16"), ACCURATE, UNSCALED, SHORTER_WINDOW, PREVIOUS, FINER, KEYS4, UNSCALED_KEYS4]


def heldout_long_configs() -> list[KVConfig]:
    return long_configs() + [PAPER, dataclasses.replace(PAPER, bits=4)]


def tune_agreement_configs() -> list[KVConfig]:
    """Greedy agreement on the tuning text: the held-out ones and the candidates, changes to the previous defaults
    for raising it within the wire budget (more sinks, a longer window, one bought with Π=128 (the defaults), float
    prefill attention)."""
    candidates = [dataclasses.replace(PREVIOUS, **change) for change in (
        {"window": 0}, {"num_sinks": 16, "window": 116}, {"window": 160}, {"quantized_prefill": False})]
    return agreement_configs() + candidates


def rotation_configs() -> list[KVConfig]:
    """The paper's setting at both key axes, with and without rotation, with min/max and clipped ranges."""
    return [dataclasses.replace(PAPER, key_axis=axis, rotate=rotate, ranges=ranges)
            for ranges, axis, rotate in itertools.product(("minmax", "mse"), ("channel", "token"), (False, True))]


def stress_configs() -> list[KVConfig]:
    return [KVConfig(mode="fp16"), PAPER, dataclasses.replace(PAPER, ranges="mse", rotate=True), PREVIOUS, UNSCALED, ACCURATE,
            dataclasses.replace(PAPER, bits=4)]


# -- results file --------------------------------------------------------------------------------------------------


def config_key(config: KVConfig) -> str:
    """The full configuration, or only the mode for fp16, whose result no compressed-storage option changes (so a
    change of those defaults keeps its rows). An option added later is left out at the value every earlier row
    had (LATER_OPTIONS), so those rows keep their keys."""
    if not config.compressed:
        return json.dumps({"mode": config.mode})
    fields = {name: value for name, value in dataclasses.asdict(config).items()
              if name not in LATER_OPTIONS or value != LATER_OPTIONS[name]}
    return json.dumps(fields, sort_keys=True)


class ResultLog:
    """Measurements keyed by (kind, full KV configuration), appended to a JSON-lines file as they finish."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[tuple[str, str], dict] = {}
        self.reload()

    def reload(self) -> None:
        """Read what is in the file now (other shards append to it)."""
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                row = json.loads(line)
                config = KVConfig.from_dict(LATER_OPTIONS | row["kv_config"])  # a row without a later option
                self.rows[(row["kind"], config_key(config))] = row  # was measured at its value back then

    def get(self, kind: str, config: KVConfig) -> dict | None:
        return self.rows.get((kind, config_key(config)))

    def get_or_run(self, kind: str, config: KVConfig, measure: Callable[[], dict]) -> dict:
        key = (kind, config_key(config))
        if key not in self.rows:
            self.reload()
        if key not in self.rows:
            row = {"kind": kind, **measure(), "kv_config": dataclasses.asdict(config)}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            self.rows[key] = row
            print(f"{kind}: {flags_of(config)} -> {_headline(row)}", flush=True)
        return self.rows[key]


def _headline(row: dict) -> str:
    if "mean_first_divergence" in row:
        return f"divergence {row['mean_first_divergence']:.1f}, identical {row['identical_fraction']:.2f}"
    if "rows" in row:
        worst = max(row["rows"][3:], key=lambda r: r["change"])
        return f"all layers {100 * row['rows'][0]['change']:+.2f}%, worst {worst['scope']} {100 * worst['change']:+.2f}%"
    if "perplexity" in row:
        return f"ppl {row['perplexity']:.4f} ({row['tokens']} tokens, {row.get('seconds', '-')} s)"
    return f"error {row['error']:.4f}"


def flags_of(config: KVConfig) -> str:
    """The flags that select config next to the defaults, fp16 and the mode included."""
    return " ".join(kv_flags(config)) if config.compressed else "--kv-mode fp16"


# -- running -------------------------------------------------------------------------------------------------------


class Shard:
    """Measurement i runs in shard i mod N (--shard K/N); with N = 1 everything runs here."""

    def __init__(self, spec: str) -> None:
        index, count = (int(part) for part in spec.split("/"))
        if not 0 <= index < count:
            raise ValueError(f"--shard must be K/N with 0 <= K < N, got {spec}")
        self.index, self.count, self.seen = index, count, -1

    def mine(self) -> bool:
        self.seen += 1
        return self.seen % self.count == self.index


def run_all(args: argparse.Namespace, log: ResultLog, shard: Shard) -> None:
    """Every measurement, the ones the acceptance numbers need first (a slow or interrupted sweep has them)."""
    loaded = load_model(model_from_env(args.model), dtype="float32", device="cpu")
    tune_text = perplexity.read_text_prefix(args.tune_text, args.tokens)
    text = perplexity.read_text_prefix(args.text, args.tokens)
    greedy = GreedyReference(loaded, args.text, args.prompts, args)
    tune_greedy = GreedyReference(loaded, args.tune_text, args.tune_prompts, args)

    def tune(config: KVConfig) -> dict:
        return perplexity.evaluate(loaded, config, tune_text, args.context, args.tokens)

    def heldout(config: KVConfig) -> dict:
        return cloze.evaluate(loaded, config, text, args.context, args.tokens, args.questions, seed=0,
                              min_position=args.min_position)

    first = [KVConfig(mode="fp16"), ACCURATE, PAPER, dataclasses.replace(ACCURATE, mode="dequant")]
    tasks = [("heldout", c, heldout) for c in first] + [("tune", c, tune) for c in first[:2]]
    tasks += [("agreement", ACCURATE, greedy.agreement)]
    rest = [c for c in sweep_configs() if c not in first]
    tasks += [("heldout", c, heldout) for c in rest] + [("tune", c, tune) for c in first[2:] + rest]
    tasks += [("agreement", c, greedy.agreement) for c in agreement_configs() if c != ACCURATE]
    tasks += [("tune_agreement", c, tune_greedy.agreement) for c in tune_agreement_configs()]
    tasks += [("layers", LAYERS, lambda c: layer_sensitivity.evaluate(loaded, c, text, args.context, args.tokens))]
    long_text = perplexity.read_text_prefix(args.text, args.long_tokens)
    long_tune_text = perplexity.read_text_prefix(args.tune_text, args.long_tokens)
    tasks += [("heldout_long", c, lambda c: perplexity.evaluate(loaded, c, long_text, args.long_context,
                                                                args.long_tokens)) for c in heldout_long_configs()]
    tasks += [("tune_long", c, lambda c: perplexity.evaluate(loaded, c, long_tune_text, args.long_context,
                                                             args.long_tokens)) for c in long_configs()]
    for kind, config, measure in tasks:
        if shard.mine() and kind in args.kinds:
            log.get_or_run(kind, config, lambda c=config, m=measure: m(c))
    run_attention_error(log, shard, args.kinds)
    if args.stress_model and "stress" in args.kinds:
        stress = load_model(args.stress_model, dtype="float32", device="cpu")
        stress_text = perplexity.read_text_prefix(args.stress_text, args.stress_tokens)
        for config in stress_configs():
            if shard.mine():
                log.get_or_run("stress", config, lambda c=config: perplexity.evaluate(
                    stress, c, stress_text, args.stress_context, args.stress_tokens))


class GreedyReference:
    """Agreement prompts from one text and the fp16 greedy outputs, made once when first needed."""

    def __init__(self, loaded: LoadedModel, text: str, prompts: int, args: argparse.Namespace) -> None:
        self.loaded, self.text, self.count, self.args = loaded, text, prompts, args
        self.prompts: list[list[int]] = []
        self.reference: list[list[int]] = []
        self.gaps: list[list[float]] = []

    def agreement(self, config: KVConfig) -> dict:
        if not self.reference:
            self.prompts = agreement.load_prompts(self.loaded, self.text, self.count, self.args.prompt_tokens)
            self.reference = agreement.greedy_outputs(self.loaded, KVConfig(mode="fp16"), self.prompts,
                                                      self.args.max_tokens)
            self.gaps = agreement.forced_choices(self.loaded, KVConfig(mode="fp16"), self.prompts, self.reference)[1]
        return agreement.agreement(self.loaded, config, self.prompts, self.args.max_tokens, self.reference,
                                   self.gaps)


def run_attention_error(log: ResultLog, shard: Shard, kinds: tuple[str, ...] = KINDS, tokens: int = 512,
                        decode_steps: int = 64) -> None:
    """Synthetic K/V at head_dim 128 with 4 outlier key channels and an attention sink (common.eval.attention_error)."""
    shape = dict(num_heads=4, num_kv_heads=1, head_dim=128)
    model = attention_error.synthetic_model(**shape, tokens=tokens + decode_steps)
    q, k, v = attention_error.synthetic_qkv(tokens + decode_steps, **shape, outliers=4,
                                            generator=torch.Generator().manual_seed(0), sink_tokens=1)
    for config in rotation_configs():
        if shard.mine() and "attention_error" in kinds:
            log.get_or_run("attention_error", config,
                           lambda c=config: attention_error.attention_errors([c], model, q, k, v, tokens)[0])


# -- tables --------------------------------------------------------------------------------------------------------


def byte_shares(config: KVConfig, num_layers: int, num_kv_heads: int, head_dim: int,
                tokens: int = BYTES_AT) -> tuple[float, float]:
    """(wire %, memory %) of fp16 mode's bytes for one sequence of `tokens` (format.KVLayout, exact)."""
    layout, fp16 = (KVLayout(c, num_kv_heads, head_dim) for c in (config, KVConfig(mode="fp16")))
    return (100 * layout.wire_bytes(tokens, num_layers) / fp16.wire_bytes(tokens, num_layers),
            100 * layout.memory_bytes(tokens, num_layers) / fp16.memory_bytes(tokens, num_layers))


def mean_wire_share(config: KVConfig, num_layers: int, num_kv_heads: int, head_dim: int, tokens: int = BYTES_AT,
                    lengths: int = 256) -> float:
    """Wire % of fp16 over prompt lengths tokens .. tokens + lengths - 1: the tail holds between W and W + Π - 1
    tokens, so one length alone can hide part of a window's cost (256 lengths span whole Π = 64 and 128 cycles)."""
    layout, fp16 = (KVLayout(c, num_kv_heads, head_dim) for c in (config, KVConfig(mode="fp16")))
    span = range(tokens, tokens + lengths)
    return 100 * sum(layout.wire_bytes(n, num_layers) for n in span) / sum(fp16.wire_bytes(n, num_layers) for n in span)


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """Whether each (cost, loss) point is not dominated: no other is at most as costly and as lossy, and better
    in one."""
    return [not any(c <= cost and l <= loss and (c, l) != (cost, loss) for c, l in points)
            for cost, loss in points]


def pareto_table(log: ResultLog, model_shape: dict) -> str:
    configs = [c for c in sweep_configs() if log.get("heldout", c)]
    fp16 = KVConfig(mode="fp16")
    held, tune = log.get("heldout", fp16), log.get("tune", fp16)
    if held is None:
        return "(no held-out measurement yet)"
    llama = {c: byte_shares(c, **LLAMA3_8B) for c in configs}
    own = {c: byte_shares(c, **model_shape) for c in configs}
    front = dict(zip(configs, pareto_front([(llama[c][0], log.get("heldout", c)["perplexity"]) for c in configs])))
    lines = ["| flags | held-out ppl | vs fp16 | tuning ppl | vs fp16 | next-word 4-choice accuracy | next-word top-1 "
             "| wire % fp16 (Llama-3-8B) | memory % fp16 (Llama-3-8B) | wire % fp16 (this model) | memory % fp16 "
             "(this model) | held-out, long context | tuning, long context | Pareto |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for config in sorted(configs, key=lambda c: (-llama[c][0], log.get("heldout", c)["perplexity"])):
        h, t = log.get("heldout", config), log.get("tune", config)
        tuned = f"{t['perplexity']:.3f} | {_change(t, tune)}" if t and tune else "- | -"
        lines.append(f"| `{flags_of(config)}` | {h['perplexity']:.3f} | {_change(h, held)} | {tuned} "
                     f"| {100 * h['accuracy']:.1f}% | {100 * h['exact_match']:.1f}% | {llama[config][0]:.2f} "
                     f"| {llama[config][1]:.2f} | {own[config][0]:.2f} | {own[config][1]:.2f} "
                     f"| {_long_cell(log, 'heldout_long', config)} | {_long_cell(log, 'tune_long', config)} "
                     f"| {'yes' if front[config] else ''} |")
    return "\n".join(lines)


def _long_cell(log: ResultLog, kind: str, config: KVConfig) -> str:
    """'perplexity (change over fp16)' of a long-context pass, or '-'."""
    row, fp16 = log.get(kind, config), log.get(kind, KVConfig(mode="fp16"))
    if row is None or fp16 is None:
        return "-"
    return f"{row['perplexity']:.3f} ({_change(row, fp16)})"


def _change(row: dict, baseline: dict) -> str:
    return f"{100 * (row['perplexity'] / baseline['perplexity'] - 1):+.1f}%"


def agreement_table(log: ResultLog) -> str:
    lines = ["| flags | held-out: mean first divergence | identical | token agreement | fp16 gap at divergences "
             "(median) | prompts | tuning: mean first divergence | identical | token agreement | prompts "
             "| wire % fp16 (Llama-3-8B, 4,096) | wire % fp16 (mean, 4,096-4,351) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for config in tune_agreement_configs():
        held, tune = (log.get(kind, config) for kind in ("agreement", "tune_agreement"))
        if not (held or tune):
            continue
        cells = [_agreement_cells(held, gap=True), _agreement_cells(tune, gap=False)]
        lines.append(f"| `{flags_of(config)}` | {cells[0]} | {cells[1]} | {byte_shares(config, **LLAMA3_8B)[0]:.2f} "
                     f"| {mean_wire_share(config, **LLAMA3_8B):.2f} |")
    return "\n".join(lines)


def _agreement_cells(row: dict | None, gap: bool) -> str:
    if row is None:
        return " | ".join("-" * (5 if gap else 4))
    cells = [f"{row['mean_first_divergence']:.1f} / {row['max_tokens']}", f"{100 * row['identical_fraction']:.0f}%",
             f"{100 * row['token_agreement']:.1f}%" if "token_agreement" in row else "-"]
    if gap:
        margin = row.get("median_divergence_margin")
        cells.append(f"{margin:.2f} (all: {row['median_margin']:.2f})" if margin is not None else "-")
    return " | ".join(cells + [str(row["prompts"])])


def attention_table(log: ResultLog) -> str:
    lines = ["| ranges | key axis | rotate | rel. error vs float |", "|---|---|---|---|"]
    for config in rotation_configs():
        row = log.get("attention_error", config)
        if row:
            lines.append(f"| {config.ranges} | {config.key_axis} | {'yes' if config.rotate else 'no'} "
                         f"| {row['error']:.4f} |")
    return "\n".join(lines)


def layers_table(log: ResultLog) -> str:
    """The three whole-model rows, then the layers by the loss they carry alone (those above +0.1%, the count
    of the rest)."""
    row = log.get("layers", LAYERS)
    if row is None:
        return "(not measured)"
    lines = ["| compressed storage on | perplexity | vs fp16 |", "|---|---|---|",
             f"| nothing (fp16 KV) | {row['fp16_perplexity']:.3f} | +0.00% |"]
    ranked = row["rows"][:3] + sorted(row["rows"][3:], key=lambda r: -r["change"])
    shown = [r for r in ranked if r in row["rows"][:3] or r["change"] > 0.001]
    lines += [f"| {r['scope']} alone | {r['perplexity']:.3f} | {100 * r['change']:+.2f}% |"
              if r["scope"].startswith("layer") else f"| {r['scope']} | {r['perplexity']:.3f} | {100 * r['change']:+.2f}% |"
              for r in shown]
    rest = [r["change"] for r in ranked if r not in shown]
    if rest:
        lines.append(f"| each of the other {len(rest)} layers alone | - | {100 * min(rest):+.2f}% to {100 * max(rest):+.2f}% |")
    return "\n".join(lines)


def stress_table(log: ResultLog) -> str:
    fp16 = log.get("stress", KVConfig(mode="fp16"))
    if fp16 is None:
        return "(no stories260K measurement in the results file yet)"
    lines = ["| flags | perplexity | vs fp16 |", "|---|---|---|"]
    for config in stress_configs():
        row = log.get("stress", config)
        if row and fp16:
            lines.append(f"| `{flags_of(config)}` | {row['perplexity']:.3f} | {_change(row, fp16)} |")
    return "\n".join(lines)


def bytes_table(tokens: int = BYTES_AT) -> str:
    """Exact bytes (format.KVLayout) of one sequence of `tokens` in a Llama-3-8B-shaped model."""
    layers, heads, head_dim = LLAMA3_8B["num_layers"], LLAMA3_8B["num_kv_heads"], LLAMA3_8B["head_dim"]
    lines = ["| flags | memory MiB | wire MiB | memory % fp16 | wire % fp16 |", "|---|---|---|---|---|"]
    configs = [KVConfig(mode="fp16"), PAPER, *(dataclasses.replace(PAPER, window=w) for w in (64, 128)),
               PREVIOUS, FINER, SHORTER_WINDOW, UNSCALED, ACCURATE, KEYS4, dataclasses.replace(PAPER, bits=4)]
    for config in configs:
        layout = KVLayout(config, heads, head_dim)
        memory, wire = layout.memory_bytes(tokens, layers), layout.wire_bytes(tokens, layers)
        wire_share, memory_share = byte_shares(config, **LLAMA3_8B, tokens=tokens)
        lines.append(f"| `{flags_of(config)}` | {memory / 2**20:.1f} | {wire / 2**20:.1f} | {memory_share:.2f} "
                     f"| {wire_share:.2f} |")
    return "\n".join(lines)


def sections(args: argparse.Namespace, log: ResultLog, model_name: str, model_shape: dict) -> dict[str, str]:
    """The generated markdown sections, by title."""
    fp16 = log.get("heldout", KVConfig(mode="fp16")) or {}
    pareto_intro = (f"{model_name}; perplexity over {fp16.get('tokens', args.tokens)} tokens in windows of "
                    f"{args.context} of the held-out text `{Path(args.text).name}` and of the tuning text "
                    f"`{Path(args.tune_text).name}`; next-word accuracy: {fp16.get('questions', args.questions)} "
                    f"4-choice questions from the held-out pass (`common.eval.cloze`, seed 0). Bytes: one sequence of "
                    f"{BYTES_AT} tokens over all layers, exact (`format.KVLayout`), for a Llama-3-8B shape (32 layers, "
                    "8 KV heads, head_dim 128) and for this model; memory counts the stored code sums and the "
                    "16-bit state slot. Pareto: no other row has both fewer Llama-3-8B wire bytes and a lower "
                    "held-out perplexity. Rows by wire bytes. Long context: the first "
                    f"{args.long_tokens} tokens of each text in windows of {args.long_context} (`common.eval."
                    "perplexity`), where most of what a token reads is in codes; the change over fp16 in parentheses.")
    agree_intro = (f"{model_name}, {args.prompts} prompts of {args.prompt_tokens} tokens from the held-out text (one "
                   f"paragraph per line) and {args.tune_prompts} from the tuning text, {args.max_tokens} greedy tokens "
                   "each, compared with fp16 KV (`common.eval.agreement`). Token agreement: the share of positions "
                   "where the configuration picks fp16's token on fp16's history; fp16 gap: fp16's top-1 minus "
                   "top-2 logit at the divergences (median) and at all positions. Rows without them were measured "
                   "by free-running greedy decoding before the tool went teacher-forced (the same first "
                   "divergence). Flags are relative to the defaults (Π = 128, a 192-token window).")
    attention_intro = ("Synthetic K/V (`common.eval.attention_error --sink-tokens 1`): 4 query heads on 1 KV head, "
                       "head_dim 128, 4 outlier key channels (10x, offset 5), token 0 an attention sink, a 512-token "
                       "prompt, error over 64 decode steps; 2 bits, Π=64, 4 sinks.")
    stress_intro = (f"stories260K (5 layers, head_dim 8), {args.stress_tokens} tokens of "
                    f"`{Path(args.stress_text).name}` in windows of {args.stress_context}.")
    layers_intro = (f"{model_name}, the defaults' storage (`{flags_of(LAYERS)}`) applied to one layer, or to K or V "
                    f"only, the rest of the cache 16-bit; the held-out text as in the Pareto table "
                    "(`common.eval.layer_sensitivity`, a float simulation of the pool equal to dequant mode's "
                    "decode steps).")
    bytes_intro = f"32 layers, 8 KV heads, head_dim 128, one sequence of {BYTES_AT} tokens."
    return {
        "Pareto table": f"{pareto_intro}\n\n{pareto_table(log, model_shape)}",
        "Greedy agreement": f"{agree_intro}\n\n{agreement_table(log)}",
        "Rotation and the key axis at head_dim 128": f"{attention_intro}\n\n{attention_table(log)}",
        "Where the loss is: layer by layer": f"{layers_intro}\n\n{layers_table(log)}",
        "Stress test: stories260K": f"{stress_intro}\n\n{stress_table(log)}",
        "KV bytes of a Llama-3-8B-shaped model": f"{bytes_intro}\n\n{bytes_table()}",
    }


# -- command line --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.accuracy_sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--text", required=True, help="held-out text: the reported perplexity, questions, prompts")
    parser.add_argument("--tune-text", required=True, help="tuning text: the perplexity the defaults were chosen on")
    parser.add_argument("--tokens", type=int, default=2048, help="perplexity: tokens scored per configuration")
    parser.add_argument("--context", type=int, default=512, help="perplexity: window length")
    parser.add_argument("--long-context", type=int, default=2048, help="long-context perplexity: window length")
    parser.add_argument("--long-tokens", type=int, default=2048, help="long-context perplexity: tokens scored")
    parser.add_argument("--questions", type=int, default=300, help="next-word questions from the held-out pass")
    parser.add_argument("--min-position", type=int, default=128, help="next-word questions: earliest position")
    parser.add_argument("--prompts", type=int, default=32, help="agreement: prompts")
    parser.add_argument("--tune-prompts", type=int, default=16, help="agreement on the tuning text: prompts")
    parser.add_argument("--prompt-tokens", type=int, default=256, help="agreement: prompt length")
    parser.add_argument("--max-tokens", type=int, default=64, help="agreement: greedy tokens per prompt")
    parser.add_argument("--stress-model", help="a second, tiny model run as a stress test (stories260K)")
    parser.add_argument("--stress-text", default="../shared/data/tinystories_val.txt")
    parser.add_argument("--stress-tokens", type=int, default=4096)
    parser.add_argument("--stress-context", type=int, default=256)
    parser.add_argument("--results", default="docs/accuracy-results.jsonl",
                        help="JSON lines, resumable (the default one is committed: the tables' source)")
    parser.add_argument("--shard", default="0/1", help="K/N: run every N-th measurement from the K-th")
    parser.add_argument("--write", help="markdown file whose generated sections are replaced")
    parser.add_argument("--tables-only", action="store_true", help="measure nothing: tables from --results")
    parser.add_argument("--kinds", type=lambda text: tuple(text.split(",")), default=KINDS,
                        help=f"comma-separated measurements to run (default all: {','.join(KINDS)})")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy CPU)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    log, shard = ResultLog(Path(args.results)), Shard(args.shard)
    if not args.tables_only:
        run_all(args, log, shard)
    log = ResultLog(Path(args.results))  # what other shards finished meanwhile
    loaded_config = load_model(model_from_env(args.model), dtype="float32", device="cpu").config
    shape = {"num_layers": loaded_config.num_layers, "num_kv_heads": loaded_config.num_kv_heads,
             "head_dim": loaded_config.head_dim}
    tables = sections(args, log, Path(model_from_env(args.model)).name, shape)
    for title, body in tables.items():
        print(f"\n## {title}\n\n{body}")
        if args.write and (shard.count == 1 or args.tables_only):
            write_section(args.write, title, body)


if __name__ == "__main__":
    main()
