"""native.py's compiled decode kernels against reference.py, and what happens where they cannot be built.

The cases keep tokens on the pages (window 0 or 16): 1, 17, 130 and 200-token sequences (partial pages, partial
token groups, a sequence with no filled page), GQA 3:1, 4:1 and 1:1, head_dim 16/64/128, 2/4/8 bits, K codes of
their own width (key_bits 4 and 8 over 2-bit V), token scales, sinks 0/4, pages of two partitions, sums stored or not;
poisoned pools and garbage block-table padding (compressed_args).
"""
from __future__ import annotations

import logging

import pytest
import torch

from common.kv import cpu_ops, native, reference
from common.kv.config import KVConfig
from tests.common.kv.test_cpu_ops import FORWARDS, hack_tolerance
from tests.common.kv.test_torch_fast import compressed_args
from tests.common.kv.triton_support import Tolerance, assert_attention_close

needs_native = pytest.mark.skipif(native.library() is None, reason="no C compiler here: the native kernels "
                                  "cannot be built (cpu_ops runs its torch ops)")

CASES = [
    pytest.param(KVConfig(partition=64, window=0), 2, 3, 128, [1, 17, 130, 150], id="gqa3-d128-2bit"),
    pytest.param(KVConfig(partition=64, window=16), 3, 3, 64, [150, 17, 1, 81], id="gqa3-d64-window16"),
    pytest.param(KVConfig(window=16), 1, 3, 64, [300, 17, 1], id="default-partition-gqa3-d64"),
    pytest.param(KVConfig(partition=32, bits=4, num_sinks=0, sum_elimination=False, window=0), 3, 3, 64,
                 [17, 1, 70], id="gqa3-d64-4bit-no-sums-no-sinks"),
    pytest.param(KVConfig(partition=32, bits=8, window=0), 1, 4, 16, [130, 17, 1], id="gqa4-d16-8bit"),
    pytest.param(KVConfig(partition=32, block_size=64, window=0), 3, 1, 16, [17, 130, 1],
                 id="gqa1-d16-pages-of-two-groups"),
    pytest.param(KVConfig(key_bits=4, window=16), 2, 3, 64, [300, 17, 1, 150], id="k4-v2-gqa3-d64"),
    pytest.param(KVConfig(partition=64, key_bits=4, window=0), 1, 3, 128, [130, 1, 17], id="k4-v2-gqa3-d128"),
    pytest.param(KVConfig(partition=32, key_bits=8, num_sinks=0, window=0), 3, 1, 16, [17, 1, 70],
                 id="k8-v2-gqa1-d16-portable-loops"),
    pytest.param(KVConfig(token_scales=True, window=16), 2, 3, 64, [300, 17, 1, 150], id="token-scales-gqa3-d64"),
    pytest.param(KVConfig(partition=64, token_scales=True, key_bits=4, window=0), 1, 3, 128, [130, 1, 17],
                 id="token-scales-k4-d128"),
]


@needs_native
@pytest.mark.parametrize("config, num_kv_heads, group, head_dim, seq_lens", CASES)
@pytest.mark.parametrize("forward, threads", [("decode", 1), ("decode", 2), ("chunks", 2), ("prompts", 1)])
def test_native_attention_matches_reference(config, num_kv_heads, group, head_dim, seq_lens, forward, threads):
    """Decode (one query per sequence) and prefill (chunks, whole prompts) with the paged products in C."""
    args = compressed_args(config, num_kv_heads, group, head_dim, seq_lens, FORWARDS[forward](seq_lens))
    before = [t.clone() for t in args[:5]]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert cpu_ops.native_ok(config, head_dim)
        out = cpu_ops.hack_attention(*args)
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(a, b) for a, b in zip(args[:5], before)), "the op wrote into its inputs"
    assert out.shape == args[0].shape and out.dtype == args[0].dtype
    assert_attention_close(out, reference.hack_attention(*args), hack_tolerance(config))


@needs_native
def test_vnni_paths_by_code_width():
    """q·k reads 2- and 4-bit codes with VNNI, P·V 2-bit codes; 8-bit codes and head_dim 16 take the portable
    loops (where the CPU has no VNNI, everything does)."""
    def paths(bits: int, head_dim: int) -> tuple[bool, bool]:
        return native.uses_vnni(native.Geometry(3, head_dim, bits, 128, min(64, head_dim), 256, 3, 4, 0))

    vnni = paths(2, 64)[0]
    assert paths(2, 64) == (vnni, vnni)
    assert paths(4, 128) == (vnni, False)
    assert paths(8, 64) == (False, False) and paths(2, 16) == (False, False)


@needs_native
def test_native_prefill_in_small_blocks(monkeypatch):
    """Prefill in blocks of a few queries: each block's products stop at the groups its last query sees."""
    monkeypatch.setattr(cpu_ops, "BLOCK_ELEMENTS", 1)
    seq_lens = [130, 1, 17, 64]
    config = KVConfig(partition=32, window=0)
    args = compressed_args(config, 1, 3, 64, seq_lens, seq_lens)
    assert_attention_close(cpu_ops.hack_attention(*args), reference.hack_attention(*args), hack_tolerance(config))


@needs_native
def test_native_decode_serves_bf16_queries():
    args = compressed_args(KVConfig(partition=64, window=0), 1, 3, 64, [150, 1], [1, 1])
    out = cpu_ops.hack_attention(args[0].bfloat16(), *args[1:])
    assert out.dtype == torch.bfloat16
    expected = reference.hack_attention(args[0].bfloat16().float(), *args[1:]).bfloat16()
    assert_attention_close(out, expected, Tolerance(max=3e-2, p99=1.6e-2, mean=2e-3))  # bf16 outputs: 2^-8


def test_without_a_compiler_attention_runs_the_torch_ops(monkeypatch, caplog):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    native.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="common.kv.native"):
            assert native.library() is None
        assert "native CPU kernels unavailable" in caplog.text
        assert not cpu_ops.native_ok(KVConfig(window=0), 64)
        config = KVConfig(partition=64, window=0)
        args = compressed_args(config, 1, 3, 64, [150, 1], [1, 1])
        assert_attention_close(cpu_ops.hack_attention(*args), reference.hack_attention(*args), hack_tolerance(config))
    finally:
        native.library.cache_clear()


def test_hack_native_off_by_env(monkeypatch):
    monkeypatch.setenv("HACK_NATIVE", "0")
    native.library.cache_clear()
    try:
        assert native.library() is None
    finally:
        native.library.cache_clear()
