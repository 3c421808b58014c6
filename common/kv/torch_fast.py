"""Vectorized torch versions of the KV ops: a batch of sequences in a handful of tensor calls.

The reference (reference.py) walks sequences and pages in Python and emulates the integer products in float64:
the ground truth, but dominated by per-op overhead on small models. These functions keep its signatures and
its math, batched:
  * pages: indexing a page field with the block table gives [B, Hkv, pages*rows, width] at once. Slots past a
    sequence's stored tokens hold whatever the page held before, so they are masked out of the softmax and
    zeroed wherever they would reach an output (V values, V codes, per-group K/V parameters).
  * queries: each sequence's new queries are padded to the longest count M (1 in decode: no padding) and share
    one causal mask [B, M, keys]. Batch and KV heads fold into one leading dim, so the reference's own steps
    (hack_scores, hack_pv, dequantize_paged) run unchanged over the whole batch.
  * codes unpack to float32 through a byte table, and the homomorphic integer products run in float32 (exact
    for these integers; the scale/min corrections stay float64, see reference.homomorphic_matmul).
  * chunks: sequences go through in chunks of about CHUNK_ELEMENTS gathered K values, so a large model's
    batch does not hold every sequence's unpacked K and V at once (on CPU, glibc hands such large freed
    blocks back to the kernel, and every call page-faults them in again). Small models run one chunk.
Results agree with the reference to float32 rounding; a homomorphic output can also move by one INT8 step of
P where a probability sits on a rounding boundary (the tolerance the Triton kernels are held to).

The padded layout holds B x M x keys scores, as the reference holds M x keys per sequence: a chunk mixing a
long prompt with decodes pays for the padding. store_compressed_kv batches only the decode append into the open
tail; what quantizes (a tail flush every Π tokens, prompts) still appends per sequence through the reference.
"""
from __future__ import annotations

import functools
from typing import Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F

from common.kv import reference
from common.kv.config import KVConfig
from common.kv.format import Cache, Quantized, token_factors, unpack_codes

CHUNK_ELEMENTS = 1 << 20  # gathered K values per chunk: 4 MiB as float32, one Llama-3-8B layer at 1k tokens

# ---------------------------------------------------------------------------------------------------------------
# Addressing: which sequence owns a packed row, which page holds a token, chunks of sequences
# ---------------------------------------------------------------------------------------------------------------


def row_owners(cu: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence, index within the sequence) of each of num_rows packed rows, given the [B + 1] offsets cu."""
    rows = torch.arange(num_rows, device=cu.device)
    seq = torch.searchsorted(cu[1:].to(torch.int64), rows, right=True)
    return seq, rows - cu[seq]


def page_ids(block_tables: torch.Tensor, num_tokens: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, max_blocks] int64 page ids; columns past a sequence's last page read page 0 (padding is unspecified)."""
    needed = (num_tokens + block_size - 1) // block_size
    columns = torch.arange(block_tables.shape[1], device=block_tables.device)
    return torch.where(columns < needed[:, None], block_tables.long(), 0)


def gather_pages(field: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
    """Rows of pool field [num_blocks, Hkv, rows, w] on the pages [B, n]: a new [B, Hkv, n*rows, w]."""
    return field[pages].transpose(1, 2).flatten(2, 3)


def paged_token_factors(cache: Cache, pages: torch.Tensor) -> dict[str, torch.Tensor]:
    """fp32 [B*Hkv, L] 2^e of K's ("k_factor") and V's ("v_factor") token exponents on the pages [B, np]
    (L = np x block_size). Past a sequence's stored tokens they are stale but finite (a nibble's 2^e): those
    scores are masked and those probabilities zero."""
    both = token_factors(gather_pages(cache["kv_exp"], pages).flatten(0, 1).squeeze(-1))  # [B*Hkv, L, 2]
    return {"k_factor": both[..., 0], "v_factor": both[..., 1]}


def zero_rows_(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Zero, in place, the rows of x [B, H, rows, w] where keep [B, rows] is False (x is a fresh gather)."""
    return x.masked_fill_(~keep[:, None, :, None], 0)


def unpack_float(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """format.unpack_codes as float32 codes (what the products consume) through a 256-entry table: one lookup
    per byte is several times faster on CPU than broadcast shifts and masks."""
    return F.embedding(packed.long(), _byte_codes(bits, packed.device)).flatten(-2)


@functools.cache
def _byte_codes(bits: int, device: torch.device) -> torch.Tensor:
    """[256, 8/bits] float32: the codes packed in each byte value."""
    return unpack_codes(torch.arange(256, dtype=torch.uint8, device=device)[:, None], bits).float()


class Chunk(NamedTuple):
    """Consecutive sequences of a batch and their packed query rows."""

    seqs: slice
    rows: slice
    cu: torch.Tensor  # the chunk's [n + 1] query offsets, from 0


def sequence_chunks(cu_q: torch.Tensor, block_tables: torch.Tensor, elements_per_token: int) -> Iterator[Chunk]:
    """Chunks of about CHUNK_ELEMENTS gathered values (a sequence gathers at most the table's width). A batch
    that fits is one chunk and costs no device sync."""
    batch = block_tables.shape[0]
    per_sequence = max(1, block_tables.shape[1] * elements_per_token)
    step = max(1, CHUNK_ELEMENTS // per_sequence)
    if step >= batch:
        yield Chunk(slice(None), slice(None), cu_q)
        return
    bounds = cu_q.tolist()
    for start in range(0, batch, step):
        stop = min(start + step, batch)
        yield Chunk(slice(start, stop), slice(bounds[start], bounds[stop]), cu_q[start : stop + 1] - bounds[start])


# ---------------------------------------------------------------------------------------------------------------
# Queries: padded per sequence, grouped by KV head
# ---------------------------------------------------------------------------------------------------------------


class Queries(NamedTuple):
    """The new queries of a batch as rows [B*Hkv, G*M, D] (G query heads per KV head, M queries per sequence,
    head-major like the reference's grouping), with what it takes to mask and unpad them."""

    rows: torch.Tensor
    positions: torch.Tensor  # [B, M] token position of each query; padding sits at seq_len and sees all keys
    seq: torch.Tensor  # [T] sequence of each packed query
    index: torch.Tensor  # [T] its index among that sequence's queries


def group_queries(q: torch.Tensor, cu_q: torch.Tensor, seq_lens: torch.Tensor, num_kv_heads: int,
                  dtype: torch.dtype) -> Queries:
    """Pad q [T, Hq, D] to [B, M, Hq, D] and group it by KV head. Decode (T == B) needs no device sync."""
    (t, hq, d), batch = q.shape, seq_lens.shape[0]
    if hq % num_kv_heads:
        raise ValueError(f"{hq} query heads are not a multiple of {num_kv_heads} KV heads")
    counts = cu_q[1:] - cu_q[:-1]
    width = 1 if t == batch else int(counts.max())
    seq, index = row_owners(cu_q, t)
    padded = q.new_zeros((batch, width, hq, d), dtype=dtype)
    padded[seq, index] = q.to(dtype)
    positions = (seq_lens - counts)[:, None] + torch.arange(width, device=q.device)
    group = hq // num_kv_heads
    rows = padded.view(batch, width, num_kv_heads, group, d).permute(0, 2, 3, 1, 4)
    return Queries(rows.reshape(batch * num_kv_heads, group * width, d), positions, seq, index)


def ungroup(x: torch.Tensor, queries: Queries) -> torch.Tensor:
    """Inverse of group_queries on an output [B*Hkv, G*M, D]: the packed [T, Hq, D]."""
    batch, width = queries.positions.shape
    d = x.shape[-1]
    padded = x.view(batch, -1, x.shape[1] // width, width, d).permute(0, 3, 1, 2, 4).reshape(batch, width, -1, d)
    return padded[queries.seq, queries.index]


def masked_softmax(scores: torch.Tensor, queries: Queries, key_positions: torch.Tensor,
                   key_valid: torch.Tensor) -> torch.Tensor:
    """fp32 softmax of scores [B*Hkv, G*M, L]: a query sees the stored keys (key_valid [B, L]) at positions
    (key_positions [B, L]) up to its own."""
    batch, width = queries.positions.shape
    visible = key_valid[:, None, :] & (key_positions[:, None, :] <= queries.positions[:, :, None])  # [B, M, L]
    grouped = scores.float().view(batch, -1, scores.shape[1] // width, width, scores.shape[-1])
    probs = torch.softmax(grouped.masked_fill(~visible[:, None, None], float("-inf")), dim=-1)
    return probs.view(scores.shape)


# ---------------------------------------------------------------------------------------------------------------
# fp16 mode
# ---------------------------------------------------------------------------------------------------------------


def store_fp16_kv(k: torch.Tensor, v: torch.Tensor, cu_new: torch.Tensor, num_cached: torch.Tensor,
                  block_tables: torch.Tensor, cache: Cache, block_size: int) -> None:
    """reference.store_fp16_kv: every new token scattered to its (page, slot) in one indexed write per tensor."""
    seq, index = row_owners(cu_new, k.shape[0])
    positions = num_cached[seq] + index
    pages = block_tables[seq, positions // block_size].long()
    slots = positions % block_size
    cache["k"][pages, :, slots] = k.to(cache["k"].dtype)
    cache["v"][pages, :, slots] = v.to(cache["v"].dtype)


def fp16_attention(q: torch.Tensor, cu_q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                   cache: Cache, block_size: int, softmax_scale: float) -> torch.Tensor:
    """reference.fp16_attention over the gathered pages. fp32 on CPU (as the reference); on CUDA in q's dtype
    with an fp32 softmax, as a 16-bit serving baseline computes. A chunk whose padded score tensor
    [B·Hkv, G·M, L] would exceed SCORE_ELEMENTS (long prompts) runs blockwise (fp16_attention_blockwise), so
    memory stays bounded at any length."""
    out = torch.empty_like(q)
    _, num_kv_heads, _, head_dim = cache["k"].shape
    for chunk in sequence_chunks(cu_q, block_tables, block_size * num_kv_heads * head_dim):
        args = (q[chunk.rows], chunk.cu, seq_lens[chunk.seqs], block_tables[chunk.seqs], cache, block_size,
                softmax_scale)
        rows, batch = args[0].shape[0], args[2].shape[0]
        padded_scores = q.shape[1] * (rows if rows == batch else batch * rows) * block_tables.shape[1] * block_size
        out[chunk.rows] = (_fp16_chunk if padded_scores <= SCORE_ELEMENTS else fp16_attention_blockwise)(*args)
    return out


SCORE_ELEMENTS = 1 << 24  # scores one fp16-mode chunk may hold at once (64 MiB in fp32)
QUERY_BLOCK, KEY_BLOCK = 512, 1024  # tokens per block of the blockwise attention


def fp16_attention_blockwise(q: torch.Tensor, cu_q: torch.Tensor, seq_lens: torch.Tensor,
                             block_tables: torch.Tensor, cache: Cache, block_size: int, softmax_scale: float,
                             query_block: int = QUERY_BLOCK, key_block: int = KEY_BLOCK) -> torch.Tensor:
    """FlashAttention-style fp16-mode attention: each sequence's queries in blocks of query_block, its keys
    gathered from the pages key_block tokens at a time (only those at or before the block's last query), scores
    of one block pair at a time ([Hq, query_block, key_block]) combined by an online softmax. Memory does not grow
    with the square of the length."""
    out = torch.empty_like(q)
    bounds, lengths = cu_q.tolist(), seq_lens.tolist()  # one sync per call, not per block
    key_block = max(block_size, key_block // block_size * block_size)
    for i, seq_len in enumerate(lengths):
        start, stop = bounds[i], bounds[i + 1]
        first_position = seq_len - (stop - start)
        for q0 in range(start, stop, query_block):
            q1 = min(q0 + query_block, stop)
            out[q0:q1] = _attend_block(q[q0:q1], first_position + q0 - start, block_tables[i], cache, block_size,
                                       softmax_scale, key_block)
    return out


def _attend_block(q: torch.Tensor, first_position: int, block_table: torch.Tensor, cache: Cache, block_size: int,
                  softmax_scale: float, key_block: int) -> torch.Tensor:
    """Queries q [n, Hq, D] at positions first_position.. over their keys, key_block at a time."""
    n, num_heads, head_dim = q.shape
    num_kv_heads = cache["k"].shape[1]
    group = num_heads // num_kv_heads
    dtype = torch.float32 if q.device.type == "cpu" else q.dtype
    queries = q.to(dtype).view(n, num_kv_heads, group, head_dim).permute(1, 2, 0, 3).reshape(num_kv_heads, -1,
                                                                                             head_dim)
    query_positions = (first_position + torch.arange(n, device=q.device)).repeat(group)  # [G*n], head-major
    last = first_position + n  # keys [0, last)
    best = torch.full((num_kv_heads, group * n, 1), float("-inf"), device=q.device)
    total = torch.zeros((num_kv_heads, group * n, 1), device=q.device)
    acc = torch.zeros((num_kv_heads, group * n, head_dim), device=q.device)
    for k0 in range(0, last, key_block):
        k1 = min(k0 + key_block, last)
        pages = block_table[k0 // block_size: -(-k1 // block_size)].long()
        keys, values = (cache[name][pages].transpose(0, 1).flatten(1, 2)[:, : k1 - k0].to(dtype)
                        for name in ("k", "v"))  # [Hkv, k1 - k0, D]
        scores = (queries @ keys.mT).float() * softmax_scale
        if k1 > first_position:  # the block reaches the diagonal: mask keys after each query
            key_positions = torch.arange(k0, k1, device=q.device)
            scores.masked_fill_(key_positions[None, None, :] > query_positions[None, :, None], float("-inf"))
        new_best = torch.maximum(best, scores.amax(-1, keepdim=True))
        probs = torch.exp(scores - new_best)
        correction = torch.exp(best - new_best)
        total = total * correction + probs.sum(-1, keepdim=True)
        acc = acc * correction + (probs.to(dtype) @ values).float()
        best = new_best
    out = (acc / total).view(num_kv_heads, group, n, head_dim).permute(2, 0, 1, 3).reshape(n, num_heads, head_dim)
    return out.to(q.dtype)


def _fp16_chunk(q: torch.Tensor, cu_q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                cache: Cache, block_size: int, softmax_scale: float) -> torch.Tensor:
    dtype = torch.float32 if q.device.type == "cpu" else q.dtype
    queries = group_queries(q, cu_q, seq_lens, cache["k"].shape[1], dtype)
    pages = page_ids(block_tables, seq_lens, block_size)
    k, v = (gather_pages(cache[name], pages).to(dtype) for name in ("k", "v"))  # [B, Hkv, L, D], fresh
    key_positions = torch.arange(k.shape[2], device=q.device).expand(k.shape[0], -1)
    stored = key_positions < seq_lens[:, None]
    v = zero_rows_(v, stored).flatten(0, 1)
    probs = masked_softmax((queries.rows @ k.flatten(0, 1).mT) * softmax_scale, queries, key_positions, stored)
    return ungroup(probs.to(dtype) @ v, queries).to(q.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Compressed modes: appending new tokens
# ---------------------------------------------------------------------------------------------------------------


def store_compressed_kv(k: torch.Tensor, v: torch.Tensor, cu_new: torch.Tensor, num_cached: torch.Tensor,
                        block_tables: torch.Tensor, state_slots: torch.Tensor, cache: Cache, config: KVConfig,
                        generator: torch.Generator | None = None) -> None:
    """reference.store_compressed_kv, with the common decode append batched: a single new token that lands in
    its sequence's open tail without filling the partition is one indexed write for the whole batch. The rest
    (sinks, tail flushes, multi-token appends, the requantizing ablation) goes through the reference in batch
    order, so stochastic rounding draws the same numbers."""
    counts = cu_new[1:] - cu_new[:-1]
    open_len = tail_lengths(num_cached - config.num_sinks, config)
    in_tail = (counts == 1) & (num_cached >= config.num_sinks) & (open_len < config.partition + config.window - 1)
    if not config.requant_elimination:  # every append also requantizes the open partition into the pages
        in_tail = torch.zeros_like(in_tail)
    if in_tail.any():
        rows, slots, columns = cu_new[:-1][in_tail], state_slots[in_tail], open_len[in_tail]
        cache["tail_k"][slots, :, columns] = k[rows].to(cache["tail_k"].dtype)
        cache["tail_v"][slots, :, columns] = v[rows].to(cache["tail_v"].dtype)
    rest = (~in_tail).nonzero().flatten()
    if rest.numel():
        rows, cu_rest = select_sequences(cu_new, rest)
        reference.store_compressed_kv(k[rows], v[rows], cu_rest, num_cached[rest], block_tables[rest],
                                      state_slots[rest], cache, config, generator)


def select_sequences(cu: torch.Tensor, seqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed rows of sequences `seqs` (a sub-batch, in that order) and the sub-batch's [n + 1] offsets."""
    starts, counts = cu[:-1][seqs], (cu[1:] - cu[:-1])[seqs]
    sub_cu = torch.zeros(len(seqs) + 1, dtype=torch.int64, device=cu.device)
    sub_cu[1:] = torch.cumsum(counts, 0)
    rows = torch.repeat_interleave(starts - sub_cu[:-1], counts) + torch.arange(int(sub_cu[-1]), device=cu.device)
    return rows, sub_cu


# ---------------------------------------------------------------------------------------------------------------
# Compressed modes: reading a batch's sinks, pages and tails
# ---------------------------------------------------------------------------------------------------------------


class CompressedKV(NamedTuple):
    """A batch's stored K/V as attention reads it, batch and KV heads folded: [B*Hkv, rows, w] each."""

    sink_k: torch.Tensor  # fp32 [B*Hkv, num_sinks, D]
    sink_v: torch.Tensor  # zero past each sequence's sinks
    tail_k: torch.Tensor  # fp32 [B*Hkv, Π, D]
    tail_v: torch.Tensor  # zero past each sequence's tail
    paged: dict[str, torch.Tensor]  # reference._gather_paged's fields over the pages holding codes
    key_positions: torch.Tensor  # [B, sinks + paged + tail slots] token position of each key slot
    key_valid: torch.Tensor  # [B, same] whether the slot holds a stored token

    @property
    def sizes(self) -> list[int]:
        return [self.sink_k.shape[1], self.paged["k_codes"].shape[1], self.tail_k.shape[1]]


def stored_counts(seq_lens: torch.Tensor, config: KVConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """reference.stored_split for every sequence: [B] sinks, paged and tail token counts."""
    sinks = seq_lens.clamp(max=config.num_sinks)
    rest = seq_lens - sinks
    if not config.requant_elimination:
        return sinks, rest, torch.zeros_like(rest)
    tail = tail_lengths(rest, config)
    return sinks, rest - tail, tail


def tail_lengths(rest: torch.Tensor, config: KVConfig) -> torch.Tensor:
    """format.split_tokens' tail for [B] counts of tokens after the sinks (negative counts give garbage)."""
    return rest - (rest - config.window).clamp(min=0) // config.partition * config.partition


def read_compressed(cache: Cache, seq_lens: torch.Tensor, block_tables: torch.Tensor, state_slots: torch.Tensor,
                    config: KVConfig) -> CompressedKV:
    """Everything the compressed attention of a batch reads, with each key slot's position and validity."""
    n_sinks, n_paged, n_tail = stored_counts(seq_lens, config)
    sink_k, sink_v, sink_slots = read_state(cache, "sink", state_slots, n_sinks)
    tail_k, tail_v, tail_slots = read_state(cache, "tail", state_slots, n_tail)
    filled_pages = -(-int(n_paged.max()) // config.block_size)  # not the tail's page; a sync on CUDA
    paged, page_slots = read_pages(cache, block_tables[:, :filled_pages], n_paged, config)
    key_positions = torch.cat([sink_slots.expand(seq_lens.shape[0], -1), n_sinks[:, None] + page_slots,
                               (n_sinks + n_paged)[:, None] + tail_slots], dim=1)
    key_valid = torch.cat([sink_slots < n_sinks[:, None], page_slots < n_paged[:, None],
                           tail_slots < n_tail[:, None]], dim=1)
    return CompressedKV(sink_k, sink_v, tail_k, tail_v, paged, key_positions, key_valid)


def read_state(cache: Cache, prefix: str, state_slots: torch.Tensor,
               counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 K and V [B*Hkv, n, D] of the 16-bit sinks or tail (V zero past counts [B]), and the slots [1, n]."""
    k, v = (cache[f"{prefix}_{name}"][state_slots].float() for name in ("k", "v"))  # [B, Hkv, n, D], fresh
    slots = torch.arange(k.shape[2], device=k.device)[None, :]
    return k.flatten(0, 1), zero_rows_(v, slots < counts[:, None]).flatten(0, 1), slots


def read_pages(cache: Cache, block_tables: torch.Tensor, n_paged: torch.Tensor,
               config: KVConfig) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The page fields of reference._gather_paged on every page of the tables, [B*Hkv, rows, w] each (codes
    unpacked), and the token slots [1, L]. Unstored V codes and unstored groups' parameters are zeroed: a zero
    probability times a stale code still enters the homomorphic sums, and a stale NaN would poison them."""
    names = ["k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min"]
    if config.sum_elimination:
        names += ["k_sums", "v_sums"]
    if config.token_scales:
        names += ["kv_exp"]
    pages = page_ids(block_tables, n_paged, config.block_size)
    paged = {name: gather_pages(cache[name], pages) for name in names}  # [B, Hkv, rows, w]
    slots = torch.arange(paged["k_codes"].shape[2], device=n_paged.device)[None, :]
    groups = torch.arange(paged["v_scale"].shape[2], device=n_paged.device)[None, :]
    stored_groups = groups < (n_paged[:, None] + config.partition - 1) // config.partition
    group_fields = ["v_scale", "v_min", "v_sums"] + (["k_scale", "k_min"] if config.key_axis == "channel" else [])
    for name in group_fields:
        if name in paged:
            zero_rows_(paged[name], stored_groups)
    zero_rows_(paged["v_codes"], slots < n_paged[:, None])  # stale kv_exp bytes stay: any nibble's 2^e is finite
    paged["k_codes"] = unpack_float(paged["k_codes"], config.k_bits)
    paged["v_codes"] = unpack_float(paged["v_codes"], config.bits)
    return {name: x.flatten(0, 1) for name, x in paged.items()}, slots


# ---------------------------------------------------------------------------------------------------------------
# Compressed modes: attention
# ---------------------------------------------------------------------------------------------------------------

PagedStep = Callable[[torch.Tensor], torch.Tensor]


def hack_attention(q: torch.Tensor, cu_q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                   state_slots: torch.Tensor, cache: Cache, config: KVConfig, softmax_scale: float) -> torch.Tensor:
    """reference.hack_attention, batched: 16-bit sinks and tail in fp32, the pages on their codes."""

    def attend(queries: Queries, kv: CompressedKV) -> torch.Tensor:
        return attend_segments(
            queries, kv, softmax_scale,
            lambda qh: hack_scores(qh, kv.paged, config),
            lambda p: reference.hack_pv(p, kv.paged, config, product_dtype=torch.float32))

    return compressed_attention(attend, q, cu_q, seq_lens, block_tables, state_slots, cache, config)


def hack_scores(qh: torch.Tensor, paged: dict[str, torch.Tensor], config: KVConfig) -> torch.Tensor:
    """reference.hack_scores with float32 integer products. On the channel axis K's codes enter the product with
    unit scale and zero minimum, so two of homomorphic_matmul's four float64 terms are exact zeros: computing
    the other two in place gives the same values at a fraction of the memory traffic (prefill's biggest cost)."""
    codes = paged["k_codes"]
    if config.key_axis == "token" or codes.shape[1] == 0:
        return reference.hack_scores(qh, paged, config, product_dtype=torch.float32)
    scores = _channel_scores(qh, paged, config)
    if config.token_scales:
        scores.mul_(token_factors(paged["kv_exp"], "k").mT)
    return scores


def _channel_scores(qh: torch.Tensor, paged: dict[str, torch.Tensor], config: KVConfig) -> torch.Tensor:
    """The channel axis' q·k of the (scaled) rows: hack_scores before the token scales."""
    codes = paged["k_codes"]
    pd, pi, groups = config.head_partition(codes.shape[-1]), config.partition, paged["k_scale"].shape[1]
    grouped_codes = reference.pad_tokens(codes, groups * pi).unflatten(1, (groups, pi))  # [Hkv, G, Π, D]
    folded = qh.unsqueeze(1) * paged["k_scale"].float().unsqueeze(2)  # [Hkv, G, M, D]
    k_sums = paged.get("k_sums")
    if k_sums is not None:
        k_sums = reference.pad_tokens(k_sums, groups * pi).unflatten(1, (groups, pi)).mT  # [Hkv, G, D/Πd, Π]
    scaled = unit_code_products(reference.quantize_int8_partitions(folded, pd), grouped_codes.mT, k_sums, pd)
    offsets = (qh @ paged["k_min"].float().mT).mT.unsqueeze(-1)  # [Hkv, G, M, 1]
    return (scaled + offsets).permute(0, 2, 1, 3).flatten(2)[:, :, : codes.shape[1]]


def unit_code_products(a: Quantized, b_codes: torch.Tensor, b_sums: torch.Tensor | None,
                       partition: int) -> torch.Tensor:
    """reference.homomorphic_matmul(a, B) for B = codes [..., Z, N] with scale 1 and minimum 0: the terms
    sA·Σa'b' + mA·Σb' in float64 (the dropped two are exact zeros), summed over partitions; returns fp32."""
    a_codes = a.codes.float().unflatten(-1, (-1, partition)).transpose(-3, -2)  # [..., P, M, Π]
    b_codes = b_codes.float().unflatten(-2, (-1, partition))  # [..., P, Π, N]
    b_sums = b_codes.sum(-2, keepdim=True) if b_sums is None else b_sums.unsqueeze(-2)  # [..., P, 1, N]
    sa, ma = (t.double().transpose(-1, -2).unsqueeze(-1) for t in (a.scale, a.minimum))  # [..., P, M, 1]
    out = (a_codes @ b_codes).double().mul_(sa).add_(ma * b_sums.double())
    return out.sum(-3).float()


def dequant_attention(q: torch.Tensor, cu_q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                      state_slots: torch.Tensor, cache: Cache, config: KVConfig,
                      softmax_scale: float) -> torch.Tensor:
    """reference.dequant_attention, batched: dequantize the pages to fp32, then float attention."""

    def attend(queries: Queries, kv: CompressedKV) -> torch.Tensor:
        k, v = reference.dequantize_paged(kv.paged, config)
        return attend_segments(queries, kv, softmax_scale, lambda qh: qh @ k.mT, lambda p: p @ v)

    return compressed_attention(attend, q, cu_q, seq_lens, block_tables, state_slots, cache, config)


def compressed_attention(attend: Callable[[Queries, CompressedKV], torch.Tensor], q: torch.Tensor,
                         cu_q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                         state_slots: torch.Tensor, cache: Cache, config: KVConfig) -> torch.Tensor:
    """Run attend(queries, kv) -> [B*Hkv, G*M, D] chunk by chunk; returns [T, Hq, D] in q's dtype."""
    out = torch.empty_like(q)
    _, num_kv_heads, _, head_dim = cache["tail_k"].shape
    for chunk in sequence_chunks(cu_q, block_tables, config.block_size * num_kv_heads * head_dim):
        lens = seq_lens[chunk.seqs]
        kv = read_compressed(cache, lens, block_tables[chunk.seqs], state_slots[chunk.seqs], config)
        queries = group_queries(q[chunk.rows], chunk.cu, lens, num_kv_heads, torch.float32)
        out[chunk.rows] = ungroup(attend(queries, kv), queries).to(q.dtype)
    return out


def attend_segments(queries: Queries, kv: CompressedKV, softmax_scale: float, paged_scores: PagedStep,
                    paged_output: PagedStep) -> torch.Tensor:
    """One softmax over sinks, pages and tail (the reference's order); the pages' q·k and P·V steps are given."""
    qh = queries.rows
    scores = torch.cat([qh @ kv.sink_k.mT, paged_scores(qh), qh @ kv.tail_k.mT], dim=-1)
    probs = masked_softmax(scores * softmax_scale, queries, kv.key_positions, kv.key_valid)
    p_sinks, p_paged, p_tail = probs.split(kv.sizes, dim=-1)
    return p_sinks @ kv.sink_v + paged_output(p_paged) + p_tail @ kv.tail_v
