"""The one seam between the KV backends and their compute: which implementation runs an op on which tensors.

Backends never call reference.py or a kernel directly; they ask `dispatch(name, device)` for an op, and every
op keeps the signature of its torch reference in reference.py. Routing:
  * CUDA tensors run the Triton kernels for the ops that have one:
      store_compressed_kv  triton_quantize_append (quantize-and-append, tail flush)
      hack_attention       triton_decode_attention when every sequence brings one query (decode), else
                           triton_prefill_attention (prefill, chunked prefill, mixed batches)
      dequant_attention    triton_dequant_decode for decode, else triton_dequant_prefill
  * CPU tensors run the vectorized torch versions: cpu_ops.py for hack_attention and dequant_attention (codes
    unpacked from packed words, exact integer products as batched float32 matmuls, query-blocked prefill),
    torch_fast.py for store_fp16_kv, store_compressed_kv and fp16_attention (and the attention of
    configurations cpu_ops does not serve), unless TRITON_INTERPRET=1 is set when the op is dispatched: then the
    same Triton kernels run in Triton's interpreter (how the tests check them without a GPU). CUDA tensors run
    torch_fast.py's fp16-mode ops (the uncompressed baseline has no kernel).
  * What the kernels do not implement (head_dim not a power of two >= 8; in the append only: stochastic
    rounding, clipped ranges, a 16-bit recent window, token scales) falls back to the vectorized torch ops of torch_fast.py
    (any device) with a one-time warning, so a configuration never fails for lack of a kernel. The attention
    kernels read the window (a tail of Π + window rows); rotation happens outside the ops.
Everything else (causal_attention, dequantize_sequence) runs the reference, the
ground truth all others are tested against; HACK_KV_OPS=reference routes every op there (e.g. to check a run
end to end). `register` overrides any route for a device type, keeping the reference signature.
"""
from __future__ import annotations

import logging
import os
from typing import Callable

import torch

from common.kv import cpu_ops, reference, torch_fast
from common.kv.config import KVConfig

OPS: tuple[str, ...] = (
    "store_fp16_kv",
    "store_compressed_kv",
    "hack_attention",
    "dequant_attention",
    "fp16_attention",
    "causal_attention",
    "dequantize_sequence",
)

IMPLEMENTATIONS: tuple[str, ...] = ("auto", "reference")  # values of HACK_KV_OPS
log = logging.getLogger(__name__)
_registered: dict[tuple[str, str], Callable] = {}
_warned: set[tuple[str, str]] = set()


def register(device_type: str, name: str, fn: Callable) -> None:
    """Route op `name` on tensors of `device_type` ("cuda", ...) to fn (same signature as reference.<name>)."""
    _check_name(name)
    _registered[(device_type, name)] = fn


def dispatch(name: str, device: torch.device) -> Callable:
    _check_name(name)
    if (device.type, name) in _registered:
        return _registered[(device.type, name)]
    if reference_forced():
        return getattr(reference, name)
    if name in TRITON_OPS and (device.type == "cuda" or (device.type == "cpu" and triton_interpreted())):
        return TRITON_OPS[name]
    return TORCH_OPS.get((device.type, name), getattr(reference, name))


def reference_forced() -> bool:
    """Whether HACK_KV_OPS=reference sends every op to the torch reference (default "auto": fastest route)."""
    value = os.environ.get("HACK_KV_OPS", "auto")
    if value not in IMPLEMENTATIONS:
        raise ValueError(f"HACK_KV_OPS must be one of {IMPLEMENTATIONS}, got {value!r}")
    return value == "reference"


def triton_interpreted() -> bool:
    """Whether CPU tensors go to the Triton kernels, run by Triton's interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_gap(config: KVConfig, head_dim: int) -> str | None:
    """Why the Triton attention kernels cannot serve this configuration, or None when they can."""
    if head_dim < 8 or head_dim & (head_dim - 1):
        return f"head_dim={head_dim} is not a power of two >= 8"
    return None


def store_kernel_gap(config: KVConfig, head_dim: int) -> str | None:
    """Why the Triton quantize-append kernel cannot store this configuration, or None when it can."""
    if gap := kernel_gap(config, head_dim):
        return gap
    if config.window:
        return "the append kernel flushes a tail of one partition (window=0)"
    if config.rounding != "nearest":
        return "stochastic rounding replays a torch.Generator"
    if config.ranges != "minmax":
        return "the kernel quantizes to each partition's min/max (ranges=minmax)"
    if config.token_scales:
        return "the kernel stores no token scales (token_scales off)"
    return None


def triton_store_compressed_kv(k: torch.Tensor, v: torch.Tensor, cu_new: torch.Tensor, num_cached: torch.Tensor,
                               block_tables: torch.Tensor, state_slots: torch.Tensor, cache: reference.Cache,
                               config: KVConfig, generator: torch.Generator | None = None) -> None:
    args = (k, v, cu_new, num_cached, block_tables, state_slots, cache, config, generator)
    gap = store_kernel_gap(config, k.shape[-1])
    if gap is not None:
        _warn_fallback("store_compressed_kv", gap)
        return torch_fast.store_compressed_kv(*args)
    from common.kv.triton_quantize_append import quantize_append

    quantize_append(*args)


def triton_hack_attention(q: torch.Tensor, cu_q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                          state_slots: torch.Tensor, cache: reference.Cache, config: KVConfig,
                          softmax_scale: float) -> torch.Tensor:
    gap = kernel_gap(config, q.shape[-1])
    if gap is not None:
        _warn_fallback("hack_attention", gap)
        return torch_fast.hack_attention(q, cu_q, seq_lens, block_tables, state_slots, cache, config, softmax_scale)
    if _is_decode(q, seq_lens):
        from common.kv.triton_decode_attention import hack_decode_attention

        return hack_decode_attention(q, seq_lens, block_tables, state_slots, cache, config, softmax_scale)
    from common.kv.triton_prefill_attention import hack_prefill_attention

    return hack_prefill_attention(q, cu_q, seq_lens, block_tables, state_slots, cache, config, softmax_scale)


def triton_dequant_attention(q: torch.Tensor, cu_q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                             state_slots: torch.Tensor, cache: reference.Cache, config: KVConfig,
                             softmax_scale: float) -> torch.Tensor:
    gap = kernel_gap(config, q.shape[-1])
    if gap is not None:
        _warn_fallback("dequant_attention", gap)
        return torch_fast.dequant_attention(q, cu_q, seq_lens, block_tables, state_slots, cache, config,
                                            softmax_scale)
    if _is_decode(q, seq_lens):
        from common.kv.triton_dequant_decode import dequant_decode_attention

        return dequant_decode_attention(q, seq_lens, block_tables, state_slots, cache, config, softmax_scale)
    from common.kv.triton_dequant_prefill import dequant_prefill_attention

    return dequant_prefill_attention(q, cu_q, seq_lens, block_tables, state_slots, cache, config, softmax_scale)


TRITON_OPS: dict[str, Callable] = {
    "store_compressed_kv": triton_store_compressed_kv,
    "hack_attention": triton_hack_attention,
    "dequant_attention": triton_dequant_attention,
}


# (device type, op) -> vectorized torch version, for what has no Triton kernel on that device
TORCH_OPS: dict[tuple[str, str], Callable] = {
    ("cpu", "store_fp16_kv"): torch_fast.store_fp16_kv,
    ("cpu", "store_compressed_kv"): torch_fast.store_compressed_kv,
    ("cpu", "fp16_attention"): torch_fast.fp16_attention,
    ("cpu", "hack_attention"): cpu_ops.hack_attention,
    ("cpu", "dequant_attention"): cpu_ops.dequant_attention,
    ("cuda", "store_fp16_kv"): torch_fast.store_fp16_kv,
    ("cuda", "fp16_attention"): torch_fast.fp16_attention,
}


def _is_decode(q: torch.Tensor, seq_lens: torch.Tensor) -> bool:
    """One query per sequence: every sequence of a batch brings at least one token, so T == B means all one."""
    return q.shape[0] == seq_lens.shape[0]


def _check_name(name: str) -> None:
    if name not in OPS:
        raise ValueError(f"unknown KV op {name!r}; ops are {OPS}")


def _warn_fallback(name: str, reason: str) -> None:
    if (name, reason) not in _warned:
        _warned.add((name, reason))
        log.warning("KV op %s falls back to the torch ops (no kernel): %s", name, reason)
