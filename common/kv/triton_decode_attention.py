"""Triton homomorphic paged decode attention (flash-decoding over the HACK cache).

Same arguments and results (within quantization rounding) as `reference.hack_decode_attention`: one new query
token per sequence attends to its 16-bit sinks, its compressed pages (block table of non-contiguous pages) and
its 16-bit open tail, without dequantizing K or V.

Grid (split, KV head, sequence): one program holds all query heads of one KV head as the rows of its tiles, so
every KV byte is read once per sequence, and the sequence's token groups are cut into `num_splits` contiguous
ranges that run in parallel (the last split also takes the sinks and tail). Each split leaves an unnormalized
partial output with its running max and sum; `combine_splits` merges them. With one split the kernel
normalizes and writes the output itself.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from common.kv.config import KVConfig
from common.kv.triton_helpers import (
    LOG2E, check_attention_inputs, exp_tensors, next_power_of_2, output_for, quantize_int8, stored_split,
    sum_tensors, tile_page, use_dot, use_int8_dot,
)
from common.kv.triton_tiles import attend_state_tile, attend_tail, hack_attend_tile, load_query_partitions

Cache = dict[str, torch.Tensor]
MIN_TILES_PER_SPLIT = 4  # below this a split's fixed cost (query quantization, partial write) dominates
MAX_SPLITS = 64


@triton.jit
def _hack_decode_kernel(
    q_ptr, stride_qb, stride_qh, out_ptr, stride_ob, stride_oh, part_out_ptr, part_max_ptr, part_sum_ptr,
    seq_lens_ptr, block_tables_ptr, stride_table, state_slots_ptr, num_splits, scale_log2,
    k_codes_ptr, k_scale_ptr, k_min_ptr, k_sums_ptr, v_codes_ptr, v_scale_ptr, v_min_ptr, v_sums_ptr,
    k_exp_ptr, v_exp_ptr, sink_k_ptr, sink_v_ptr, tail_k_ptr, tail_v_ptr,
    HKV: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr, PD: tl.constexpr,
    PI: tl.constexpr, BS: tl.constexpr, K_BITS: tl.constexpr, BITS: tl.constexpr, NUM_SINKS: tl.constexpr,
    SINK_BLOCK: tl.constexpr, WINDOW: tl.constexpr, KEY_CHANNEL: tl.constexpr, HAS_SUMS: tl.constexpr,
    REQUANT_ELIM: tl.constexpr, SPLIT: tl.constexpr, INT_DOT: tl.constexpr, FLOAT_DOT: tl.constexpr,
    TOKEN_SCALES: tl.constexpr,
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
    q_codes, q_scale, q_min, q_sum = quantize_int8(q3, 2)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    first_tile, last_tile = split_tiles(n_paged, split, num_splits, PI)
    tokens = tl.arange(0, PI)
    for tile in range(first_tile, last_tile):
        page, slot0 = tile_page(block_table, tile * PI, BS)
        n_valid = n_paged - tile * PI
        m_i, l_i, acc = hack_attend_tile(
            q3, q_codes, q_scale, q_min, q_sum, (tokens < n_valid)[None, :], m_i, l_i, acc, scale_log2,
            k_codes_ptr, k_scale_ptr, k_min_ptr, k_sums_ptr, v_codes_ptr, v_scale_ptr, v_min_ptr, v_sums_ptr,
            k_exp_ptr, v_exp_ptr, page * HKV + head, slot0, n_valid, D, PD, PI, BS, K_BITS, BITS, KEY_CHANNEL,
            HAS_SUMS, INT_DOT, TOKEN_SCALES)

    m_i, l_i, acc = attend_sinks_and_tail(q3, seq_len, split, num_splits, m_i, l_i, acc, scale_log2, state_row,
                                          n_sinks, n_paged, n_tail, sink_k_ptr, sink_v_ptr, tail_k_ptr, tail_v_ptr,
                                          D, PD, PI, NUM_SINKS, SINK_BLOCK, WINDOW, REQUANT_ELIM, FLOAT_DOT, False)
    store_decode_output(acc, m_i, l_i, out_ptr, stride_ob, stride_oh, part_out_ptr, part_max_ptr, part_sum_ptr,
                        seq, split, num_splits, q_heads, row_mask, HKV * G, D, SPLIT)


@triton.jit
def split_tiles(n_paged, split, num_splits, PI: tl.constexpr):
    """[first, last) token groups of this split: the sequence's groups cut into num_splits even ranges."""
    num_tiles = tl.cdiv(n_paged, PI)
    per_split = tl.cdiv(num_tiles, num_splits)
    first = split * per_split
    return first, tl.minimum(first + per_split, num_tiles)


@triton.jit
def attend_sinks_and_tail(q3, seq_len, split, num_splits, m_i, l_i, acc, scale_log2, state_row, n_sinks, n_paged,
                          n_tail, sink_k_ptr, sink_v_ptr, tail_k_ptr, tail_v_ptr, D: tl.constexpr,
                          PD: tl.constexpr, PI: tl.constexpr, NUM_SINKS: tl.constexpr, SINK_BLOCK: tl.constexpr,
                          WINDOW: tl.constexpr, REQUANT_ELIM: tl.constexpr, FLOAT_DOT: tl.constexpr,
                          FP16: tl.constexpr):
    """The last split also attends to the 16-bit sinks and open tail (all visible to the newest token)."""
    if split == num_splits - 1:
        if NUM_SINKS > 0:
            m_i, l_i, acc = attend_state_tile(q3, seq_len - 1, m_i, l_i, acc, scale_log2, sink_k_ptr, sink_v_ptr,
                                              state_row * NUM_SINKS, 0, n_sinks, SINK_BLOCK, D, PD, FLOAT_DOT,
                                              FP16)
        if REQUANT_ELIM:
            m_i, l_i, acc = attend_tail(q3, seq_len - 1, m_i, l_i, acc, scale_log2, tail_k_ptr, tail_v_ptr,
                                        state_row, n_sinks + n_paged, n_tail, PI, WINDOW, D, PD, FLOAT_DOT, FP16)
    return m_i, l_i, acc


@triton.jit
def store_decode_output(acc, m_i, l_i, out_ptr, stride_ob, stride_oh, part_out_ptr, part_max_ptr, part_sum_ptr,
                        seq, split, num_splits, q_heads, row_mask, HQ: tl.constexpr, D: tl.constexpr,
                        SPLIT: tl.constexpr):
    """One split's unnormalized rows with their running max and sum, or (single split) the final output."""
    channels = tl.arange(0, D)[None, :]
    if SPLIT:
        part_rows = (seq * HQ + q_heads) * num_splits + split
        tl.store(part_out_ptr + part_rows[:, None] * D + channels, acc, mask=row_mask[:, None])
        tl.store(part_max_ptr + part_rows, m_i, mask=row_mask)
        tl.store(part_sum_ptr + part_rows, l_i, mask=row_mask)
    else:
        out = acc / l_i[:, None]
        tl.store(out_ptr + seq * stride_ob + q_heads[:, None] * stride_oh + channels, out, mask=row_mask[:, None])


@triton.jit
def _combine_kernel(part_out_ptr, part_max_ptr, part_sum_ptr, out_ptr, stride_ob, stride_oh, num_splits,
                    HQ: tl.constexpr, D: tl.constexpr, SPLIT_BLOCK: tl.constexpr):
    """Merge the splits of one (sequence, query head): out = Σ_s 2^(m_s - m) acc_s / Σ_s 2^(m_s - m) l_s."""
    seq = tl.program_id(0)
    q_head = tl.program_id(1)
    splits = tl.arange(0, SPLIT_BLOCK)
    mask = splits < num_splits
    part_rows = (seq * HQ + q_head) * num_splits + splits
    m = tl.load(part_max_ptr + part_rows, mask=mask, other=float("-inf"))
    l = tl.load(part_sum_ptr + part_rows, mask=mask, other=0.0)
    acc = tl.load(part_out_ptr + part_rows[:, None] * D + tl.arange(0, D)[None, :], mask=mask[:, None], other=0.0)
    weights = tl.exp2(m - tl.max(m, axis=0))  # splits without keys have m = -inf: weight 0
    out = tl.sum(weights[:, None] * acc, axis=0) / tl.sum(weights * l, axis=0)
    tl.store(out_ptr + seq * stride_ob + q_head * stride_oh + tl.arange(0, D), out)


def default_num_splits(batch: int, num_kv_heads: int, max_tiles: int, num_sms: int) -> int:
    """Enough splits to give every SM about two programs, none with fewer than MIN_TILES_PER_SPLIT groups."""
    wanted = triton.cdiv(2 * num_sms, batch * num_kv_heads)
    return max(1, min(wanted, triton.cdiv(max_tiles, MIN_TILES_PER_SPLIT), MAX_SPLITS))


def device_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter runs programs one by one)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def run_split_decode(kernel, kernel_args: dict, q: torch.Tensor, out: torch.Tensor | None, batch: int,
                     num_kv_heads: int, num_splits: int, **meta) -> torch.Tensor:
    """Launch a split decode kernel (shared with the dequant baseline) and combine its splits into [B, Hq, D]."""
    out = output_for(q, out)
    hq, d = q.shape[1], q.shape[2]
    split = num_splits > 1
    part_out = torch.empty((batch, hq, num_splits, d) if split else (1,), dtype=torch.float32, device=q.device)
    part_max = torch.empty((batch, hq, num_splits) if split else (1,), dtype=torch.float32, device=q.device)
    part_sum = torch.empty_like(part_max)
    kernel[(num_splits, num_kv_heads, batch)](
        q, q.stride(0), q.stride(1), out, out.stride(0), out.stride(1), part_out, part_max, part_sum,
        **kernel_args, num_splits=num_splits, SPLIT=split, **meta)
    if split:
        _combine_kernel[(batch, hq)](part_out, part_max, part_sum, out, out.stride(0), out.stride(1), num_splits,
                                     HQ=hq, D=d, SPLIT_BLOCK=next_power_of_2(num_splits))
    return out


def decode_meta(q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor, state_slots: torch.Tensor,
                cache: Cache, config: KVConfig, softmax_scale: float, num_splits: int | None
                ) -> tuple[dict, dict, int, int, int]:
    """Checked arguments shared by both decode kernels: (pointer args, constexprs, batch, Hkv, splits)."""
    if q.shape[0] != seq_lens.shape[0]:
        raise ValueError(f"decode takes one query per sequence: q has {q.shape[0]} rows for {seq_lens.shape[0]}")
    num_kv_heads, group, head_dim = check_attention_inputs(q, seq_lens, block_tables, state_slots, cache, config)
    batch, pi, pd = q.shape[0], config.partition, config.head_partition(head_dim)
    max_tiles = triton.cdiv(block_tables.shape[1] * config.block_size, pi)
    if num_splits is None:
        num_splits = default_num_splits(batch, num_kv_heads, max_tiles, device_sms(q.device))
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    block_m = max(16, next_power_of_2(group))
    sink_block = max(16, next_power_of_2(config.num_sinks))
    args = dict(
        seq_lens_ptr=seq_lens, block_tables_ptr=block_tables, stride_table=block_tables.stride(0),
        state_slots_ptr=state_slots, scale_log2=softmax_scale * LOG2E,
        sink_k_ptr=cache["sink_k"], sink_v_ptr=cache["sink_v"], tail_k_ptr=cache["tail_k"], tail_v_ptr=cache["tail_v"],
    )
    args["k_exp_ptr"], args["v_exp_ptr"] = exp_tensors(cache, config)
    meta = dict(
        HKV=num_kv_heads, G=group, BLOCK_M=block_m, D=head_dim, PD=pd, PI=pi, BS=config.block_size,
        K_BITS=config.k_bits, BITS=config.bits, NUM_SINKS=config.num_sinks, SINK_BLOCK=sink_block, WINDOW=config.window,
        KEY_CHANNEL=config.key_axis == "channel",
        REQUANT_ELIM=config.requant_elimination, FLOAT_DOT=use_dot(block_m, pd, head_dim, sink_block),
        TOKEN_SCALES=config.token_scales,
    )
    return args, meta, batch, num_kv_heads, num_splits


def hack_decode_attention(q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                          state_slots: torch.Tensor, cache: Cache, config: KVConfig, softmax_scale: float,
                          out: torch.Tensor | None = None, num_splits: int | None = None,
                          num_warps: int = 8) -> torch.Tensor:
    """Triton `reference.hack_decode_attention`: q [B, Hq, D] -> [B, Hq, D] in q's dtype (into `out` when
    given). num_splits defaults to `default_num_splits`; 8 warps keep Llama-3-8B tiles (Π=64, head_dim 128)
    within the registers on sm_90, 4 would spill."""
    args, meta, batch, num_kv_heads, num_splits = decode_meta(q, seq_lens, block_tables, state_slots, cache, config,
                                                             softmax_scale, num_splits)
    sums = sum_tensors(cache, config)
    args |= dict(k_codes_ptr=cache["k_codes"], k_scale_ptr=cache["k_scale"], k_min_ptr=cache["k_min"],
                 k_sums_ptr=sums[0], v_codes_ptr=cache["v_codes"], v_scale_ptr=cache["v_scale"],
                 v_min_ptr=cache["v_min"], v_sums_ptr=sums[1])
    meta |= dict(HAS_SUMS=config.sum_elimination, INT_DOT=use_int8_dot(meta["BLOCK_M"], meta["PD"], meta["PI"])
                 and use_int8_dot(meta["BLOCK_M"], meta["PI"], meta["D"]))
    return run_split_decode(_hack_decode_kernel, args, q, out, batch, num_kv_heads, num_splits, num_warps=num_warps,
                            **meta)
