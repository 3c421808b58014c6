"""Triton quantize-and-append: new K/V rows into HACK pages, sinks and the 16-bit open tail.

Same arguments and the same bytes as `reference.store_compressed_kv` (nearest rounding): the first num_sinks
positions of a sequence go to its sinks; the rest stream through the open tail, and every partition of Π tokens
that fills is quantized once into its page slots (codes, fp16 scales/minimums rounded outward, code sums).

One kernel, launched twice:
  * the FULL pass has one program per (filled token group, KV head, sequence). A group is read from the old
    tail and/or the new rows, quantized, and written to the page that the block table maps it to;
  * the OPEN pass has one program per (KV head, sequence): it writes the new sink tokens and the tokens left
    in the open partition, and with requant_elimination off also requantizes that partition into its pages.
The full pass reads the old tail that the open pass overwrites; two launches order them without any grid sync.
The grid is bounded from tensor shapes only (no device-to-host copy): programs past their sequence's filled
groups exit at once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from common.kv.config import KVConfig
from common.kv.triton_helpers import check_append_inputs, round_half_even, sum_tensors, tile_page

Cache = dict[str, torch.Tensor]


@triton.jit
def _fp16_outward(x, DOWN: tl.constexpr):
    """fp32 -> fp16 rounded toward -inf (DOWN) or +inf, like format._cast_toward: one ulp step when the
    round-to-nearest cast landed on the wrong side of x."""
    y = x.to(tl.float16)
    yf = y.to(tl.float32)
    bits = y.to(tl.int16, bitcast=True).to(tl.int32)
    if DOWN:
        wrong = yf > x
        step = tl.where(yf > 0, bits - 1, tl.where(yf < 0, bits + 1, -32767))  # -32767: 0x8001, -min subnormal
    else:
        wrong = yf < x
        step = tl.where(yf > 0, bits + 1, tl.where(yf < 0, bits - 1, 1))
    return tl.where(wrong, step, bits).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _quantize(x, lo, hi, LEVELS: tl.constexpr):
    """format.quantize given each partition's range: (codes int32, scale fp16, minimum fp16), bit-exact."""
    minimum = _fp16_outward(lo, DOWN=True)
    scale = _fp16_outward(tl.div_rn(hi - minimum.to(tl.float32), tl.full(hi.shape, LEVELS, tl.float32)), False)
    safe = tl.where(scale > 0, scale.to(tl.float32), 1.0)
    t = round_half_even(tl.div_rn(x - minimum.to(tl.float32), safe))
    return tl.minimum(tl.maximum(t, 0.0), LEVELS).to(tl.int32), scale, minimum


@triton.jit
def _quantize_per_channel(x, valid, LEVELS: tl.constexpr):
    """x [N, D] quantized per channel over the valid tokens: codes [N, D], scale/minimum [1, D]."""
    lo = tl.min(tl.where(valid[:, None], x, float("inf")), axis=0, keep_dims=True)
    hi = tl.max(tl.where(valid[:, None], x, float("-inf")), axis=0, keep_dims=True)
    codes, scale, minimum = _quantize(x, lo, hi, LEVELS)
    return tl.where(valid[:, None], codes, 0), scale, minimum


@triton.jit
def _pack(codes, BITS: tl.constexpr):
    """codes [N, D] int32 -> bytes [N, D*BITS/8]: code j of each byte at bit offset BITS*j (format.pack_codes)."""
    per_byte: tl.constexpr = 8 // BITS
    n: tl.constexpr = codes.shape[0]
    d: tl.constexpr = codes.shape[1]
    grouped = tl.reshape(codes, (n, d // per_byte, per_byte))
    shifts = tl.arange(0, per_byte) * BITS
    return tl.sum(grouped << shifts[None, None, :], axis=2).to(tl.uint8)


@triton.jit
def _load_stream(x_ptr, stride_t, stride_h, tail_ptr, rows, head, positions, valid, from_tail,
                 D: tl.constexpr):
    """Token rows of the stream (old tail + new rows) in the tail's dtype (fp16 or bf16) [N, D]: new rows are
    cast first, as the reference stores them in the tail's dtype before quantizing."""
    channels = tl.arange(0, D)
    new = tl.load(x_ptr + rows[:, None] * stride_t + head * stride_h + channels[None, :],
                  mask=(valid & ~from_tail)[:, None], other=0.0).to(tail_ptr.dtype.element_ty)
    old = tl.load(tail_ptr + positions[:, None] * D + channels[None, :], mask=(valid & from_tail)[:, None],
                  other=0.0)
    return tl.where(from_tail[:, None], old, new)


@triton.jit
def _store_group(kx, vx, valid, page, slot0, head,
                 k_codes_ptr, k_scale_ptr, k_min_ptr, k_sums_ptr, v_codes_ptr, v_scale_ptr, v_min_ptr, v_sums_ptr,
                 HKV: tl.constexpr, D: tl.constexpr, PD: tl.constexpr, PI: tl.constexpr, BS: tl.constexpr,
                 K_BITS: tl.constexpr, BITS: tl.constexpr, KEY_CHANNEL: tl.constexpr, HAS_SUMS: tl.constexpr):
    """Quantize one token group (kx, vx [Π, D] fp16, `valid` tokens only) into page `page` from slot slot0:
    K's codes K_BITS wide, V's BITS."""
    NP: tl.constexpr = D // PD
    K_LEVELS: tl.constexpr = (1 << K_BITS) - 1
    LEVELS: tl.constexpr = (1 << BITS) - 1
    tokens = tl.arange(0, PI)
    channels = tl.arange(0, D)
    parts = tl.arange(0, NP)
    head_page = page * HKV + head
    token_rows = (head_page * BS + slot0 + tokens)[:, None]  # row of each token in [nb, Hkv, BS, ...] fields
    group_row = head_page * (BS // PI) + slot0 // PI  # row of the group in [nb, Hkv, BS/Π, D] fields
    kf = kx.to(tl.float32)
    vf = vx.to(tl.float32)

    if KEY_CHANNEL:
        k_codes, k_scale, k_min = _quantize_per_channel(kf, valid, K_LEVELS)
        tl.store(k_scale_ptr + group_row * D + channels[None, :], k_scale)
        tl.store(k_min_ptr + group_row * D + channels[None, :], k_min)
    else:
        k_parts = tl.reshape(kf, (PI, NP, PD))
        k_codes, k_scale, k_min = _quantize(k_parts, tl.min(k_parts, axis=2, keep_dims=True),
                                            tl.max(k_parts, axis=2, keep_dims=True), K_LEVELS)
        k_codes = tl.reshape(k_codes, (PI, D))
        param_offsets = token_rows * NP + parts[None, :]
        tl.store(k_scale_ptr + param_offsets, tl.reshape(k_scale, (PI, NP)), mask=valid[:, None])
        tl.store(k_min_ptr + param_offsets, tl.reshape(k_min, (PI, NP)), mask=valid[:, None])
    v_codes, v_scale, v_min = _quantize_per_channel(vf, valid, LEVELS)
    tl.store(v_scale_ptr + group_row * D + channels[None, :], v_scale)
    tl.store(v_min_ptr + group_row * D + channels[None, :], v_min)

    k_bytes = token_rows * (D * K_BITS // 8) + tl.arange(0, D * K_BITS // 8)[None, :]
    tl.store(k_codes_ptr + k_bytes, _pack(k_codes, K_BITS), mask=valid[:, None])
    v_bytes = token_rows * (D * BITS // 8) + tl.arange(0, D * BITS // 8)[None, :]
    tl.store(v_codes_ptr + v_bytes, _pack(v_codes, BITS), mask=valid[:, None])
    if HAS_SUMS:
        k_sums = tl.sum(tl.reshape(k_codes, (PI, NP, PD)), axis=2).to(tl.int16)
        tl.store(k_sums_ptr + token_rows * NP + parts[None, :], k_sums, mask=valid[:, None])
        v_sums = tl.sum(v_codes, axis=0, keep_dims=True).to(tl.int16)
        tl.store(v_sums_ptr + group_row * D + channels[None, :], v_sums)


@triton.jit
def _quantize_append_kernel(
    k_ptr, v_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
    cu_new_ptr, num_cached_ptr, block_tables_ptr, stride_table, state_slots_ptr,
    k_codes_ptr, k_scale_ptr, k_min_ptr, k_sums_ptr, v_codes_ptr, v_scale_ptr, v_min_ptr, v_sums_ptr,
    sink_k_ptr, sink_v_ptr, tail_k_ptr, tail_v_ptr,
    HKV: tl.constexpr, D: tl.constexpr, PD: tl.constexpr, PI: tl.constexpr, BS: tl.constexpr,
    K_BITS: tl.constexpr, BITS: tl.constexpr, NUM_SINKS: tl.constexpr, SINK_BLOCK: tl.constexpr,
    KEY_CHANNEL: tl.constexpr, HAS_SUMS: tl.constexpr, REQUANT_ELIM: tl.constexpr, OPEN_PASS: tl.constexpr,
):
    group = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    row0 = tl.load(cu_new_ptr + seq).to(tl.int64)
    n_new = tl.load(cu_new_ptr + seq + 1).to(tl.int64) - row0
    cached = tl.load(num_cached_ptr + seq).to(tl.int64)
    slot = tl.load(state_slots_ptr + seq).to(tl.int64)
    block_table = block_tables_ptr + seq * stride_table

    # The stream: old open-tail tokens, then the new non-sink tokens; stream position 0 is compressed index
    # group_start, a partition boundary.
    new_sinks = tl.minimum(tl.maximum(NUM_SINKS - cached, 0), n_new)
    first = tl.maximum(cached - NUM_SINKS, 0)
    open_len = first % PI
    group_start = first - open_len
    stream_len = open_len + n_new - new_sinks
    full = stream_len - stream_len % PI
    if OPEN_PASS:
        start = full
        count = stream_len - full
    else:
        start = group * PI
        count = tl.minimum(full - start, PI)

    tokens = tl.arange(0, PI)
    positions = start + tokens
    valid = tokens < count
    from_tail = positions < open_len
    rows = row0 + new_sinks + positions - open_len
    state_row = slot * HKV + head
    tail_k = tail_k_ptr + state_row * PI * D
    tail_v = tail_v_ptr + state_row * PI * D
    if OPEN_PASS:
        _write_sinks(k_ptr, stride_kt, stride_kh, sink_k_ptr, row0, head, cached, new_sinks, state_row,
                     D, NUM_SINKS, SINK_BLOCK)
        _write_sinks(v_ptr, stride_vt, stride_vh, sink_v_ptr, row0, head, cached, new_sinks, state_row,
                     D, NUM_SINKS, SINK_BLOCK)
    if count > 0:
        kx = _load_stream(k_ptr, stride_kt, stride_kh, tail_k, rows, head, positions, valid, from_tail, D)
        vx = _load_stream(v_ptr, stride_vt, stride_vh, tail_v, rows, head, positions, valid, from_tail, D)
        if OPEN_PASS:  # new tokens of the open partition go to the tail, at their offset in the partition
            fresh = (valid & ~from_tail)[:, None]
            tail_offsets = tokens[:, None] * D + tl.arange(0, D)[None, :]
            tl.store(tail_k + tail_offsets, kx, mask=fresh)
            tl.store(tail_v + tail_offsets, vx, mask=fresh)
        if not OPEN_PASS or not REQUANT_ELIM:
            page, slot0 = tile_page(block_table, group_start + start, BS)
            _store_group(kx, vx, valid, page, slot0, head, k_codes_ptr, k_scale_ptr, k_min_ptr, k_sums_ptr,
                         v_codes_ptr, v_scale_ptr, v_min_ptr, v_sums_ptr, HKV, D, PD, PI, BS, K_BITS, BITS,
                         KEY_CHANNEL, HAS_SUMS)


@triton.jit
def _write_sinks(x_ptr, stride_t, stride_h, sink_ptr, row0, head, cached, new_sinks, state_row,
                 D: tl.constexpr, NUM_SINKS: tl.constexpr, SINK_BLOCK: tl.constexpr):
    """New tokens at positions < num_sinks go, in the sinks' dtype, to the sequence's sink slots."""
    if NUM_SINKS > 0:
        j = tl.arange(0, SINK_BLOCK)
        channels = tl.arange(0, D)[None, :]
        mask = (j < new_sinks)[:, None]
        x = tl.load(x_ptr + (row0 + j)[:, None] * stride_t + head * stride_h + channels, mask=mask)
        sink_rows = state_row * NUM_SINKS + cached + j
        tl.store(sink_ptr + sink_rows[:, None] * D + channels, x.to(sink_ptr.dtype.element_ty), mask=mask)


def quantize_append(k: torch.Tensor, v: torch.Tensor, cu_new: torch.Tensor, num_cached: torch.Tensor,
                    block_tables: torch.Tensor, state_slots: torch.Tensor, cache: Cache, config: KVConfig,
                    generator: torch.Generator | None = None, num_warps: int = 8) -> None:
    """Triton `reference.store_compressed_kv`. Nearest rounding only (`generator` is accepted for the shared
    signature and unused): stochastic rounding draws from a torch.Generator that a kernel cannot replay."""
    if config.rounding != "nearest" or config.window or config.token_scales:
        raise ValueError("the Triton quantize-append kernel implements nearest rounding, window=0 and no token "
                         f"scales, got rounding={config.rounding!r}, window={config.window}, "
                         f"token_scales={config.token_scales}")
    num_kv_heads, head_dim = check_append_inputs(k, v, cu_new, num_cached, block_tables, state_slots, cache, config)
    pi, batch = config.partition, num_cached.shape[0]
    max_groups = triton.cdiv(pi - 1 + k.shape[0], pi)  # a sequence fills at most this many groups in one call
    sums = sum_tensors(cache, config)
    for open_pass, groups in ((False, max_groups), (True, 1)):
        _quantize_append_kernel[(groups, num_kv_heads, batch)](
            k, v, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            cu_new, num_cached, block_tables, block_tables.stride(0), state_slots,
            cache["k_codes"], cache["k_scale"], cache["k_min"], sums[0],
            cache["v_codes"], cache["v_scale"], cache["v_min"], sums[1],
            cache["sink_k"], cache["sink_v"], cache["tail_k"], cache["tail_v"],
            HKV=num_kv_heads, D=head_dim, PD=config.head_partition(head_dim), PI=pi, BS=config.block_size,
            K_BITS=config.k_bits, BITS=config.bits, NUM_SINKS=config.num_sinks,
            SINK_BLOCK=triton.next_power_of_2(max(config.num_sinks, 1)),
            KEY_CHANNEL=config.key_axis == "channel", HAS_SUMS=config.sum_elimination,
            REQUANT_ELIM=config.requant_elimination, OPEN_PASS=open_pass, num_warps=num_warps,
        )
