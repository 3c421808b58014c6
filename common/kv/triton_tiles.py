"""One attention tile of the HACK cache, as Triton device functions shared by the prefill and decode kernels.

A tile is BLOCK_M query rows against one token group of Π paged tokens (or the 16-bit sinks / open tail).
The homomorphic product of two partition-quantized operands (see reference.py) is, per partition p,
    Σ_k A_ik B_kj ≈ sA (sB I + mB ΣA') + mA (sB ΣB' + |p| mB),    I = Σ_k A'_ik B'_kj (int8 MMA, int32)
with A', B' the codes and ΣA', ΣB' their per-partition code sums (stored for K and V: "summation elimination").
  * Q·Kᵀ: partitions of PD channels of head_dim, carried as the leading axis of [NP, ...] tiles.
    key_axis="token": Q is quantized once per program; K has a scale/min per token and partition.
    key_axis="channel": K's per-channel scale of the group is folded into Q, which is quantized per tile;
    K then has unit scale and zero minimum, and q·mK adds the minimums back in float.
  * P·V: one partition of Π tokens (the tile). The online-softmax tile P (unnormalized, masked entries 0) is
    quantized per row; quantization is scale-invariant, so this matches quantizing the normalized P.
"""
from __future__ import annotations

import triton
import triton.language as tl

from common.kv.triton_helpers import (
    code_matmul, matmul, quantize_int8, softmax_step, unpack_columns, unpack_rows,
)


@triton.jit
def load_query_partitions(q_ptr, row_offsets, row_mask, NP: tl.constexpr, PD: tl.constexpr):
    """Query rows (pointer offsets [M]) as fp32 [NP, M, PD]: element (p, m, j) is channel p*PD + j of row m."""
    parts = tl.arange(0, NP)[:, None, None]
    channels = tl.arange(0, PD)[None, None, :]
    offsets = row_offsets[None, :, None] + parts * PD + channels
    return tl.load(q_ptr + offsets, mask=row_mask[None, :, None], other=0.0).to(tl.float32)


@triton.jit
def key_codes(k_codes_ptr, token_rows, key_valid, NP: tl.constexpr, PD: tl.constexpr, D: tl.constexpr,
              BITS: tl.constexpr):
    """Unpacked K codes of the tile's tokens (row indices [N]) as int32 [NP, PD, N]; invalid tokens are 0."""
    part_bytes: tl.constexpr = PD * BITS // 8
    byte_index = tl.arange(0, NP)[:, None, None] * part_bytes + tl.arange(0, part_bytes)[None, :, None]
    offsets = token_rows[None, None, :] * (D * BITS // 8) + byte_index  # [NP, bytes per partition, N]
    return unpack_columns(tl.load(k_codes_ptr + offsets, mask=key_valid[None, None, :], other=0), BITS)


@triton.jit
def value_codes(v_codes_ptr, token_rows, key_valid, D: tl.constexpr, BITS: tl.constexpr):
    """Unpacked V codes of the tile's tokens (row indices [N]) as int32 [N, D]; invalid tokens are 0."""
    row_bytes: tl.constexpr = D * BITS // 8
    offsets = token_rows[:, None] * row_bytes + tl.arange(0, row_bytes)[None, :]
    return unpack_rows(tl.load(v_codes_ptr + offsets, mask=key_valid[:, None], other=0), BITS)


@triton.jit
def token_factors(exp_ptr, token_rows, valid, SHIFT: tl.constexpr):
    """2^e of the tokens' stored exponents (format.py token scales: the nibble at bit SHIFT of kv_exp, 0 for K
    and 4 for V), fp32 [N]; 1 for invalid tokens."""
    nibble = (tl.load(exp_ptr + token_rows, mask=valid, other=0).to(tl.int32) >> SHIFT) & 15
    return tl.exp2(tl.where(nibble >= 8, nibble - 16, nibble).to(tl.float32))


@triton.jit
def dequantized_group(k_codes_ptr, k_scale_ptr, k_min_ptr, v_codes_ptr, v_scale_ptr, v_min_ptr, k_exp_ptr, v_exp_ptr,
                       head_page, slot0, n_valid, D: tl.constexpr, PD: tl.constexpr, PI: tl.constexpr,
                       BS: tl.constexpr, K_BITS: tl.constexpr, BITS: tl.constexpr, KEY_CHANNEL: tl.constexpr,
                       TOKEN_SCALES: tl.constexpr):
    """One page group dequantized in registers (the dequant baseline's tiles): fp32 keys [D, Π] and values
    [Π, D], s * code + m (K codes K_BITS wide, V codes BITS; times each token's 2^e with TOKEN_SCALES); tokens
    >= n_valid are finite."""
    NP: tl.constexpr = D // PD
    tokens = tl.arange(0, PI)
    valid = tokens < n_valid
    token_rows = head_page * BS + slot0 + tokens
    group_row = head_page * (BS // PI) + slot0 // PI
    channels = tl.arange(0, D)
    codes = tl.reshape(key_codes(k_codes_ptr, token_rows, valid, 1, D, D, K_BITS), (D, PI))
    if KEY_CHANNEL:
        k_offsets = group_row * D + channels[:, None]  # [D, 1]
        k_scale = tl.load(k_scale_ptr + k_offsets).to(tl.float32)
        k_min = tl.load(k_min_ptr + k_offsets).to(tl.float32)
    else:
        k_offsets = token_rows[None, :] * NP + channels[:, None] // PD  # [D, Π]
        k_scale = tl.load(k_scale_ptr + k_offsets, mask=valid[None, :], other=0.0).to(tl.float32)
        k_min = tl.load(k_min_ptr + k_offsets, mask=valid[None, :], other=0.0).to(tl.float32)
    v_offsets = group_row * D + channels[None, :]  # [1, D]
    v_scale = tl.load(v_scale_ptr + v_offsets).to(tl.float32)
    v_min = tl.load(v_min_ptr + v_offsets).to(tl.float32)
    values = value_codes(v_codes_ptr, token_rows, valid, D, BITS).to(tl.float32) * v_scale + v_min
    keys = codes.to(tl.float32) * k_scale + k_min
    if TOKEN_SCALES:
        keys = keys * token_factors(k_exp_ptr, token_rows, valid, 0)[None, :]
        values = values * token_factors(v_exp_ptr, token_rows, valid, 4)[:, None]
    return keys, values


@triton.jit
def hack_scores(q3, q_codes, q_scale, q_min, q_sum, k_codes_ptr, k_scale_ptr, k_min_ptr, k_sums_ptr, k_exp_ptr,
                head_page, slot0, n_valid,
                D: tl.constexpr, PD: tl.constexpr, PI: tl.constexpr, BS: tl.constexpr, K_BITS: tl.constexpr,
                KEY_CHANNEL: tl.constexpr, HAS_SUMS: tl.constexpr, INT_DOT: tl.constexpr,
                TOKEN_SCALES: tl.constexpr):
    """q·k [M, Π] of the query rows against the Π tokens of one page group, from K's codes (K_BITS wide; with
    TOKEN_SCALES each token's score of its scaled row times its 2^e).

    q3 is the fp32 query [NP, M, PD]; q_codes/q_scale/q_min/q_sum its per-partition INT8 form (key_axis
    "token"; recomputed per tile from the folded query for "channel"). Tokens >= n_valid get finite garbage.
    """
    NP: tl.constexpr = D // PD
    tokens = tl.arange(0, PI)
    key_valid = tokens < n_valid
    token_rows = head_page * BS + slot0 + tokens
    codes = key_codes(k_codes_ptr, token_rows, key_valid, NP, PD, D, K_BITS)  # [NP, PD, Π]
    part_tokens = token_rows[None, None, :] * NP + tl.arange(0, NP)[:, None, None]  # [NP, 1, Π]
    if HAS_SUMS:
        k_sum = tl.load(k_sums_ptr + part_tokens, mask=key_valid[None, None, :], other=0).to(tl.float32)
    else:
        k_sum = tl.sum(codes, axis=1, keep_dims=True).to(tl.float32)
    if KEY_CHANNEL:
        group_row = head_page * (BS // PI) + slot0 // PI
        group_channels = group_row * D + tl.arange(0, NP)[:, None, None] * PD + tl.arange(0, PD)[None, None, :]
        k_scale = tl.load(k_scale_ptr + group_channels).to(tl.float32)  # [NP, 1, PD]
        k_min = tl.load(k_min_ptr + group_channels).to(tl.float32)
        folded_codes, folded_scale, folded_min, folded_sum = quantize_int8(q3 * k_scale, 2)
        integer = code_matmul(folded_codes, folded_sum, codes, K_BITS, INT_DOT).to(tl.float32)
        per_part = folded_scale * integer + folded_min * k_sum
        scores = tl.sum(per_part, axis=0) + tl.sum(tl.sum(q3 * k_min, axis=2), axis=0)[:, None]
    else:
        k_scale = tl.load(k_scale_ptr + part_tokens, mask=key_valid[None, None, :], other=0.0).to(tl.float32)
        k_min = tl.load(k_min_ptr + part_tokens, mask=key_valid[None, None, :], other=0.0).to(tl.float32)
        integer = code_matmul(q_codes, q_sum, codes, K_BITS, INT_DOT).to(tl.float32)  # [NP, M, Π]
        per_part = (q_scale * (k_scale * integer + k_min * q_sum.to(tl.float32))
                    + q_min * (k_scale * k_sum + PD * k_min))
        scores = tl.sum(per_part, axis=0)
    if TOKEN_SCALES:
        scores = scores * token_factors(k_exp_ptr, token_rows, key_valid, 0)[None, :]
    return scores


@triton.jit
def hack_pv(p, v_codes_ptr, v_scale_ptr, v_min_ptr, v_sums_ptr, v_exp_ptr, head_page, slot0, n_valid,
            D: tl.constexpr, PI: tl.constexpr, BS: tl.constexpr, BITS: tl.constexpr, HAS_SUMS: tl.constexpr,
            INT_DOT: tl.constexpr, TOKEN_SCALES: tl.constexpr):
    """P·V [M, D] of a probability tile p [M, Π] (0 where masked) and the page group's V codes (with
    TOKEN_SCALES, p times each token's 2^e is what is quantized)."""
    tokens = tl.arange(0, PI)
    token_rows = head_page * BS + slot0 + tokens
    if TOKEN_SCALES:
        p = p * token_factors(v_exp_ptr, token_rows, tokens < n_valid, 4)[None, :]
    codes = value_codes(v_codes_ptr, token_rows, tokens < n_valid, D, BITS)  # [Π, D]
    group_channels = (head_page * (BS // PI) + slot0 // PI) * D + tl.arange(0, D)[None, :]
    v_scale = tl.load(v_scale_ptr + group_channels).to(tl.float32)
    v_min = tl.load(v_min_ptr + group_channels).to(tl.float32)
    if HAS_SUMS:
        v_sum = tl.load(v_sums_ptr + group_channels).to(tl.float32)
    else:
        v_sum = tl.sum(codes, axis=0, keep_dims=True).to(tl.float32)
    p_codes, p_scale, p_min, p_sum = quantize_int8(p, 1)
    integer = code_matmul(p_codes, p_sum, codes, BITS, INT_DOT).to(tl.float32)
    return p_scale * (v_scale * integer + v_min * p_sum.to(tl.float32)) + p_min * (v_scale * v_sum + PI * v_min)


@triton.jit
def hack_attend_tile(q3, q_codes, q_scale, q_min, q_sum, visible, m_i, l_i, acc, scale_log2,
                     k_codes_ptr, k_scale_ptr, k_min_ptr, k_sums_ptr, v_codes_ptr, v_scale_ptr, v_min_ptr,
                     v_sums_ptr, k_exp_ptr, v_exp_ptr, head_page, slot0, n_valid,
                     D: tl.constexpr, PD: tl.constexpr, PI: tl.constexpr, BS: tl.constexpr, K_BITS: tl.constexpr,
                     BITS: tl.constexpr, KEY_CHANNEL: tl.constexpr, HAS_SUMS: tl.constexpr, INT_DOT: tl.constexpr,
                     TOKEN_SCALES: tl.constexpr):
    """Online-softmax update with one paged token group; `visible` [M or 1, Π] masks keys (causal, length)."""
    scores = hack_scores(q3, q_codes, q_scale, q_min, q_sum, k_codes_ptr, k_scale_ptr, k_min_ptr, k_sums_ptr,
                         k_exp_ptr, head_page, slot0, n_valid, D, PD, PI, BS, K_BITS, KEY_CHANNEL, HAS_SUMS, INT_DOT,
                         TOKEN_SCALES)
    scores = tl.where(visible, scores * scale_log2, float("-inf"))
    p, alpha, m_i, l_i = softmax_step(scores, m_i, l_i)
    pv = hack_pv(p, v_codes_ptr, v_scale_ptr, v_min_ptr, v_sums_ptr, v_exp_ptr, head_page, slot0, n_valid, D, PI, BS,
                 BITS, HAS_SUMS, INT_DOT, TOKEN_SCALES)
    return m_i, l_i, acc * alpha[:, None] + pv


@triton.jit
def float_attend_tile(q3, keys, values, visible, m_i, l_i, acc, scale_log2, FLOAT_DOT: tl.constexpr,
                      FP16: tl.constexpr):
    """Online-softmax update with a float tile: keys [NP, PD, N] and values [N, D] (masked ones 0).

    FP16: fp16 operands, as FlashAttention runs (the dequant baseline's dequantized pages); else fp32 operands
    (tf32 tensor-core products), for the homomorphic kernels' 16-bit sinks and tail: exact fp32 products would
    match the reference more closely, but their register demand spills the whole kernel (sm_90 compile).
    """
    if FP16:
        per_part = matmul(q3.to(tl.float16), keys.to(tl.float16), tl.float32, FLOAT_DOT)
    else:
        per_part = matmul(q3, keys.to(tl.float32), tl.float32, FLOAT_DOT)
    scores = tl.where(visible, tl.sum(per_part, axis=0) * scale_log2, float("-inf"))
    p, alpha, m_i, l_i = softmax_step(scores, m_i, l_i)
    if FP16:
        pv = matmul(p.to(tl.float16), values.to(tl.float16), tl.float32, FLOAT_DOT)
    else:
        pv = matmul(p, values.to(tl.float32), tl.float32, FLOAT_DOT)
    return m_i, l_i, acc * alpha[:, None] + pv


@triton.jit
def attend_state_tile(q3, q_pos, m_i, l_i, acc, scale_log2, state_k_ptr, state_v_ptr, first_row, first_pos,
                      n_valid, N: tl.constexpr, D: tl.constexpr, PD: tl.constexpr, FLOAT_DOT: tl.constexpr,
                      FP16: tl.constexpr):
    """Online-softmax update with N rows of a 16-bit state tensor (sinks or open tail) from row first_row,
    holding the tokens at positions first_pos...; rows >= n_valid and keys after q_pos (causal) are masked."""
    NP: tl.constexpr = D // PD
    tokens = tl.arange(0, N)
    valid = tokens < n_valid
    channels = tl.arange(0, NP)[:, None, None] * PD + tl.arange(0, PD)[None, :, None]
    keys = tl.load(state_k_ptr + (first_row + tokens)[None, None, :] * D + channels, mask=valid[None, None, :],
                   other=0.0)
    values = tl.load(state_v_ptr + (first_row + tokens)[:, None] * D + tl.arange(0, D)[None, :],
                     mask=valid[:, None], other=0.0)
    visible = valid[None, :] & ((first_pos + tokens)[None, :] <= q_pos)
    return float_attend_tile(q3, keys, values, visible, m_i, l_i, acc, scale_log2, FLOAT_DOT, FP16)


@triton.jit
def attend_tail(q3, q_pos, m_i, l_i, acc, scale_log2, tail_k_ptr, tail_v_ptr, state_row, first_pos, n_tail,
                PI: tl.constexpr, WINDOW: tl.constexpr, D: tl.constexpr, PD: tl.constexpr, FLOAT_DOT: tl.constexpr,
                FP16: tl.constexpr):
    """Online-softmax update with the 16-bit tail of one (sequence, KV head): its n_tail tokens (the open
    partition and the 16-bit window, Π + WINDOW rows per state row) at positions first_pos..., in tiles of Π."""
    first_row = state_row * (PI + WINDOW)
    for chunk in range(0, tl.cdiv(n_tail, PI)):
        m_i, l_i, acc = attend_state_tile(q3, q_pos, m_i, l_i, acc, scale_log2, tail_k_ptr, tail_v_ptr,
                                          first_row + chunk * PI, first_pos + chunk * PI, n_tail - chunk * PI, PI,
                                          D, PD, FLOAT_DOT, FP16)
    return m_i, l_i, acc
