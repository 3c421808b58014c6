"""Fast CPU attention on the compressed cache: hack (on the codes) and dequant, beside reference.py.

Same signatures and math as reference.hack_attention / dequant_attention (channel key axis; the token axis runs
torch_fast.py). What makes them fast on a CPU without integer tensor cores:
  * codes leave the pages packed and are unpacked once per call with a few integer ops on 32-bit words (a word
    holds 16 2-bit codes), straight into the layout the products consume; no float64, no byte-table gather;
  * hack Q·Kᵀ: K's per-channel scales of token group g are folded into q (q̃_g = q ⊙ sK[g]), q̃_g is quantized
    to INT8 per Πd partition of head_dim, and the integer product a·k' of each group is one batched matmul on
    integer-valued float32 tensors (exact: |Σ a k'| <= 128 * 255 * Πd < 2^24), at the size of the scores per
    partition; the corrections (mA·Σk', q·mK) are small matmuls over the group axis;
  * hack P·V: P quantized to INT8 per row and group of Π tokens, integer product with V's codes per group (same
    exactness), weighted by sP ⊗ sV; the other terms are matmuls of [rows, groups] by [groups, head_dim];
  * decode batches every sequence (groups padded to the longest); prefill runs per sequence in query blocks
    (flash-style) sized so scores stay under BLOCK_ELEMENTS, and each block only touches the key groups its
    last query can see (causal skipping of whole groups).
Groups come first in the paged tensors ([groups, B*Hkv, ...]) so that a block's visible groups are a prefix and
every product is one torch.bmm over (group, head).
"""
from __future__ import annotations

import ctypes
import functools
import logging
from typing import Callable, NamedTuple

import torch

from common.kv import native, torch_fast
from common.kv.config import KVConfig
from common.kv.format import Cache

log = logging.getLogger(__name__)
BLOCK_ELEMENTS = 1 << 21  # scores per prefill query block (B*Hkv x rows x visible keys): 8 MiB as float32
CHUNK_CODES = 1 << 22  # unpacked K codes per decode chunk of sequences: 16 MiB as float32


HEAP_BYTES = 1 << 30  # glibc keeps freed blocks up to this size in its heap (see keep_freed_memory)


@functools.cache
def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve blocks up to HEAP_BYTES from its heap and not to hand freed memory back.

    Attention allocates tens of MiB of temporaries per call; by default glibc maps each such block fresh and
    unmaps it on free, so every call page-faults its temporaries in again (measured: 29 vs 16 ms CPU time for
    one Llama-3-8B decode call at 4k tokens). A server's working set is steady, so keeping it is the right
    trade; it is what jemalloc/tcmalloc preloads do. Returns whether the setting took (glibc only)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        done = libc.mallopt(m_mmap_threshold, HEAP_BYTES) == 1 and libc.mallopt(m_trim_threshold, 2 * HEAP_BYTES) == 1
    except (OSError, AttributeError):
        done = False
    log.debug("malloc tuned for attention temporaries: %s", done)
    return done


# ---------------------------------------------------------------------------------------------------------------
# Unpacking packed codes
# ---------------------------------------------------------------------------------------------------------------


def unpack_bytes(packed: torch.Tensor, bits: int, parts: int) -> torch.Tensor:
    """Codes of packed rows uint8 [..., W] -> uint8 [..., D] (D = W*8/bits), one byte per code, in the channel
    order `channel_order(D, bits, parts)` (a permutation within each of the `parts` partitions of D).

    The bytes are read as int32 words: one shift and one mask per code position extract that code from the
    four bytes of a word at once, and each position's codes are written as one contiguous run per partition.
    Rows whose partitions are not whole words unpack in natural order, byte by byte."""
    if bits == 8:
        return packed.contiguous()
    per_byte, width = 8 // bits, packed.shape[-1]
    if width % (4 * parts):
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        return ((packed.unsqueeze(-1) >> shifts) & (2**bits - 1)).flatten(-2)
    words = packed.contiguous().view(torch.int32).unflatten(-1, (parts, -1))  # [..., P, words per partition]
    planes = words.new_empty((*words.shape[:-1], per_byte, words.shape[-1]))  # [..., P, pb, words]
    mask = (2**bits - 1) * 0x01010101
    for s in range(per_byte):
        torch.bitwise_and(words >> (bits * s), mask, out=planes[..., s, :])
    return planes.view(torch.uint8).view(*packed.shape[:-1], width * per_byte)


@functools.cache
def channel_order(head_dim: int, bits: int, parts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, inverse) of unpack_bytes: position c' of its output holds channel order[c'] of the row;
    x[..., inverse] puts a tensor in that order back in natural channel order."""
    width = head_dim * bits // 8
    if bits == 8 or width % (4 * parts):
        order = torch.arange(head_dim)
    else:
        per_byte, words = 8 // bits, width // 4 // parts
        p, s, w, j = torch.meshgrid(torch.arange(parts), torch.arange(per_byte), torch.arange(words),
                                    torch.arange(4), indexing="ij")
        order = (p * (head_dim // parts) + (4 * w + j) * per_byte + s).flatten()
    return order, torch.argsort(order)


# ---------------------------------------------------------------------------------------------------------------
# Reading a batch: sinks, tails and the pages in group-major layout
# ---------------------------------------------------------------------------------------------------------------


class Keys(NamedTuple):
    """What attention reads for a batch of B sequences (BH = B*Hkv, g = token groups of Π on the pages)."""

    sink_k: torch.Tensor  # fp32 [BH, sinks, D]
    sink_v: torch.Tensor  # zero past each sequence's sinks
    tail_k: torch.Tensor  # fp32 [BH, tail, D]: the open partition plus the 16-bit window (config.window)
    tail_v: torch.Tensor  # zero past each sequence's tail
    pages: dict[str, torch.Tensor]  # see read_pages
    n_sinks: torch.Tensor  # [B]
    n_paged: torch.Tensor  # [B]
    n_tail: torch.Tensor  # [B]
    groups: int  # token groups of Π on the pages read
    partition: int  # Π


def read_keys(cache: Cache, seq_lens: torch.Tensor, block_tables: torch.Tensor, state_slots: torch.Tensor,
              config: KVConfig, layout: str) -> Keys:
    n_sinks, n_paged, n_tail = torch_fast.stored_counts(seq_lens, config)
    sink_k, sink_v, _ = torch_fast.read_state(cache, "sink", state_slots, n_sinks)
    tail_k, tail_v, _ = torch_fast.read_state(cache, "tail", state_slots, n_tail)
    filled = -(-int(n_paged.max()) // config.block_size)
    if layout == "native":  # the C products read the pages (and token scales) in place
        pages = {"tables": block_tables.to(torch.int32).contiguous()}
    else:
        pages = read_pages(cache, torch_fast.page_ids(block_tables[:, :filled], n_paged, config.block_size),
                           n_paged, config, layout)
    groups = filled * config.block_size // config.partition
    return Keys(sink_k, sink_v, tail_k, tail_v, pages, n_sinks, n_paged, n_tail, groups, config.partition)


def read_pages(cache: Cache, pages: torch.Tensor, n_paged: torch.Tensor, config: KVConfig,
               layout: str) -> dict[str, torch.Tensor]:
    """The codes and parameters of the pages [B, np] as fp32, channels in `channel_order` of their codes' width
    (K's "order" for the queries, V's "inverse" for the outputs), BH = B*Hkv, g = token groups, L = g*Π:
      both layouts  v      [BH, L, D]   V's codes times their per-channel scale (exact in fp32); dequant adds
                                        the minimum (the dequantized V)
                    v_min  [BH, g, D],  sv_sums [BH, g, D] = V's scale times its code sums
      "hack"        k      [g, BH, P, Π, Πd] K's codes per head_dim partition, k_scale/k_min [g, BH, D],
                    k_sums [g, BH, P, Π]
      "dequant"     k      [BH, L, D]   the dequantized K
    and with token scales "k_factor"/"v_factor" (`torch_fast.paged_token_factors`; the dequant layout folds
    them into k and v). Unstored groups get zero parameters (a stale NaN would poison the sums). Only packed
    bytes and per-group parameters are gathered from the pool."""
    batch, num_pages = pages.shape
    pi, bs, bits, k_bits = config.partition, config.block_size, config.bits, config.k_bits
    heads, head_dim = cache["tail_k"].shape[1], cache["tail_k"].shape[-1]
    groups, pd = num_pages * bs // pi, config.head_partition(head_dim)
    parts = head_dim // pd
    orders = {"k": channel_order(head_dim, k_bits, parts), "v": channel_order(head_dim, bits, parts)}
    stored = torch.arange(groups * pi).view(groups, pi)[None] < n_paged[:, None, None]  # [B, g, Π]
    group_stored = stored[:, :, 0]  # [B, g]
    params = {}
    for name in ("k_scale", "k_min", "v_scale", "v_min") + (("v_sums",) if config.sum_elimination else ()):
        rows = cache[name][pages].index_select(-1, orders[name[0]][0]).float()  # [B, np, Hkv, bs/Π, D]
        rows = rows.transpose(1, 2).contiguous().view(batch, heads, groups, head_dim)
        params[name] = rows.masked_fill_(~group_stored[:, None, :, None], 0).view(batch * heads, groups, head_dim)
    # the only per-token gathers, 2 bits a value; the packed rows are put in the order the products read
    k_packed = cache["k_codes"][pages]  # [B, np, Hkv, bs, W]
    width = k_packed.shape[-1]
    k_packed = k_packed.view(batch, num_pages, heads, bs // pi, pi, parts, width // parts).permute(1, 3, 0, 2, 5, 4, 6)
    k_codes = unpack_bytes(k_packed, k_bits, 1).view(groups, batch, heads, parts, pi, pd)  # K per partition
    v_codes = unpack_bytes(cache["v_codes"][pages].transpose(1, 2), bits, parts)  # [B, Hkv, np, bs, D]
    v_codes = v_codes.view(batch, heads, groups, pi, head_dim)
    if not config.sum_elimination and not bool(stored.all()):
        v_codes = v_codes.masked_fill(~stored[:, None, :, :, None], 0)
    out = {"order": orders["k"][0], "inverse": orders["v"][1], "v_min": params["v_min"]}
    if config.token_scales:
        out |= torch_fast.paged_token_factors(cache, pages)
    out["v"] = _scale_groups(v_codes, params["v_scale"], params["v_min"] if layout == "dequant" else None)
    v_sums = params["v_sums"] if config.sum_elimination else \
        v_codes.sum(3, dtype=torch.float32).view(batch * heads, groups, head_dim)
    out["sv_sums"] = params["v_scale"] * v_sums
    if layout == "dequant":
        k_tokens = k_codes.permute(1, 2, 0, 4, 3, 5).reshape(batch, heads, groups, pi, head_dim)
        out["k"] = _scale_groups(k_tokens, params["k_scale"], params["k_min"])
        if config.token_scales:
            out["k"].mul_(out.pop("k_factor").unsqueeze(-1))
            out["v"].mul_(out.pop("v_factor").unsqueeze(-1))
        return out
    k = out["k"] = k_codes.reshape(groups, batch * heads, parts, pi, pd).float()  # copies if not adjacent
    out["k_scale"], out["k_min"] = (params[name].transpose(0, 1).contiguous() for name in ("k_scale", "k_min"))
    if config.sum_elimination:
        sums = cache["k_sums"][pages].float()  # [B, np, Hkv, bs, P]
        sums = sums.view(batch, num_pages, heads, bs // pi, pi, parts).permute(1, 3, 0, 2, 5, 4)
        out["k_sums"] = sums.reshape(groups, batch * heads, parts, pi)
    else:
        out["k_sums"] = k.sum(-1)
    return out


def _scale_groups(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None) -> torch.Tensor:
    """s*q (+ m) of codes [B, Hkv, g, Π, D] with per-group scale/min [BH, g, D] -> fp32 [BH, g*Π, D]."""
    batch, heads, groups, pi, head_dim = codes.shape
    values = torch.empty((batch * heads, groups, pi, head_dim))
    values.copy_(codes.reshape(batch * heads, groups, pi, head_dim)).mul_(scale.unsqueeze(2))  # a mixed-dtype
    # mul (uint8 x fp32) would be ~20x slower than this conversion plus an fp32 mul
    if minimum is not None:
        values.add_(minimum.unsqueeze(2))
    return values.view(batch * heads, groups * pi, head_dim)


# ---------------------------------------------------------------------------------------------------------------
# 8-bit quantization of the folded queries and of the probabilities
# ---------------------------------------------------------------------------------------------------------------


def quantize_u8_(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8-bit asymmetric quantization over the last dim, in place: x becomes its codes 0..255 (integer-valued
    fp32); returns (codes, scale, minimum), x ≈ scale*codes + minimum. The reference's operations in its order
    (reference.quantize_int8 stores the same codes minus 128, with the minimum plus 128*scale: the same values);
    no clamp is needed, (x - min)/scale lies in [0, 255] up to rounding."""
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)  # two reductions: faster than torch.aminmax
    scale = (hi - lo) / 255
    x.sub_(lo).div_(torch.where(scale > 0, scale, torch.ones_like(scale))).round_()
    return x, scale.squeeze(-1), lo.squeeze(-1)


# ---------------------------------------------------------------------------------------------------------------
# The paged products
# ---------------------------------------------------------------------------------------------------------------


def hack_scores(qh: torch.Tensor, pages: dict[str, torch.Tensor], groups: int, out: torch.Tensor) -> None:
    """q·k of rows qh [BH, R, D] over the first `groups` key groups into out [BH, R, groups*Π]
    (reference.hack_scores, channel axis): per group, q folded with K's scales and quantized to 8 bits per Πd
    partition, the exact integer product with K's codes (integer-valued fp32 batched matmul), then
    scale x product + minimum x code sums + q·mK (one small matmul)."""
    k = pages["k"][:groups]  # [g, BH, P, Π, Πd]
    _, bh, parts, pi, pd = k.shape
    rows = qh.shape[1]
    qh = qh.index_select(-1, pages["order"])  # the codes' channel order
    q_parts = qh.view(bh, rows, parts, pd).transpose(1, 2).contiguous()
    folded = q_parts.unsqueeze(0) * pages["k_scale"][:groups].view(groups, bh, parts, 1, pd)  # [g, BH, P, R, Πd]
    codes, scale, minimum = quantize_u8_(folded)
    if rows < pi:  # decode: the longer side first is faster for such thin products
        integer = torch.bmm(k.view(-1, pi, pd), codes.view(-1, rows, pd).mT).mT
    else:
        integer = torch.bmm(codes.view(-1, rows, pd), k.view(-1, pi, pd).mT)
    integer = integer.view(groups, bh, parts, rows, pi)
    scores = torch.mul(integer[:, :, 0], scale[:, :, 0, :, None])
    for p in range(1, parts):
        scores.addcmul_(integer[:, :, p], scale[:, :, p, :, None])
    offsets = torch.bmm(qh, pages["k_min"][:groups].permute(1, 2, 0))  # [BH, R, g]: q·mK
    corrections = torch.cat([minimum.transpose(-1, -2), offsets.permute(2, 0, 1).unsqueeze(-1)], dim=-1)  # [g, BH, R, P+1]
    sums = torch.cat([pages["k_sums"][:groups], torch.ones_like(pages["k_sums"][:groups, :, :1])], dim=2)
    scores = scores.view(-1, rows, pi).baddbmm_(corrections.view(-1, rows, parts + 1), sums.view(-1, parts + 1, pi))
    out.view(bh, rows, groups, pi).copy_(scores.view(groups, bh, rows, pi).permute(1, 2, 0, 3))
    scale_paged_(out, pages, "k_factor")


def hack_pv(p: torch.Tensor, pages: dict[str, torch.Tensor], groups: int) -> torch.Tensor:
    """P·V of probabilities p [BH, R, groups*Π] over the first `groups` value groups: [BH, R, D]
    (reference.hack_pv): P quantized to 8 bits per row and group of Π, its codes times their scale against V's
    codes times theirs in one matmul over all groups (fp32 accumulation), plus minimum x (scale x code sums)
    and (Σ dequantized P) x V's minimum as small matmuls over the groups."""
    bh, rows, length = p.shape
    pi = length // groups if groups else 1
    codes = p.reshape(bh, rows, groups, pi).clone()
    scale_paged_(codes.view(bh, rows, length), pages, "v_factor")
    codes, scale, minimum = quantize_u8_(codes)  # scale, minimum [BH, R, g]
    p_hat_sums = torch.addcmul(pi * minimum, scale, codes.sum(-1))  # Σ_t of the dequantized P per group
    out = torch.bmm(codes.mul_(scale.unsqueeze(-1)).view(bh, rows, length), pages["v"][:, :length])
    out.baddbmm_(minimum, pages["sv_sums"][:, :groups]).baddbmm_(p_hat_sums, pages["v_min"][:, :groups])
    return out.index_select(-1, pages["inverse"])


def scale_paged_(x: torch.Tensor, pages: dict[str, torch.Tensor], factor: str) -> None:
    """x [BH, R, L'] (paged scores or probabilities, L' <= L) times each token's 2^e, in place, where the pages
    carry token factors (read_pages)."""
    if factor in pages:
        x.mul_(pages[factor][:, None, : x.shape[-1]])


# ---------------------------------------------------------------------------------------------------------------
# Attention over sinks, pages and tail
# ---------------------------------------------------------------------------------------------------------------

PagedScores = Callable[[torch.Tensor, int, torch.Tensor], None]  # (rows, visible groups, out [BH, R, g*Π])
PagedOutput = Callable[[torch.Tensor, int], torch.Tensor]  # (probabilities, visible groups) -> [BH, R, D]


def attend_rows(qh: torch.Tensor, row_pos: torch.Tensor, keys: Keys, groups: int, softmax_scale: float,
                scores_fn: PagedScores, output_fn: PagedOutput) -> torch.Tensor:
    """Causal attention of rows qh [BH, R, D] at positions row_pos [B, R] over the sinks, the first `groups`
    page groups and the tail: one fp32 softmax (reference order: sinks, pages, tail). Only the key columns
    some row must not see are masked."""
    batch, rows = row_pos.shape
    pi, tail, sinks = keys.partition, keys.tail_k.shape[1], keys.sink_k.shape[1]
    paged = groups * pi
    sink_slots, paged_slots, tail_slots = (torch.arange(n)[None] for n in (sinks, paged, tail))
    key_pos = torch.cat([sink_slots.expand(batch, -1), keys.n_sinks[:, None] + paged_slots,
                         (keys.n_sinks + keys.n_paged)[:, None] + tail_slots], dim=1)
    valid = torch.cat([sink_slots < keys.n_sinks[:, None], paged_slots < keys.n_paged[:, None],
                       tail_slots < keys.n_tail[:, None]], dim=1)
    scaled = qh * softmax_scale
    scores = qh.new_empty((qh.shape[0], rows, sinks + paged + tail))
    torch.bmm(scaled, keys.sink_k.mT, out=scores[:, :, :sinks]) if sinks else None
    scores_fn(scaled, groups, scores[:, :, sinks : sinks + paged])
    scores[:, :, sinks + paged :] = scaled @ keys.tail_k.mT
    seen_by_all = valid & (key_pos <= row_pos.min(dim=1).values[:, None])  # [B, L]
    first = int((~seen_by_all).any(0).int().argmax()) if not bool(seen_by_all.all()) else scores.shape[-1]
    if first < scores.shape[-1]:
        hidden = ~(valid[:, None, first:] & (key_pos[:, None, first:] <= row_pos[:, :, None]))  # [B, R, L - first]
        scores.view(batch, -1, rows, scores.shape[-1])[..., first:].masked_fill_(hidden[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    p_sinks, p_paged, p_tail = probs.split([sinks, paged, tail], dim=-1)
    out = output_fn(p_paged, groups)
    return out.baddbmm_(p_sinks, keys.sink_v).baddbmm_(p_tail, keys.tail_v)


# ---------------------------------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------------------------------


def hack_attention(q: torch.Tensor, cu_q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                   state_slots: torch.Tensor, cache: Cache, config: KVConfig, softmax_scale: float) -> torch.Tensor:
    """reference.hack_attention: homomorphic attention on the codes, never dequantizing K or V."""
    if native_ok(config, q.shape[-1]):
        if q.shape[0] == seq_lens.shape[0]:
            return _native_hack_decode(q, seq_lens, block_tables, state_slots, cache, config, softmax_scale)
        return _attention(_native_attend(cache, config, softmax_scale), "native", q, cu_q, seq_lens, block_tables,
                          state_slots, cache, config)
    if not fast_path(config, q.shape[-1]):
        return torch_fast.hack_attention(q, cu_q, seq_lens, block_tables, state_slots, cache, config,
                                         softmax_scale)

    def attend(qh: torch.Tensor, row_pos: torch.Tensor, keys: Keys, groups: int) -> torch.Tensor:
        return attend_rows(qh, row_pos, keys, groups, softmax_scale,
                           lambda rows, g, out: hack_scores(rows, keys.pages, g, out),
                           lambda p, g: hack_pv(p, keys.pages, g))

    return _attention(attend, "hack", q, cu_q, seq_lens, block_tables, state_slots, cache, config)


def dequant_attention(q: torch.Tensor, cu_q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                      state_slots: torch.Tensor, cache: Cache, config: KVConfig,
                      softmax_scale: float) -> torch.Tensor:
    """reference.dequant_attention: dequantize the pages to fp32 once per call, then float attention."""
    if not fast_path(config, q.shape[-1]):
        return torch_fast.dequant_attention(q, cu_q, seq_lens, block_tables, state_slots, cache, config,
                                            softmax_scale)

    def attend(qh: torch.Tensor, row_pos: torch.Tensor, keys: Keys, groups: int) -> torch.Tensor:
        length = groups * keys.partition
        k, v = keys.pages["k"][:, :length], keys.pages["v"][:, :length]  # channels in codes order
        order, inverse = keys.pages["order"], keys.pages["inverse"]
        return attend_rows(qh, row_pos, keys, groups, softmax_scale,
                           lambda rows, _, out: torch.bmm(rows.index_select(-1, order), k.mT, out=out),
                           lambda p, _: (p @ v).index_select(-1, inverse))

    return _attention(attend, "dequant", q, cu_q, seq_lens, block_tables, state_slots, cache, config)


def fast_path(config: KVConfig, head_dim: int) -> bool:
    """Whether these ops serve the configuration (else torch_fast.py does): the channel key axis, whole token
    groups per page."""
    return config.key_axis == "channel" and config.block_size % config.partition == 0 and head_dim > 0


def native_ok(config: KVConfig, head_dim: int) -> bool:
    """Whether hack attention runs the compiled paged products (native.py): built here, the channel key axis,
    and K's and V's codes whole bytes per head_dim partition (each product reads its own width)."""
    pd = config.head_partition(head_dim)
    return (fast_path(config, head_dim) and all(pd % (8 // bits) == 0 for bits in (config.k_bits, config.bits))
            and native.library() is not None)


def _native_hack_decode(q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                        state_slots: torch.Tensor, cache: Cache, config: KVConfig,
                        softmax_scale: float) -> torch.Tensor:
    """hack_attention for one query per sequence with the paged products in C (native.py): the packed pages
    are read in place; the sinks and tail (16-bit, a few rows) and the softmax stay in torch."""
    keep_freed_memory()
    heads, batch, head_dim = cache["tail_k"].shape[1], q.shape[0], q.shape[-1]
    n_sinks, n_paged, n_tail = torch_fast.stored_counts(seq_lens, config)
    sink_k, sink_v, _ = torch_fast.read_state(cache, "sink", state_slots, n_sinks)
    tail_k, tail_v, _ = torch_fast.read_state(cache, "tail", state_slots, n_tail)
    qh = _group_heads(q.unsqueeze(1), heads) * softmax_scale  # [B*Hkv, G, D] (a view of q: no in-place op)
    rows = qh.shape[1]
    sinks, paged, tail = sink_k.shape[1], int(n_paged.max()), tail_k.shape[1]
    k_geometry, v_geometry = (_geometry(cache, block_tables, config, rows, head_dim, part) for part in "kv")
    tables, n_paged = block_tables.to(torch.int32).contiguous(), n_paged.contiguous()
    scores = qh.new_empty((qh.shape[0], rows, sinks + paged + tail))
    torch.bmm(qh, sink_k.mT, out=scores[:, :, :sinks])
    native.hack_paged_scores(k_geometry, cache, tables, n_paged, qh, scores[:, :, sinks : sinks + paged])
    torch.bmm(qh, tail_k.mT, out=scores[:, :, sinks + paged :])
    valid = torch.cat([torch.arange(n)[None] < count[:, None]
                       for n, count in ((sinks, n_sinks), (paged, n_paged), (tail, n_tail))], dim=1)  # [B, L]
    scores.view(batch, heads, rows, -1).masked_fill_(~valid[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = native.hack_paged_pv(v_geometry, cache, tables, n_paged, probs[:, :, sinks : sinks + paged])
    out.baddbmm_(probs[:, :, :sinks], sink_v).baddbmm_(probs[:, :, sinks + paged :], tail_v)
    return _ungroup_heads(out, batch, 1)[:, 0].to(q.dtype)


def _geometry(cache: Cache, block_tables: torch.Tensor, config: KVConfig, rows: int, head_dim: int,
              part: str) -> native.Geometry:
    """The C products' geometry for K's codes and token exponents (part "k": the scores) or V's ("v": P·V)."""
    bits, exp_shift = (config.k_bits, 0) if part == "k" else (config.bits, 4)
    return native.Geometry(cache["tail_k"].shape[1], head_dim, bits, config.partition,
                           config.head_partition(head_dim), config.block_size, rows, block_tables.shape[1],
                           exp_shift)


def _native_attend(cache: Cache, config: KVConfig, softmax_scale: float) -> "Attend":
    """attend() for prefill query blocks with the paged products in C, reading the pages in place (the keys
    of layout "native" carry the sequence's block table instead of unpacked pages)."""

    def attend(qh: torch.Tensor, row_pos: torch.Tensor, keys: Keys, groups: int) -> torch.Tensor:
        table = keys.pages["tables"]
        visible = keys.n_paged.clamp(max=groups * keys.partition).contiguous()
        k_geometry, v_geometry = (_geometry(cache, table, config, qh.shape[1], qh.shape[-1], part) for part in "kv")
        return attend_rows(qh, row_pos, keys, groups, softmax_scale,
                           lambda rows, _, out: native.hack_paged_scores(k_geometry, cache, table, visible,
                                                                         rows.contiguous(), out),
                           lambda p, _: native.hack_paged_pv(v_geometry, cache, table, visible, p))

    return attend


Attend = Callable[[torch.Tensor, torch.Tensor, Keys, int], torch.Tensor]


def _attention(attend: Attend, layout: str, q: torch.Tensor, cu_q: torch.Tensor, seq_lens: torch.Tensor,
               block_tables: torch.Tensor, state_slots: torch.Tensor, cache: Cache,
               config: KVConfig) -> torch.Tensor:
    """Decode (one query per sequence): the batch in chunks of sequences. Otherwise sequence by sequence, in
    query blocks. Returns [T, Hq, D] in q's dtype."""
    keep_freed_memory()
    out = torch.empty_like(q)
    heads = cache["tail_k"].shape[1]
    if q.shape[0] == seq_lens.shape[0]:
        per_sequence = max(1, block_tables.shape[1] * config.block_size * heads * q.shape[-1])
        step = max(1, CHUNK_CODES // per_sequence)
        for start in range(0, q.shape[0], step):
            rows = slice(start, start + step)
            keys = read_keys(cache, seq_lens[rows], block_tables[rows], state_slots[rows], config, layout)
            qh = _group_heads(q[rows].unsqueeze(1), heads)  # [B*Hkv, G, D]
            row_pos = (seq_lens[rows] - 1)[:, None].expand(-1, qh.shape[1])
            batch = qh.shape[0] // heads
            out[rows] = _ungroup_heads(attend(qh, row_pos, keys, keys.groups), batch, 1)[:, 0].to(q.dtype)
        return out
    bounds = cu_q.tolist()
    for i in range(seq_lens.shape[0]):
        one = slice(i, i + 1)
        keys = read_keys(cache, seq_lens[one], block_tables[one], state_slots[one], config, layout)
        _prefill_sequence(attend, q[bounds[i] : bounds[i + 1]], int(seq_lens[i]), keys, config, heads,
                          out[bounds[i] : bounds[i + 1]])
    return out


def _prefill_sequence(attend: Attend, q: torch.Tensor, seq_len: int, keys: Keys, config: KVConfig, heads: int,
                      out: torch.Tensor) -> None:
    """The queries q [n, Hq, D] (the last n positions) of one sequence in blocks of rows; each block attends to
    the key groups its last query can see."""
    n, num_q_heads = q.shape[0], q.shape[1]
    first_pos, sinks, pi = seq_len - n, int(keys.n_sinks[0]), config.partition
    keys_total = keys.sink_k.shape[1] + keys.groups * pi + keys.tail_k.shape[1]
    block = max(1, BLOCK_ELEMENTS // (num_q_heads * keys_total))
    for start in range(0, n, block):
        stop = min(n, start + block)
        last_pos = first_pos + stop - 1
        groups = min(keys.groups, max(0, (last_pos - sinks) // pi + 1))
        qh = _group_heads(q[start:stop], heads)  # [Hkv, G*m, D]
        positions = torch.arange(first_pos + start, first_pos + stop)
        row_pos = positions.repeat(num_q_heads // heads)[None]
        out[start:stop] = _ungroup_heads(attend(qh, row_pos, keys, groups), 1, stop - start)[0].to(out.dtype)


def _group_heads(q: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, m, Hq, D] or [m, Hq, D] -> [B*Hkv, G*m, D] (query heads of a KV head, then tokens: the reference's
    grouping); a 3-d input is one sequence."""
    if q.dim() == 3:
        q = q.unsqueeze(0)
    batch, m, hq, d = q.shape
    grouped = q.float().view(batch, m, heads, hq // heads, d).permute(0, 2, 3, 1, 4)
    return grouped.reshape(batch * heads, hq // heads * m, d)


def _ungroup_heads(x: torch.Tensor, batch: int, m: int) -> torch.Tensor:
    """Inverse of _group_heads: [B*Hkv, G*m, D] -> [B, m, Hq, D]."""
    bh, rows, d = x.shape
    heads, group = bh // batch, rows // m
    return x.view(batch, heads, group, m, d).permute(0, 3, 1, 2, 4).reshape(batch, m, heads * group, d)
