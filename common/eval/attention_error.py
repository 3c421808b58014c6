"""Attention-output error of each KV configuration at a real model's head shape.

    python -m common.eval.attention_error [--head-dim 128 --tokens 1024 --outlier-channels 4]

stories260K has head_dim 8, too small to judge partitions along head_dim. Here K and V of
Llama-like shape are synthesised with the statistics that matter for KV quantization: keys
have a few outlier channels (large magnitude and offset, as KIVI and KVQuant measured on
Llama), values are well-behaved. Every configuration runs the real backend (prefill, then
decode steps) and is compared with float attention on the original K/V; the relative error
is ||out - ref|| / ||ref|| over the decode outputs. Prints a markdown table and a JSON line.
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch

from common.config import ModelConfig
from common.kv.config import KVConfig
from common.kv.factory import make_kv_backend
from common.kv.float_backend import FloatKVBackend
from common.kv.interface import ForwardBatch, KVBackend


def synthetic_qkv(tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, outliers: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k and v [T, Hkv, D]; k has `outliers` channels per head 10x larger with an offset."""
    q = torch.randn(tokens, num_heads, head_dim, generator=generator)
    k = torch.randn(tokens, num_kv_heads, head_dim, generator=generator)
    channels = torch.randperm(head_dim, generator=generator)[:outliers]
    k[:, :, channels] = k[:, :, channels] * 10 + 5
    v = torch.randn(tokens, num_kv_heads, head_dim, generator=generator)
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
    configs = [KVConfig(mode="fp16")]
    for mode, b, p, axis in itertools.product(("dequant", "hack"), bits, partitions, ("token", "channel")):
        configs.append(KVConfig(mode=mode, bits=b, partition=p, key_axis=axis))
    return configs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m common.eval.attention_error", description=__doc__.splitlines()[0])
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-kv-heads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--outlier-channels", type=int, default=4)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--partitions", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model = ModelConfig("LlamaForCausalLM", vocab_size=8, hidden_size=args.num_heads * args.head_dim,
                        intermediate_size=8, num_layers=1, num_heads=args.num_heads,
                        num_kv_heads=args.num_kv_heads, head_dim=args.head_dim,
                        max_position_embeddings=args.tokens + args.decode_steps)
    q, k, v = synthetic_qkv(args.tokens + args.decode_steps, args.num_heads, args.num_kv_heads, args.head_dim,
                            args.outlier_channels, torch.Generator().manual_seed(args.seed))
    reference = run_backend(FloatKVBackend.for_model(model), q, k, v, args.tokens)
    rows = ["| mode | bits | Π | key axis | rel. error vs float |", "|---|---|---|---|---|"]
    results = []
    for config in configurations(args.bits, args.partitions):
        backend = make_kv_backend(config, model, device="cpu", dtype=torch.float32, max_seqs=1,
                                  max_tokens=args.tokens + args.decode_steps)
        error = relative_error(run_backend(backend, q, k, v, args.tokens), reference)
        axis = config.key_axis if config.compressed else "-"
        bits = config.bits if config.compressed else 16
        partition = config.partition if config.compressed else "-"
        rows.append(f"| {config.mode} | {bits} | {partition} | {axis} | {error:.4f} |")
        results.append({"mode": config.mode, "bits": bits, "partition": partition, "key_axis": axis, "error": error})
    print("\n".join(rows))
    print(json.dumps({"head_dim": args.head_dim, "tokens": args.tokens, "results": results}))


if __name__ == "__main__":
    main()
