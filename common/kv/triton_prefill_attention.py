"""Triton homomorphic prefill attention: FlashAttention-2-style tiling over the HACK cache.

Same arguments and results (within quantization rounding) as `reference.hack_attention`: the new queries of
each sequence (variable lengths packed by cu_q, the last ones of their sequence) attend causally to its 16-bit
sinks, its compressed pages and its 16-bit open tail. Serves prefill, chunked prefill and mixed batches.

Grid (query block, KV head, sequence). A program's rows are BLOCK_T query tokens × the G query heads of one KV
head (GQA), so every K/V tile it loads serves all of them. It streams the sinks, then the paged token groups up
to its last query's position, then the tail, with an online softmax; QKᵀ and PV of the paged groups are int8
MMAs on the codes plus correction terms (triton_tiles.py). The grid is sized from q.shape[0] (no device-to-host
copy); blocks past a sequence's queries exit at once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from common.kv.config import KVConfig
from common.kv.triton_helpers import (
    LOG2E, check_attention_inputs, check_index, next_power_of_2, output_for, prefill_rows, quantize_int8,
    stored_split, sum_tensors, exp_tensors, tile_page, use_dot, use_int8_dot,
)
from common.kv.triton_tiles import attend_state_tile, attend_tail, hack_attend_tile, load_query_partitions

Cache = dict[str, torch.Tensor]


@triton.jit
def _hack_prefill_kernel(
    q_ptr, stride_qt, stride_qh, out_ptr, stride_ot, stride_oh,
    cu_q_ptr, seq_lens_ptr, block_tables_ptr, stride_table, state_slots_ptr, scale_log2,
    k_codes_ptr, k_scale_ptr, k_min_ptr, k_sums_ptr, v_codes_ptr, v_scale_ptr, v_min_ptr, v_sums_ptr,
    k_exp_ptr, v_exp_ptr, sink_k_ptr, sink_v_ptr, tail_k_ptr, tail_v_ptr,
    HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, D: tl.constexpr,
    PD: tl.constexpr, PI: tl.constexpr, BS: tl.constexpr, K_BITS: tl.constexpr, BITS: tl.constexpr,
    NUM_SINKS: tl.constexpr, SINK_BLOCK: tl.constexpr, WINDOW: tl.constexpr, KEY_CHANNEL: tl.constexpr,
    HAS_SUMS: tl.constexpr, REQUANT_ELIM: tl.constexpr, INT_DOT: tl.constexpr, FLOAT_DOT: tl.constexpr,
    TOKEN_SCALES: tl.constexpr,
):
    block = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    NP: tl.constexpr = D // PD
    BLOCK_M: tl.constexpr = BLOCK_T * BLOCK_G
    q_start = tl.load(cu_q_ptr + seq).to(tl.int64)
    num_queries = tl.load(cu_q_ptr + seq + 1).to(tl.int64) - q_start
    if block * BLOCK_T < num_queries:
        seq_len = tl.load(seq_lens_ptr + seq).to(tl.int64)
        state_row = tl.load(state_slots_ptr + seq).to(tl.int64) * HKV + head
        block_table = block_tables_ptr + seq * stride_table
        n_sinks, n_paged, n_tail = stored_split(seq_len, NUM_SINKS, PI, REQUANT_ELIM, WINDOW)

        token, q_heads, row_mask, q_pos = prefill_rows(block, head, seq_len, num_queries, G, BLOCK_G, BLOCK_T)
        q3 = load_query_partitions(q_ptr, (q_start + token) * stride_qt + q_heads * stride_qh, row_mask, NP, PD)
        q_codes, q_scale, q_min, q_sum = quantize_int8(q3, 2)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        if NUM_SINKS > 0:
            m_i, l_i, acc = attend_state_tile(q3, q_pos, m_i, l_i, acc, scale_log2, sink_k_ptr, sink_v_ptr,
                                              state_row * NUM_SINKS, 0, n_sinks, SINK_BLOCK, D, PD, FLOAT_DOT,
                                              False)

        tokens = tl.arange(0, PI)
        last_pos = seq_len - num_queries + tl.minimum(block * BLOCK_T + BLOCK_T, num_queries) - 1
        num_tiles = tl.minimum(tl.cdiv(n_paged, PI), tl.cdiv(last_pos - n_sinks + 1, PI))  # causal: skip the rest
        for tile in range(0, num_tiles):
            page, slot0 = tile_page(block_table, tile * PI, BS)
            n_valid = n_paged - tile * PI
            key_pos = (n_sinks + tile * PI + tokens)[None, :]
            visible = (tokens < n_valid)[None, :] & (key_pos <= q_pos)
            m_i, l_i, acc = hack_attend_tile(
                q3, q_codes, q_scale, q_min, q_sum, visible, m_i, l_i, acc, scale_log2,
                k_codes_ptr, k_scale_ptr, k_min_ptr, k_sums_ptr, v_codes_ptr, v_scale_ptr, v_min_ptr, v_sums_ptr,
                k_exp_ptr, v_exp_ptr, page * HKV + head, slot0, n_valid, D, PD, PI, BS, K_BITS, BITS, KEY_CHANNEL,
                HAS_SUMS, INT_DOT, TOKEN_SCALES)

        if REQUANT_ELIM:
            m_i, l_i, acc = attend_tail(q3, q_pos, m_i, l_i, acc, scale_log2, tail_k_ptr, tail_v_ptr, state_row,
                                        n_sinks + n_paged, n_tail, PI, WINDOW, D, PD, FLOAT_DOT, False)

        out = acc / l_i[:, None]
        offsets = (q_start + token)[:, None] * stride_ot + q_heads[:, None] * stride_oh + tl.arange(0, D)[None, :]
        tl.store(out_ptr + offsets, out, mask=row_mask[:, None])


def hack_prefill_attention(q: torch.Tensor, cu_q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                           state_slots: torch.Tensor, cache: Cache, config: KVConfig, softmax_scale: float,
                           out: torch.Tensor | None = None, block_m: int = 64, num_warps: int = 8,
                           num_stages: int = 2) -> torch.Tensor:
    """Triton `reference.hack_attention`: q [T, Hq, D] packed by cu_q -> [T, Hq, D] in q's dtype (into `out`
    when given). block_m is the target number of rows (query tokens × query heads of one KV head) per program;
    with 64 rows, 8 warps spill far less than 4 on sm_90 (Π=64, head_dim 128).
    """
    num_kv_heads, group, head_dim = check_attention_inputs(q, seq_lens, block_tables, state_slots, cache, config)
    batch = seq_lens.shape[0]
    check_index("cu_q", cu_q, 1, batch + 1, q.device)
    block_g = next_power_of_2(group)
    block_t = max(1, next_power_of_2(block_m) // block_g)
    rows, pd, pi = block_t * block_g, config.head_partition(head_dim), config.partition
    sink_block = max(16, next_power_of_2(config.num_sinks))
    sums = sum_tensors(cache, config)
    out = output_for(q, out)
    _hack_prefill_kernel[(triton.cdiv(q.shape[0], block_t), num_kv_heads, batch)](
        q, q.stride(0), q.stride(1), out, out.stride(0), out.stride(1),
        cu_q, seq_lens, block_tables, block_tables.stride(0), state_slots, softmax_scale * LOG2E,
        cache["k_codes"], cache["k_scale"], cache["k_min"], sums[0],
        cache["v_codes"], cache["v_scale"], cache["v_min"], sums[1], *exp_tensors(cache, config),
        cache["sink_k"], cache["sink_v"], cache["tail_k"], cache["tail_v"],
        HKV=num_kv_heads, G=group, BLOCK_G=block_g, BLOCK_T=block_t, D=head_dim, PD=pd, PI=pi,
        BS=config.block_size, K_BITS=config.k_bits, BITS=config.bits, NUM_SINKS=config.num_sinks,
        SINK_BLOCK=sink_block,
        WINDOW=config.window, KEY_CHANNEL=config.key_axis == "channel", HAS_SUMS=config.sum_elimination,
        REQUANT_ELIM=config.requant_elimination,
        INT_DOT=use_int8_dot(rows, pd, pi) and use_int8_dot(rows, pi, head_dim),
        FLOAT_DOT=use_dot(rows, pd, head_dim, sink_block), TOKEN_SCALES=config.token_scales,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
