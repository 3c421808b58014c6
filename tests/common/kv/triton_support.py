"""Shared by the Triton kernel tests: interpreted kernels on CPU, random paged caches, poisoning, tolerances.

Without a GPU the kernels run in Triton's interpreter. `@triton.jit` picks interpreter or compiler when a module
is imported, so `import_kernels` imports the kernel modules with TRITON_INTERPRET=1 set (re-importing them if
something compiled them for a GPU first), and the `interpret` fixture keeps the variable set while a test runs,
without leaking it into other tests (the backends' CPU tests must keep running the reference).
"""
from __future__ import annotations

import importlib
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Iterator, NamedTuple

import pytest
import torch

from common.kv import reference
from common.kv.config import KVConfig
from common.kv.format import KVLayout
from common.kv.pool import KVPool

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
KERNEL_PACKAGE = "common.kv"
KERNEL_MODULES = ("triton_helpers", "triton_tiles", "triton_quantize_append", "triton_decode_attention",
                  "triton_prefill_attention", "triton_dequant_decode", "triton_dequant_prefill")


class Tolerance(NamedTuple):
    """Bounds on |kernel - reference| over all outputs: the worst one, the 99th percentile and the mean."""

    max: float
    p99: float
    mean: float


# The homomorphic kernels quantize the same Q and P as the reference, but P unnormalized (online softmax) and
# in fp32 rather than fp64, so now and then a value sitting on a rounding boundary takes the neighbouring INT8
# code: that moves one probability by up to max(P)/255 and its row's output by up to about |v|/255. Everything
# else agrees to ~1e-6 in the interpreter, so its percentile and mean bounds are tight: any wrong correction
# term, page or mask breaks them (the homomorphic reference differs from the dequant baseline by ~2e-3 on
# average). On a GPU the 16-bit sinks and tail go through tf32 tensor cores, worth ~3e-4 at the 99th percentile.
HOMOMORPHIC = Tolerance(max=1e-2, p99=1e-3, mean=1e-4) if ON_GPU else Tolerance(max=1e-2, p99=1e-4, mean=2e-5)
# The dequant baseline attends in fp16 (q, dequantized K/V and P rounded to fp16, fp32 accumulation).
FP16_ATTENTION = Tolerance(max=1e-2, p99=3e-3, mean=3e-4)

@contextmanager
def interpreter_env() -> Iterator[None]:
    """TRITON_INTERPRET=1 inside the block on CPU (unchanged on a GPU machine)."""
    if ON_GPU:
        yield
        return
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


def import_kernels(name: str) -> ModuleType:
    """common.kv.<name> with interpreted kernels on CPU (compiled ones on a GPU)."""
    with interpreter_env():
        if not ON_GPU and not _interpreted(sys.modules.get(f"{KERNEL_PACKAGE}.triton_helpers")):
            for module in KERNEL_MODULES:
                sys.modules.pop(f"{KERNEL_PACKAGE}.{module}", None)
        module = importlib.import_module(f"{KERNEL_PACKAGE}.{name}")
    assert ON_GPU or _interpreted(sys.modules[f"{KERNEL_PACKAGE}.triton_helpers"]), "kernels are not interpreted"
    return module


def _interpreted(helpers: ModuleType | None) -> bool:
    return helpers is not None and type(helpers.round_half_even).__name__ == "InterpretedFunction"


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the test's kernel launches interpreted (on CPU); ops.dispatch then routes CPU tensors to Triton too."""
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@dataclass
class PagedBatch:
    """One layer's compressed cache holding a batch of sequences stored through the reference."""

    config: KVConfig
    cache: dict[str, torch.Tensor]
    seq_lens: torch.Tensor  # [B] int64
    block_tables: torch.Tensor  # [B, max_blocks] int32, shuffled pages
    state_slots: torch.Tensor  # [B] int64, shuffled slots


def poison(cache: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    """NaN in every float slot and random bytes in every code/sum slot, so a read of anything unwritten shows."""
    for t in cache.values():
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        else:
            t.copy_(torch.randint(0, 100, t.shape, generator=generator, dtype=t.dtype))


def random_batch(config: KVConfig, num_kv_heads: int, head_dim: int, seq_lens: list[int], seed: int,
                 k_scale: float = 1.0) -> tuple[PagedBatch, torch.Generator]:
    """A poisoned pool on shuffled pages and state slots with random K/V of seq_lens tokens stored by the
    reference (in one prefill per sequence). Returns the batch and a generator for further draws."""
    gen = torch.Generator().manual_seed(seed)
    layout = KVLayout(config, num_kv_heads, head_dim)
    batch, max_blocks = len(seq_lens), max(layout.blocks_for(n) for n in seq_lens)
    num_blocks, num_slots = batch * max_blocks + 3, batch + 2  # spare pages and slots stay poisoned
    cache = KVPool(layout, 1, num_blocks, num_slots).layers[0]
    poison(cache, gen)
    block_tables = torch.randperm(num_blocks, generator=gen)[: batch * max_blocks].view(batch, max_blocks).int()
    state_slots = torch.randperm(num_slots, generator=gen)[:batch]
    lens = torch.tensor(seq_lens)
    total = int(lens.sum())
    k = torch.randn(total, num_kv_heads, head_dim, generator=gen) * k_scale
    v = torch.randn(total, num_kv_heads, head_dim, generator=gen)
    reference.store_compressed_kv(k, v, cumulative(lens), torch.zeros(batch, dtype=torch.int64), block_tables,
                                  state_slots, cache, config)
    paged = PagedBatch(config, {n: t.to(DEVICE) for n, t in cache.items()}, lens.to(DEVICE),
                       block_tables.to(DEVICE), state_slots.to(DEVICE))
    return paged, gen


def cumulative(counts: torch.Tensor | list[int]) -> torch.Tensor:
    """[B] counts -> [B + 1] int64 offsets starting at 0."""
    counts = torch.as_tensor(counts, dtype=torch.int64)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def nan_like(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, float("nan"))


def assert_attention_close(out: torch.Tensor, expected: torch.Tensor, tolerance: Tolerance,
                           seed: int | None = None) -> None:
    """Every output written (no poison left) and within `tolerance` of the reference; a failure names the seed
    of the random inputs (fresh_seed), to replay it."""
    out, expected = out.float().cpu(), expected.float().cpu()
    replay = "" if seed is None else f" (seed {seed})"
    assert not out.isnan().any(), f"{int(out.isnan().sum())} outputs never written{replay}"
    error = (out - expected).abs().flatten()
    measured = Tolerance(float(error.max()), float(error.quantile(0.99)), float(error.mean()))
    for name, value, bound in zip(Tolerance._fields, measured, tolerance):
        assert value <= bound, f"{name} error {value:.2e} > {bound:.0e} ({measured}){replay}"

def fresh_seed() -> int:
    """A new seed every run (fresh random inputs); tests put it in their failure messages to replay a run."""
    return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
