"""Attention-output error of each KV configuration at a real model's head shape.

    python -m common.eval.attention_error [--head-dim 128 --tokens 1024 --outlier-channels 4 --sink-tokens 1]

stories260K has head_dim 8, too small to judge partitions along head_dim. Here K and V of
Llama-like shape are synthesised with the statistics that matter for KV quantization: keys
have a few outlier channels (large magnitude and offset, as KIVI and KVQuant measured on
Llama), values are well-behaved; --sink-tokens makes the first tokens attention sinks, as in
real LLMs. Every configuration runs the real backend (prefill, then decode steps) and is
compared with float attention on the original K/V; the relative error is
||out - ref|| / ||ref|| over the decode outputs. Prints a markdown table and a JSON line.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch

from common.config import ModelConfig
from common.kv.options import kv_flags
from common.kv.config import PAPER_SETTING, KVConfig
from common.kv.factory import make_kv_backend
from common.kv.float_backend import FloatKVBackend
from common.kv.interface import ForwardBatch, KVBackend


def synthetic_qkv(tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, outliers: int,
                  generator: torch.Generator, sink_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k and v [T, Hkv, D]; k has `outliers` channels per head 10x larger with an offset.

    With sink_tokens, the first tokens are attention sinks as in real LLMs (StreamingLLM, Xiao et al. 2023):
    every query shares a direction along which their keys are long (norm 48), so they draw ~40% of the
    attention at head_dim 128, and their values are small.
    """
    q = torch.randn(tokens, num_heads, head_dim, generator=generator)
    k = torch.randn(tokens, num_kv_heads, head_dim, generator=generator)
    channels = torch.randperm(head_dim, generator=generator)[:outliers]
    k[:, :, channels] = k[:, :, channels] * 10 + 5
    v = torch.randn(tokens, num_kv_heads, head_dim, generator=generator)
    if sink_tokens:
        direction = torch.randn(head_dim, generator=generator)
        direction /= direction.norm()
        q += 2 * direction
        k[:sink_tokens] = 48 * direction
        v[:sink_tokens] *= 0.1
    return q, k, v


def run_backend(backend: KVBackend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prompt: int) -> torch.Tensor:
    """Prefill `prompt` tokens, then decode the rest one by one; returns the decode outputs."""
    batch = ForwardBatch.build([0], [0], [prompt])
    backend.reserve(batch)
    backend.attend(0, q[:prompt], k[:prompt], v[:prompt], batch)
    outputs = []
    for position in range(prompt, q.shape[0]):
        batch = ForwardBatch.build([0], [position], [1])
        backend.reserve(batch)
        rows = slice(position, position + 1)
        outputs.append(backend.attend(0, q[rows], k[rows], v[rows], batch))
    backend.free(0)
    return torch.cat(outputs)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def configurations(bits: list[int], partitions: list[int]) -> list[KVConfig]:
    """fp16, then the paper's format (config.PAPER_SETTING: no window hiding the codes) at each bits x Π x key axis."""
    configs = [KVConfig(mode="fp16")]
    for mode, b, p, axis in itertools.product(("dequant", "hack"), bits, partitions, ("token", "channel")):
        configs.append(KVConfig(mode=mode, bits=b, partition=p, key_axis=axis, **PAPER_SETTING))
    return configs


def synthetic_model(num_heads: int, num_kv_heads: int, head_dim: int, tokens: int) -> ModelConfig:
    """A one-layer attention shape for the backends (only the attention fields matter)."""
    return ModelConfig("LlamaForCausalLM", vocab_size=8, hidden_size=num_heads * head_dim, intermediate_size=8,
                       num_layers=1, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                       max_position_embeddings=tokens)


def attention_errors(configs: list[KVConfig], model: ModelConfig, q: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor, prompt: int) -> list[dict]:
    """Relative error vs float attention of each configuration's decode outputs (after a `prompt`-token prefill)."""
    reference = run_backend(FloatKVBackend.for_model(model), q, k, v, prompt)
    results = []
    for config in configs:
        backend = make_kv_backend(config, model, device="cpu", dtype=torch.float32, max_seqs=1,
                                  max_tokens=q.shape[0])
        error = relative_error(run_backend(backend, q, k, v, prompt), reference)
        results.append(result_row(config, error))
    return results


def result_row(config: KVConfig, error: float) -> dict:
    """One table row: the main fields, any other non-default flags, and the error."""
    compressed = config.compressed
    other = kv_flags(config, leave_out=("--kv-mode", "--bits", "--partition", "--key-axis"))
    return {"mode": config.mode, "bits": config.bits if compressed else 16,
            "partition": config.partition if compressed else "-", "key_axis": config.key_axis if compressed else "-",
            "other": " ".join(other), "error": error}


def markdown_table(results: list[dict]) -> str:
    rows = ["| mode | bits | Π | key axis | other flags | rel. error vs float |", "|---|---|---|---|---|---|"]
    rows += [f"| {r['mode']} | {r['bits']} | {r['partition']} | {r['key_axis']} | {r['other'] or '-'} "
             f"| {r['error']:.4f} |" for r in results]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.eval.attention_error", description=__doc__.splitlines()[0])
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-kv-heads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=512, help="prompt tokens (prefilled)")
    parser.add_argument("--decode-steps", type=int, default=64, help="decode steps measured after the prompt")
    parser.add_argument("--outlier-channels", type=int, default=4, help="outlier key channels per head")
    parser.add_argument("--sink-tokens", type=int, default=0, help="first tokens made attention sinks")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--partitions", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        for name in ("head_dim", "num_heads", "num_kv_heads", "tokens", "decode_steps"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if not 0 <= args.outlier_channels <= args.head_dim:
            raise ValueError(f"--outlier-channels must be in [0, {args.head_dim}], got {args.outlier_channels}")
        if not 0 <= args.sink_tokens <= args.tokens:
            raise ValueError(f"--sink-tokens must be in [0, --tokens={args.tokens}], got {args.sink_tokens}")
        total = args.tokens + args.decode_steps
        model = synthetic_model(args.num_heads, args.num_kv_heads, args.head_dim, total)
        configs = configurations(args.bits, args.partitions)
        q, k, v = synthetic_qkv(total, args.num_heads, args.num_kv_heads, args.head_dim, args.outlier_channels,
                                torch.Generator().manual_seed(args.seed), args.sink_tokens)
        results = attention_errors(configs, model, q, k, v, args.tokens)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(markdown_table(results))
    print(json.dumps({"head_dim": args.head_dim, "tokens": args.tokens, "decode_steps": args.decode_steps,
                      "outlier_channels": args.outlier_channels, "sink_tokens": args.sink_tokens,
                      "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
