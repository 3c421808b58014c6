"""Triton dequantize-then-attend paged decode: the KIVI/KVQuant-style baseline over the same HACK pages.

Same arguments and results (within fp16 rounding) as `reference.dequant_attention` with one query per
sequence. It reads exactly the bytes the homomorphic decode kernel reads (codes, scales, minimums; no sums),
dequantizes each token group to fp16 in registers and runs a plain fp16 flash-decoding tile on it, so the two
kernels differ only in how a tile is computed. Grid, splits, sinks/tail and the combine step are shared with
`triton_decode_attention`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from common.kv.config import KVConfig
from common.kv.triton_decode_attention import (
    attend_sinks_and_tail, decode_meta, run_split_decode, split_tiles, store_decode_output,
)
from common.kv.triton_helpers import stored_split, tile_page
from common.kv.triton_tiles import dequantized_group, float_attend_tile, load_query_partitions

Cache = dict[str, torch.Tensor]


@triton.jit
def _dequant_decode_kernel(
    q_ptr, stride_qb, stride_qh, out_ptr, stride_ob, stride_oh, part_out_ptr, part_max_ptr, part_sum_ptr,
    seq_lens_ptr, block_tables_ptr, stride_table, state_slots_ptr, num_splits, scale_log2,
    k_codes_ptr, k_scale_ptr, k_min_ptr, v_codes_ptr, v_scale_ptr, v_min_ptr, k_exp_ptr, v_exp_ptr,
    sink_k_ptr, sink_v_ptr, tail_k_ptr, tail_v_ptr,
    HKV: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr, PD: tl.constexpr,
    PI: tl.constexpr, BS: tl.constexpr, K_BITS: tl.constexpr, BITS: tl.constexpr, NUM_SINKS: tl.constexpr,
    SINK_BLOCK: tl.constexpr, WINDOW: tl.constexpr, KEY_CHANNEL: tl.constexpr, REQUANT_ELIM: tl.constexpr,
    SPLIT: tl.constexpr, FLOAT_DOT: tl.constexpr, TOKEN_SCALES: tl.constexpr,
):
    split = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    NP: tl.constexpr = D // PD
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int64)
    state_row = tl.load(state_slots_ptr + seq).to(tl.int64) * HKV + head
    block_table = block_tables_ptr + seq * stride_table
    n_sinks, n_paged, n_tail = stored_split(seq_len, NUM_SINKS, PI, REQUANT_ELIM, WINDOW)

    rows = tl.arange(0, BLOCK_M)
    row_mask = rows < G
    q_heads = head * G + rows
    q3 = load_query_partitions(q_ptr, seq * stride_qb + q_heads * stride_qh, row_mask, NP, PD)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    first_tile, last_tile = split_tiles(n_paged, split, num_splits, PI)
    tokens = tl.arange(0, PI)
    for tile in range(first_tile, last_tile):
        page, slot0 = tile_page(block_table, tile * PI, BS)
        n_valid = n_paged - tile * PI
        keys, values = dequantized_group(k_codes_ptr, k_scale_ptr, k_min_ptr, v_codes_ptr, v_scale_ptr, v_min_ptr,
                                         k_exp_ptr, v_exp_ptr, page * HKV + head, slot0, n_valid, D, PD, PI, BS,
                                         K_BITS, BITS, KEY_CHANNEL, TOKEN_SCALES)
        m_i, l_i, acc = float_attend_tile(q3, tl.reshape(keys, (NP, PD, PI)), values, (tokens < n_valid)[None, :],
                                          m_i, l_i, acc, scale_log2, FLOAT_DOT, True)

    m_i, l_i, acc = attend_sinks_and_tail(q3, seq_len, split, num_splits, m_i, l_i, acc, scale_log2, state_row,
                                          n_sinks, n_paged, n_tail, sink_k_ptr, sink_v_ptr, tail_k_ptr, tail_v_ptr,
                                          D, PD, PI, NUM_SINKS, SINK_BLOCK, WINDOW, REQUANT_ELIM, FLOAT_DOT, True)
    store_decode_output(acc, m_i, l_i, out_ptr, stride_ob, stride_oh, part_out_ptr, part_max_ptr, part_sum_ptr,
                        seq, split, num_splits, q_heads, row_mask, HKV * G, D, SPLIT)


def dequant_decode_attention(q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                             state_slots: torch.Tensor, cache: Cache, config: KVConfig, softmax_scale: float,
                             out: torch.Tensor | None = None, num_splits: int | None = None,
                             num_warps: int = 8) -> torch.Tensor:
    """Triton `reference.dequant_attention` for one query per sequence: q [B, Hq, D] -> [B, Hq, D] (into
    `out` when given). Launched like the homomorphic decode kernel (splits, 8 warps) for a like-for-like race."""
    args, meta, batch, num_kv_heads, num_splits = decode_meta(q, seq_lens, block_tables, state_slots, cache, config,
                                                             softmax_scale, num_splits)
    args |= dict(k_codes_ptr=cache["k_codes"], k_scale_ptr=cache["k_scale"], k_min_ptr=cache["k_min"],
                 v_codes_ptr=cache["v_codes"], v_scale_ptr=cache["v_scale"], v_min_ptr=cache["v_min"])
    return run_split_decode(_dequant_decode_kernel, args, q, out, batch, num_kv_heads, num_splits, num_warps=num_warps,
                            **meta)
