"""Triton dequantize-then-attend paged prefill: the dequant baseline's FlashAttention-2 over the HACK pages.

Same arguments and results (within 16-bit rounding) as `reference.dequant_attention`: the new queries of each
sequence (variable lengths packed by cu_q, the last ones of their sequence) attend causally to its 16-bit sinks,
its compressed pages and its 16-bit tail (open partition and window). Serves prefill, chunked prefill and mixed
batches; memory is bounded by the tiles (no [n, n] scores, no dequantized copy of the cache).

Grid (query block, KV head, sequence), as `triton_prefill_attention`: a program's rows are BLOCK_T query tokens ×
the G query heads of one KV head (GQA), so each page group is read and dequantized once for all of them. A page
group of Π tokens is unpacked and dequantized (s·code + m) in registers to keys [D, Π] and values [Π, D] in the
attention dtype (bf16 for bf16 queries, else fp16), and QKᵀ and PV are plain 2-D 16-bit dots with fp32
accumulation and an online softmax: the kernel differs from the homomorphic one only in how a tile is computed.
The grid is sized from q.shape[0] (no device-to-host copy); blocks past a sequence's queries exit at once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from common.kv.config import KVConfig
from common.kv.triton_helpers import (
    LOG2E, check_attention_inputs, check_index, matmul, next_power_of_2, output_for, prefill_rows, softmax_step,
    stored_split, exp_tensors, tile_page, use_dot,
)
from common.kv.triton_tiles import dequantized_group

Cache = dict[str, torch.Tensor]


@triton.jit
def _to_half(x, BF16: tl.constexpr):
    """x as the 16-bit dot operand type: bf16 for bf16 models, else fp16."""
    if BF16:
        half = x.to(tl.bfloat16)
    else:
        half = x.to(tl.float16)
    return half


@triton.jit
def _state_rows(state_k_ptr, state_v_ptr, first_row, n_valid, N: tl.constexpr, D: tl.constexpr):
    """N rows of a 16-bit state tensor (sinks or tail) from first_row as keys [D, N] and values [N, D]; rows >=
    n_valid are 0."""
    tokens = tl.arange(0, N)
    valid = tokens < n_valid
    channels = tl.arange(0, D)
    keys = tl.load(state_k_ptr + (first_row + tokens)[None, :] * D + channels[:, None], mask=valid[None, :],
                   other=0.0)
    values = tl.load(state_v_ptr + (first_row + tokens)[:, None] * D + channels[None, :], mask=valid[:, None],
                     other=0.0)
    return keys, values


@triton.jit
def _attend(q, keys, values, visible, m_i, l_i, acc, scale_log2, DOT: tl.constexpr, BF16: tl.constexpr):
    """FlashAttention-2 step: q [M, D] and keys [D, N], values [N, D] as 16-bit dot operands, fp32 softmax."""
    scores = matmul(q, _to_half(keys, BF16), tl.float32, DOT)
    scores = tl.where(visible, scores * scale_log2, float("-inf"))
    p, alpha, m_i, l_i = softmax_step(scores, m_i, l_i)
    pv = matmul(_to_half(p, BF16), _to_half(values, BF16), tl.float32, DOT)
    return m_i, l_i, acc * alpha[:, None] + pv


@triton.jit
def _dequant_prefill_kernel(
    q_ptr, stride_qt, stride_qh, out_ptr, stride_ot, stride_oh,
    cu_q_ptr, seq_lens_ptr, block_tables_ptr, stride_table, state_slots_ptr, scale_log2,
    k_codes_ptr, k_scale_ptr, k_min_ptr, v_codes_ptr, v_scale_ptr, v_min_ptr, k_exp_ptr, v_exp_ptr,
    sink_k_ptr, sink_v_ptr, tail_k_ptr, tail_v_ptr,
    HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, D: tl.constexpr,
    PD: tl.constexpr, PI: tl.constexpr, BS: tl.constexpr, K_BITS: tl.constexpr, BITS: tl.constexpr,
    NUM_SINKS: tl.constexpr, SINK_BLOCK: tl.constexpr, WINDOW: tl.constexpr, KEY_CHANNEL: tl.constexpr,
    REQUANT_ELIM: tl.constexpr, DOT: tl.constexpr, BF16: tl.constexpr, TOKEN_SCALES: tl.constexpr,
):
    block = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    BLOCK_M: tl.constexpr = BLOCK_T * BLOCK_G
    q_start = tl.load(cu_q_ptr + seq).to(tl.int64)
    num_queries = tl.load(cu_q_ptr + seq + 1).to(tl.int64) - q_start
    if block * BLOCK_T < num_queries:
        seq_len = tl.load(seq_lens_ptr + seq).to(tl.int64)
        state_row = tl.load(state_slots_ptr + seq).to(tl.int64) * HKV + head
        block_table = block_tables_ptr + seq * stride_table
        n_sinks, n_paged, n_tail = stored_split(seq_len, NUM_SINKS, PI, REQUANT_ELIM, WINDOW)

        token, q_heads, row_mask, q_pos = prefill_rows(block, head, seq_len, num_queries, G, BLOCK_G, BLOCK_T)
        channels = tl.arange(0, D)[None, :]
        q_offsets = (q_start + token)[:, None] * stride_qt + q_heads[:, None] * stride_qh + channels
        q = _to_half(tl.load(q_ptr + q_offsets, mask=row_mask[:, None], other=0.0), BF16)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        if NUM_SINKS > 0:
            # names differ from the loops' below: Triton would carry them into the loops with this tile's shape
            sink_k, sink_v = _state_rows(sink_k_ptr, sink_v_ptr, state_row * NUM_SINKS, n_sinks, SINK_BLOCK, D)
            sink_pos = tl.arange(0, SINK_BLOCK)[None, :]
            sink_visible = (sink_pos < n_sinks) & (sink_pos <= q_pos)
            m_i, l_i, acc = _attend(q, sink_k, sink_v, sink_visible, m_i, l_i, acc, scale_log2, DOT, BF16)

        tokens = tl.arange(0, PI)
        last_pos = seq_len - num_queries + tl.minimum(block * BLOCK_T + BLOCK_T, num_queries) - 1
        num_tiles = tl.minimum(tl.cdiv(n_paged, PI), tl.cdiv(last_pos - n_sinks + 1, PI))  # causal: skip the rest
        for tile in range(0, num_tiles):
            page, slot0 = tile_page(block_table, tile * PI, BS)
            n_valid = n_paged - tile * PI
            keys, values = dequantized_group(k_codes_ptr, k_scale_ptr, k_min_ptr, v_codes_ptr, v_scale_ptr,
                                              v_min_ptr, k_exp_ptr, v_exp_ptr, page * HKV + head, slot0, n_valid,
                                              D, PD, PI, BS, K_BITS, BITS, KEY_CHANNEL, TOKEN_SCALES)
            visible = (tokens < n_valid)[None, :] & ((n_sinks + tile * PI + tokens)[None, :] <= q_pos)
            m_i, l_i, acc = _attend(q, keys, values, visible, m_i, l_i, acc, scale_log2, DOT, BF16)

        if REQUANT_ELIM:  # the tail in tiles of Π (the open partition, then the 16-bit window)
            first_pos = n_sinks + n_paged
            num_chunks = tl.minimum(tl.cdiv(n_tail, PI), tl.cdiv(tl.maximum(last_pos - first_pos + 1, 0), PI))
            for chunk in range(0, num_chunks):
                n_valid = n_tail - chunk * PI
                tail_k, tail_v = _state_rows(tail_k_ptr, tail_v_ptr, state_row * (PI + WINDOW) + chunk * PI,
                                             n_valid, PI, D)
                tail_visible = (tokens < n_valid)[None, :] & ((first_pos + chunk * PI + tokens)[None, :] <= q_pos)
                m_i, l_i, acc = _attend(q, tail_k, tail_v, tail_visible, m_i, l_i, acc, scale_log2, DOT, BF16)

        out = acc / l_i[:, None]
        offsets = (q_start + token)[:, None] * stride_ot + q_heads[:, None] * stride_oh + channels
        tl.store(out_ptr + offsets, out, mask=row_mask[:, None])


def dequant_prefill_attention(q: torch.Tensor, cu_q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                              state_slots: torch.Tensor, cache: Cache, config: KVConfig, softmax_scale: float,
                              out: torch.Tensor | None = None, block_m: int = 64, num_warps: int = 4,
                              num_stages: int = 2) -> torch.Tensor:
    """Triton `reference.dequant_attention`: q [T, Hq, D] packed by cu_q -> [T, Hq, D] in q's dtype (into `out`
    when given). block_m is the target number of rows (query tokens × query heads of one KV head) per program.
    The dots run in bf16 for bf16 queries, else fp16 (the dequant baseline attends in 16 bits, as FlashAttention)."""
    num_kv_heads, group, head_dim = check_attention_inputs(q, seq_lens, block_tables, state_slots, cache, config)
    batch = seq_lens.shape[0]
    check_index("cu_q", cu_q, 1, batch + 1, q.device)
    block_g = next_power_of_2(group)
    block_t = max(1, next_power_of_2(block_m) // block_g)
    rows, pi = block_t * block_g, config.partition
    sink_block = max(16, next_power_of_2(config.num_sinks))
    out = output_for(q, out)
    _dequant_prefill_kernel[(triton.cdiv(q.shape[0], block_t), num_kv_heads, batch)](
        q, q.stride(0), q.stride(1), out, out.stride(0), out.stride(1),
        cu_q, seq_lens, block_tables, block_tables.stride(0), state_slots, softmax_scale * LOG2E,
        cache["k_codes"], cache["k_scale"], cache["k_min"], cache["v_codes"], cache["v_scale"], cache["v_min"],
        *exp_tensors(cache, config), cache["sink_k"], cache["sink_v"], cache["tail_k"], cache["tail_v"],
        HKV=num_kv_heads, G=group, BLOCK_G=block_g, BLOCK_T=block_t, D=head_dim,
        PD=config.head_partition(head_dim), PI=pi, BS=config.block_size, K_BITS=config.k_bits, BITS=config.bits,
        NUM_SINKS=config.num_sinks, SINK_BLOCK=sink_block, WINDOW=config.window,
        KEY_CHANNEL=config.key_axis == "channel", REQUANT_ELIM=config.requant_elimination,
        DOT=use_dot(rows, head_dim, pi, sink_block), BF16=q.dtype == torch.bfloat16,
        TOKEN_SCALES=config.token_scales, num_warps=num_warps, num_stages=num_stages,
    )
    return out
