"""cpu_ops.py against reference.py: the fast CPU attention computes what the reference computes.

Odd shapes throughout: 1, 17 and 130-token sequences (partial pages and partial token groups, a sequence with
no filled page), one-token decodes, chunks and whole prompts, GQA 3:1, 4:1 and 1:1, head_dim 16/64/128,
2/4/8 bits, K codes of their own width (key_bits 4/8 over 2-bit V), token scales, sinks 0/4, pages of two partitions, both ablations off; poisoned pages and garbage block-table
padding (a read of anything unwritten shows); prefill in many small query blocks; the routing through
ops.dispatch.
"""
from __future__ import annotations

import pytest
import torch

from common.kv import cpu_ops, ops, reference, torch_fast
from common.kv.config import KVConfig
from common.kv.format import pack_codes
from tests.common.kv.test_torch_fast import compressed_args, new_token_counts
from tests.common.kv.triton_support import Tolerance, assert_attention_close

# float32 rounding of the same sums taken over channels in the codes' order (torch_fast's FP32 bound, with room
# for the permuted reduction order at head_dim 128)
FP32 = Tolerance(max=1e-5, p99=2e-6, mean=3e-7)
# One P code on a rounding boundary may take the neighbouring code, moving its row's output by up to
# max(P)/255 x |v| (|v| up to ~4 here). The scores here are fp32 throughout (the reference adds its corrections
# in float64), so such flips are a few per test rather than rare: over 40 random batches of the first case the
# worst errors were max 7.6e-3, p99 4.5e-4, mean 1.3e-5. A wrong correction term, page or mask is off by ~1e-3
# on average (the homomorphic values differ from the dequantized ones by ~2e-3), far above these bounds.
HACK = Tolerance(max=2e-2, p99=1e-3, mean=5e-5)
# With token scales P is quantized as P times each token's 2^e (format.py), so one flipped P code moves a row by up
# to 2^(e_max - e) times more, e_max the group's largest V exponent: up to 4x here (V's rows of randn have
# exponents 0..2). The same flips, bounds widened by that factor.
HACK_SCALED = Tolerance(max=8e-2, p99=4e-3, mean=2e-4)


def hack_tolerance(config: KVConfig, tolerance: Tolerance = HACK) -> Tolerance:
    """The bound for hack attention against the reference: HACK, or HACK_SCALED with token scales."""
    return HACK_SCALED if config.token_scales and tolerance is HACK else tolerance

CASES = [
    # config, KV heads, query heads per KV head, head_dim, sequence lengths
    pytest.param(KVConfig(partition=64), 2, 3, 128, [1, 17, 130], id="gqa3-d128-2bit"),
    pytest.param(KVConfig(partition=32, bits=4, num_sinks=0, sum_elimination=False), 3, 3, 64, [17, 1, 70],
                 id="gqa3-d64-4bit-no-sums-no-sinks"),
    pytest.param(KVConfig(partition=32, bits=8, requant_elimination=False), 1, 4, 16, [130, 17, 1],
                 id="gqa4-d16-8bit-requant"),
    pytest.param(KVConfig(partition=32, block_size=64), 3, 1, 16, [17, 130, 1], id="gqa1-d16-pages-of-two-groups"),
    pytest.param(KVConfig(partition=32, key_bits=4), 1, 3, 64, [17, 130, 1], id="gqa3-d64-k4-v2"),
    pytest.param(KVConfig(partition=64, key_bits=8, num_sinks=0), 2, 3, 128, [130, 1, 17], id="gqa3-d128-k8-v2"),
    pytest.param(KVConfig(partition=32, window=16, token_scales=True), 1, 3, 64, [17, 130, 1],
                 id="gqa3-d64-token-scales"),
]
# hack attention runs the C products where they build (test_native.py); "hack-torch" checks its torch ops too
OPS = [pytest.param("hack_attention", HACK, id="hack"), pytest.param("hack_attention-torch", HACK, id="hack-torch"),
       pytest.param("dequant_attention", FP32, id="dequant")]
FORWARDS = {
    "decode": lambda lens: [1] * len(lens),
    "chunks": new_token_counts,
    "prompts": lambda lens: list(lens),
}


@pytest.mark.parametrize("op, tolerance", OPS)
@pytest.mark.parametrize("config, num_kv_heads, group, head_dim, seq_lens", CASES)
@pytest.mark.parametrize("forward", sorted(FORWARDS))
def test_attention_matches_reference(monkeypatch, op, tolerance, config, num_kv_heads, group, head_dim, seq_lens,
                                     forward):
    fast, expected = _ops(monkeypatch, op)
    args = compressed_args(config, num_kv_heads, group, head_dim, seq_lens, FORWARDS[forward](seq_lens))
    out = fast(*args)
    assert out.shape == args[0].shape and out.dtype == args[0].dtype
    assert_attention_close(out, expected(*args), hack_tolerance(config, tolerance))


def _ops(monkeypatch, op: str):
    """(cpu_ops' op, the reference's) for an OPS name; "-torch" keeps hack attention off the C products."""
    name = op.removesuffix("-torch")
    if op.endswith("-torch"):
        monkeypatch.setattr(cpu_ops, "native_ok", lambda *_: False)
    return getattr(cpu_ops, name), getattr(reference, name)


@pytest.mark.parametrize("op, tolerance", OPS)
def test_small_blocks_and_chunks_match_reference(monkeypatch, op, tolerance):
    """Prefill in blocks of a few queries (causal group skipping at every block) and decode one sequence per
    chunk give the reference's values."""
    monkeypatch.setattr(cpu_ops, "BLOCK_ELEMENTS", 1)
    monkeypatch.setattr(cpu_ops, "CHUNK_CODES", 1)
    seq_lens = [130, 1, 17, 64]
    fast, expected = _ops(monkeypatch, op)
    for counts in (new_token_counts(seq_lens), [1] * 4):
        config = KVConfig(partition=32, num_sinks=4)
        args = compressed_args(config, 1, 3, 64, seq_lens, counts)
        assert_attention_close(fast(*args), expected(*args), hack_tolerance(config, tolerance))


def test_hack_path_never_dequantizes(monkeypatch):
    """hack scales V's codes by V's scale (the product's left factor) but never adds minimums to codes."""
    def forbidden(*_):
        raise AssertionError("hack attention dequantized the cache")

    scale_groups = cpu_ops._scale_groups

    def scale_only(codes, scale, minimum):
        assert minimum is None, "hack attention dequantized the cache"
        return scale_groups(codes, scale, minimum)

    monkeypatch.setattr(cpu_ops, "_scale_groups", scale_only)
    monkeypatch.setattr(reference, "dequantize_paged", forbidden)
    args = compressed_args(KVConfig(partition=32), 2, 2, 64, [40, 3], [1, 1])
    assert cpu_ops.hack_attention(*args).isfinite().all()


def test_token_axis_runs_the_batched_torch_ops():
    args = compressed_args(KVConfig(partition=32, key_axis="token"), 1, 3, 64, [17, 40], [1, 1])
    assert torch.equal(cpu_ops.hack_attention(*args), torch_fast.hack_attention(*args))


@pytest.mark.parametrize("bits, head_dim, parts", [(2, 128, 2), (2, 64, 1), (4, 64, 2), (2, 16, 1), (8, 16, 1),
                                                   (2, 8, 1), (4, 8, 1)])
def test_unpack_bytes_follows_channel_order(bits, head_dim, parts):
    codes = torch.randint(0, 2**bits, (3, 5, head_dim), dtype=torch.uint8)
    unpacked = cpu_ops.unpack_bytes(pack_codes(codes, bits), bits, parts)
    order, inverse = cpu_ops.channel_order(head_dim, bits, parts)
    assert torch.equal(unpacked, codes[..., order]) and torch.equal(unpacked[..., inverse], codes)
    partition = head_dim // parts  # the order stays within head_dim partitions
    assert torch.equal(order.view(parts, partition) // partition, torch.arange(parts)[:, None].expand(-1, partition))


def test_quantize_u8_matches_reference():
    """The reference's codes (shifted by 128) and values; a value within rounding of a half step may differ by
    one code (here: the same codes)."""
    x = torch.randn(4, 7, 64) * torch.rand(4, 7, 1)
    x[0, 0] = 0.5  # a constant partition: scale 0
    expected = reference.quantize_int8(x)
    codes, scale, minimum = cpu_ops.quantize_u8_(x.clone())
    differ = (codes - 128 - expected.codes.float()).abs()
    assert differ.max() == 0
    assert torch.equal(scale, expected.scale)
    assert torch.allclose(minimum + 128 * scale, expected.minimum)
    assert torch.allclose(codes * scale[..., None] + minimum[..., None], x, atol=float(scale.max()) / 2 + 1e-6)


def test_dispatch_routes_compressed_attention_to_cpu_ops(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("HACK_KV_OPS", raising=False)
    cpu = torch.device("cpu")
    assert ops.dispatch("hack_attention", cpu) is cpu_ops.hack_attention
    assert ops.dispatch("dequant_attention", cpu) is cpu_ops.dequant_attention
    monkeypatch.setenv("HACK_KV_OPS", "reference")
    assert ops.dispatch("hack_attention", cpu) is reference.hack_attention
