"""Triton quantize-and-append against reference.store_compressed_kv: the same bytes in every pool tensor.

Each case appends several calls per sequence (prefill of mixed lengths, a decode step, a chunk that flushes the
open tail) into a poisoned pool on shuffled pages, so unwritten, misplaced or extra writes all show.
"""
from __future__ import annotations

import pytest
import torch

from common.kv import reference
from common.kv.config import PAPER_SETTING, KVConfig
from common.kv.format import KVLayout, float_dtype_for
from common.kv.pool import KVPool
from tests.common.kv.triton_support import DEVICE, cumulative, fresh_seed, import_kernels, interpret, poison

append = import_kernels("triton_quantize_append")
pytestmark = pytest.mark.usefixtures(interpret.__name__)

CASES = [
    # config, KV heads, head_dim, new tokens of each sequence in each call, input dtype
    pytest.param(KVConfig(**PAPER_SETTING, partition=32, block_size=64, key_axis="token", num_sinks=0), 2, 64,
                 [[1, 17, 130], [1, 1, 1], [40, 15, 33]],
                 torch.float32, id="token-axis-2bit"),
    pytest.param(KVConfig(**PAPER_SETTING, partition=32, bits=4, key_axis="channel", num_sinks=4, requant_elimination=False), 1, 128,
                 [[3, 17, 70], [1, 1, 1], [30, 1, 47]], torch.bfloat16, id="channel-axis-4bit-sinks-requant"),
    pytest.param(KVConfig(**PAPER_SETTING, partition=64, bits=8, key_axis="token", num_sinks=1, sum_elimination=False, block_size=128),
                 4, 64,
                 [[1, 65, 130], [64, 1, 63]], torch.float16, id="8bit-no-sums"),
    pytest.param(KVConfig(**PAPER_SETTING, partition=32, key_bits=4, num_sinks=4), 1, 32,
                 [[3, 17, 70], [1, 1, 1]], torch.float32, id="channel-axis-k4-v2"),
    pytest.param(KVConfig(**PAPER_SETTING, partition=32, key_axis="token", key_bits=8, num_sinks=0), 2, 32,
                 [[1, 17, 40], [33, 1, 1]], torch.float32, id="token-axis-k8-v2"),
]


def _random_rows(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Gaussian rows with the awkward cases mixed in: a constant channel (scale 0 with key_axis="channel"),
    constant tokens (scale 0 per token) and tiny values (fp16 subnormals when rounding s and m outward)."""
    x = torch.randn(shape, generator=gen) * 2
    x[:, :, 0] = 0.5
    x[::7] = -1.25
    x[3::11] *= 1e-6
    return x.to(dtype)


def _strided(x: torch.Tensor) -> torch.Tensor:
    """The same values as a view with a padded token stride, as k and v are when sliced out of a fused qkv."""
    padded = torch.zeros(x.shape[0], x.shape[1] + 3, x.shape[2], dtype=x.dtype, device=x.device)
    padded[:, : x.shape[1]] = x
    return padded[:, : x.shape[1]]


@pytest.mark.parametrize("config, num_kv_heads, head_dim, steps, dtype", CASES)
def test_append_writes_the_reference_bytes(config, num_kv_heads, head_dim, steps, dtype):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    batch = len(steps[0])
    layout = KVLayout(config, num_kv_heads, head_dim, float_dtype_for(dtype))  # bf16 inputs: bf16 sinks and tail
    max_blocks = max(layout.blocks_for(sum(step[i] for step in steps)) for i in range(batch))
    num_blocks = batch * max_blocks + 2
    expected = KVPool(layout, 1, num_blocks, batch + 2).layers[0]
    poison(expected, gen)
    cache = {name: t.to(DEVICE) for name, t in expected.items()}
    block_tables = torch.randperm(num_blocks, generator=gen)[: batch * max_blocks].view(batch, max_blocks).int()
    state_slots = torch.randperm(batch + 2, generator=gen)[:batch]
    cached = torch.zeros(batch, dtype=torch.int64)
    for step in steps:
        cu_new = cumulative(step)
        k = _random_rows((int(cu_new[-1]), num_kv_heads, head_dim), gen, dtype)
        v = _random_rows((int(cu_new[-1]), num_kv_heads, head_dim), gen, dtype)
        reference.store_compressed_kv(k, v, cu_new, cached, block_tables, state_slots, expected, config)
        append.quantize_append(_strided(k.to(DEVICE)), _strided(v.to(DEVICE)), cu_new.to(DEVICE), cached.to(DEVICE),
                               block_tables.to(DEVICE), state_slots.to(DEVICE), cache, config)
        cached += torch.tensor(step)
        for name, t in expected.items():
            same = torch.equal(cache[name].cpu().view(torch.uint8), t.view(torch.uint8))
            assert same, f"{name} differs after appending {step} (seed {seed})"


def test_append_rejects_what_it_cannot_store():
    config = KVConfig(**PAPER_SETTING, partition=32)
    layout = KVLayout(config, 1, 64)
    cache = KVPool(layout, 1, 4, 2, DEVICE).layers[0]
    k = torch.randn(3, 1, 64, device=DEVICE)
    args = dict(cu_new=torch.tensor([0, 3], device=DEVICE), num_cached=torch.zeros(1, dtype=torch.int64, device=DEVICE),
                block_tables=torch.zeros(1, 2, dtype=torch.int32, device=DEVICE),
                state_slots=torch.zeros(1, dtype=torch.int64, device=DEVICE), cache=cache)
    with pytest.raises(ValueError, match="nearest rounding"):
        append.quantize_append(k, k, **args, config=KVConfig(**PAPER_SETTING, partition=32, rounding="stochastic"))
    with pytest.raises(ValueError, match="token scales"):
        append.quantize_append(k, k, **args, config=KVConfig(**(PAPER_SETTING | {"token_scales": True}), partition=32))
    with pytest.raises(ValueError, match="block_tables"):
        append.quantize_append(k, k, **(args | dict(block_tables=args["block_tables"].float())), config=config)
    with pytest.raises(ValueError, match="k_codes"):  # a pool built for another head_dim
        append.quantize_append(k[..., :32], k[..., :32], **args, config=config)
    with pytest.raises(ValueError, match="k_sums"):
        append.quantize_append(k, k, **(args | dict(cache={n: t for n, t in cache.items() if n != "k_sums"})),
                               config=config)
