"""`make_kv_backend`: the one constructor the model runtime and the services use for KV storage."""
from __future__ import annotations

from typing import Protocol

import torch

from common.kv import native
from common.kv.backends import CompressedKVBackend, Fp16KVBackend, PagedKVBackend
from common.kv.config import KVConfig
from common.kv.format import KVLayout, float_dtype_for
from common.kv.pool import KVPool


class AttentionShape(Protocol):
    """What the factory needs from a model config (common.config.ModelConfig has it)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


def make_kv_backend(
    kv_config: KVConfig,
    model_config: AttentionShape,
    device: torch.device | str,
    dtype: torch.dtype,
    max_tokens: int | None = None,
    memory_bytes: int | None = None,
    max_seqs: int = 64,
    softmax_scale: float | None = None,
) -> PagedKVBackend:
    """A paged backend for kv_config.mode, sized by max_tokens (page capacity) or memory_bytes (pool budget).

    max_seqs bounds the sequences held at once (compressed modes reserve one 16-bit state slot each);
    softmax_scale defaults to head_dim ** -0.5. Uncompressed K/V are stored in `dtype` when it is 16-bit (bf16
    models keep bf16 K/V), else in fp16 (format.float_dtype_for).
    """
    if (max_tokens is None) == (memory_bytes is None):
        raise ValueError("give exactly one of max_tokens and memory_bytes")
    if model_config.num_heads % model_config.num_kv_heads:
        raise ValueError(
            f"num_heads={model_config.num_heads} is not a multiple of num_kv_heads={model_config.num_kv_heads}"
        )
    layout = KVLayout(kv_config, model_config.num_kv_heads, model_config.head_dim, float_dtype_for(dtype))
    if max_tokens is not None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        num_blocks = -(-max_tokens // kv_config.block_size)
    else:
        num_blocks = KVPool.blocks_for_budget(layout, model_config.num_layers, memory_bytes, max_seqs)
    pool = KVPool(layout, model_config.num_layers, num_blocks, max_seqs, device)
    if kv_config.mode == "hack" and torch.device(device).type == "cpu":
        native.library()  # build the C kernels now (about a second, once per machine), not in the first request
    backend_class = Fp16KVBackend if kv_config.mode == "fp16" else CompressedKVBackend
    return backend_class(pool, dtype, softmax_scale)
