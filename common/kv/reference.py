"""Pure-torch reference of HACK's compute: the ground truth the Triton kernels must match.

Homomorphic product. A [M, Z] and B [Z, N] are both quantized in partitions p of Π along the reduction dim Z
(A per row, B per column). With a', b' the codes and s, m the per-partition scale/min:
    (AB)_ij ≈ Σ_p [ sA sB Σ_{k∈p} a'_ik b'_kj + sA mB Σ_{k∈p} a'_ik + mA sB Σ_{k∈p} b'_kj + |p| mA mB ]
The first term is an integer matmul (int8 × b-bit codes, int32 accumulation; emulated here in float64, which
is exact for these magnitudes), the rest are rank-1 corrections from per-partition code sums.

Attention on the compressed cache (one sequence, one KV head, a query q at position i, keys at positions ≤ i):
  * sinks and the open tail are 16-bit: plain fp32 dot products.
  * key_axis="token": q is quantized to INT8 per Πd partition of head_dim; q·k_t is the homomorphic product
    with K's per-token partitions.
  * key_axis="channel": K's per-channel scale of token group g is folded into q (q̃_g = q ⊙ sK[g]), q̃_g is
    quantized to INT8 per Πd partition, and q·k_t = homomorphic(q̃_g, k'_t) + q·mK[g].
  * softmax in fp32; the probabilities P of the paged tokens are quantized to INT8 per row over each group of Π
    token positions (the same groups as V's scales; masked positions are p = 0), and P·V is the homomorphic
    product with V's per-channel token-group partitions.
INT8 form of Q and P: asymmetric 8-bit codes 0..255 stored as signed int8 (code - 128) with the minimum shifted
by 128*s, so x ≈ s*a + m' with a in [-128, 127] (what an int8 tensor-core dot consumes). P is quantized after
normalization; quantization is scale-equivariant, so a kernel quantizing unnormalized online-softmax tiles of Π
tokens gets the same codes up to float rounding.

Kernel-friendly signatures: every function takes packed tensors, cu offsets, lengths, block tables and the
per-layer cache dict (`format.py` names and shapes), never Python objects of the pool. Conventions:
    q          [T, Hq, D] new queries of all sequences, sequence i owns rows cu_q[i]:cu_q[i+1]
    seq_lens   [B] tokens stored for each sequence *including* this forward's; the queries of sequence i are its
               last cu_q[i+1]-cu_q[i] tokens (causal)
    block_tables [B, max_blocks] int32, page ids (unused entries are ignored)
    state_slots  [B] int64, index into the sink_*/tail_* tensors
"""
from __future__ import annotations

import torch

from common.kv.config import KVConfig
from common.kv.format import (Cache, Quantized, dequantize, quantize, quantize_tokens, quantized_count, split_tokens,
                              token_factors, unpack_codes)


# ---------------------------------------------------------------------------------------------------------------
# INT8 quantization of Q and P, and the homomorphic matmul
# ---------------------------------------------------------------------------------------------------------------


def quantize_int8(x: torch.Tensor) -> Quantized:
    """Signed INT8 form of 8-bit asymmetric quantization over the last dim: int8 codes, fp32 scale and min."""
    q = quantize(x, 8, param_dtype=None)
    signed = (q.codes.to(torch.int16) - 128).to(torch.int8)
    return Quantized(signed, q.scale, q.minimum + 128 * q.scale)


def quantize_int8_partitions(x: torch.Tensor, partition: int) -> Quantized:
    """INT8 per partition of the last dim: codes [..., Z], scale/min [..., Z/partition]."""
    q = quantize_int8(x.unflatten(-1, (-1, partition)))
    return Quantized(q.codes.flatten(-2), q.scale, q.minimum)


def homomorphic_matmul(
    a: Quantized,
    b: Quantized,
    partition: int,
    a_sums: torch.Tensor | None = None,
    b_sums: torch.Tensor | None = None,
    product_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """A·B from codes: A codes [..., M, Z] with scale/min [..., M, Z/Π]; B codes [..., Z, N] with scale/min
    [..., Z/Π, N]. Sums (same shapes as the scales) are recomputed from the codes when not given. Returns fp32.

    The integer products run in product_dtype: float64 here; float32 (torch_fast.py) is exact as well, since
    |Σ a'·b'| <= 128 * 255 * Π < 2^24, and moves half the bytes. The corrections are float64 either way."""
    z = a.codes.shape[-1]
    if z % partition or b.codes.shape[-2] != z:
        raise ValueError(f"reduction dims {z} and {b.codes.shape[-2]} must match and be multiples of {partition}")
    a_codes = a.codes.to(product_dtype).unflatten(-1, (-1, partition)).transpose(-3, -2)  # [..., P, M, Π]
    b_codes = b.codes.to(product_dtype).unflatten(-2, (-1, partition))  # [..., P, Π, N]
    integer = (a_codes @ b_codes).double()  # [..., P, M, N]: the int8 x codes dot with int32 accumulation
    a_sums = a_codes.sum(-1, keepdim=True) if a_sums is None else a_sums.transpose(-1, -2).unsqueeze(-1)
    b_sums = b_codes.sum(-2, keepdim=True) if b_sums is None else b_sums.unsqueeze(-2)
    a_sums, b_sums = a_sums.double(), b_sums.double()
    sa, ma = (t.double().transpose(-1, -2).unsqueeze(-1) for t in (a.scale, a.minimum))  # [..., P, M, 1]
    sb, mb = (t.double().unsqueeze(-2) for t in (b.scale, b.minimum))  # [..., P, 1, N]
    out = sa * sb * integer + sa * mb * a_sums + ma * sb * b_sums + partition * ma * mb
    return out.sum(-3).float()


# ---------------------------------------------------------------------------------------------------------------
# Page addressing
# ---------------------------------------------------------------------------------------------------------------


def page_spans(start: int, count: int, block_size: int) -> list[tuple[int, int, int, int]]:
    """Split compressed indices [start, start+count) at page boundaries: (table index, slot, src offset, n)."""
    spans, done = [], 0
    while done < count:
        c = start + done
        n = min(block_size - c % block_size, count - done)
        spans.append((c // block_size, c % block_size, done, n))
        done += n
    return spans


def write_rows(cache: Cache, rows: dict[str, torch.Tensor], block_table: torch.Tensor, start: int, count: int,
               block_size: int) -> None:
    """Write page rows ([Hkv, rows, width] per field) of `count` tokens at compressed index `start` (a multiple
    of each field's tokens_per_row): one indexed write per field, page ids read on the tensor's device (no
    per-page host sync)."""
    for name, src in rows.items():
        rows_per_page = cache[name].shape[2]
        per_row = block_size // rows_per_page
        row_ids = torch.arange(start // per_row, start // per_row + -(-count // per_row), device=block_table.device)
        pages = block_table[row_ids // rows_per_page].long()
        cache[name][pages, :, row_ids % rows_per_page] = src[:, : row_ids.shape[0]].transpose(0, 1).to(cache[name].dtype)


def gather_rows(cache: Cache, name: str, block_table: torch.Tensor, start: int, count: int,
                block_size: int) -> torch.Tensor:
    """Rows of field `name` for compressed indices [start, start+count), concatenated over pages: [Hkv, rows, w]."""
    per_row = block_size // cache[name].shape[2]
    parts = [
        cache[name][int(block_table[table_idx]), :, slot // per_row : slot // per_row + -(-n // per_row)]
        for table_idx, slot, _, n in page_spans(start, count, block_size)
    ]
    if not parts:
        return cache[name].new_empty((cache[name].shape[1], 0, cache[name].shape[3]))
    return torch.cat(parts, dim=1)


def stored_split(seq_len: int, config: KVConfig) -> tuple[int, int, int]:
    """(sinks, paged, tail): how a compressed sequence's tokens are *read* by attention. With requant_elimination
    off the open partition is read from its (requantized) page codes, so the tail is empty."""
    split = split_tokens(seq_len, config)
    if not config.requant_elimination:
        return split.sinks, split.quantized + split.tail, 0
    return split


# ---------------------------------------------------------------------------------------------------------------
# Storing K and V
# ---------------------------------------------------------------------------------------------------------------


def store_fp16_kv(k: torch.Tensor, v: torch.Tensor, cu_new: torch.Tensor, num_cached: torch.Tensor,
                  block_tables: torch.Tensor, cache: Cache, block_size: int) -> None:
    """fp16 mode: write the new tokens k, v [T, Hkv, D] of each sequence at positions num_cached[i]..."""
    for i in range(len(num_cached)):
        rows = slice(int(cu_new[i]), int(cu_new[i + 1]))
        new = {"k": k[rows].transpose(0, 1).to(cache["k"].dtype), "v": v[rows].transpose(0, 1).to(cache["v"].dtype)}
        write_rows(cache, new, block_tables[i], int(num_cached[i]), rows.stop - rows.start, block_size)


def store_compressed_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    cu_new: torch.Tensor,
    num_cached: torch.Tensor,
    block_tables: torch.Tensor,
    state_slots: torch.Tensor,
    cache: Cache,
    config: KVConfig,
    generator: torch.Generator | None = None,
) -> None:
    """dequant/hack modes: append the new tokens k, v [T, Hkv, D] of each sequence.

    The first num_sinks positions go to the sinks; the rest stream through the 16-bit tail, and every partition of
    Π tokens that leaves config.window newer tokens behind it is quantized once into its page slots (tail flush). With requant_elimination off, the
    open partition is also requantized into its page slots from the 16-bit tail.
    """
    for i in range(len(num_cached)):
        rows = slice(int(cu_new[i]), int(cu_new[i + 1]))
        _append_sequence(k[rows].transpose(0, 1), v[rows].transpose(0, 1), int(num_cached[i]), block_tables[i],
                         int(state_slots[i]), cache, config, generator)


def _append_sequence(k: torch.Tensor, v: torch.Tensor, cached: int, block_table: torch.Tensor, slot: int,
                     cache: Cache, config: KVConfig, generator: torch.Generator | None) -> None:
    bs, sinks = config.block_size, config.num_sinks
    new_sinks = max(0, min(sinks - cached, k.shape[1]))
    if new_sinks:
        cache["sink_k"][slot, :, cached : cached + new_sinks] = k[:, :new_sinks]
        cache["sink_v"][slot, :, cached : cached + new_sinks] = v[:, :new_sinks]
    first = max(cached - sinks, 0)  # compressed index of the first new non-sink token
    group_start = quantized_count(first, config)  # the first tail token's compressed index
    open_len = first - group_start
    stream_k = torch.cat([cache["tail_k"][slot, :, :open_len], k[:, new_sinks:].to(cache["tail_k"].dtype)], 1)
    stream_v = torch.cat([cache["tail_v"][slot, :, :open_len], v[:, new_sinks:].to(cache["tail_v"].dtype)], 1)
    full = quantized_count(group_start + stream_k.shape[1], config) - group_start
    with_sums = config.sum_elimination
    if full:
        rows = quantize_tokens(stream_k[:, :full], stream_v[:, :full], config, generator, with_sums)
        write_rows(cache, rows, block_table, group_start, full, bs)
    left = stream_k.shape[1] - full
    cache["tail_k"][slot, :, :left] = stream_k[:, full:]
    cache["tail_v"][slot, :, :left] = stream_v[:, full:]
    if left and not config.requant_elimination:
        rows = quantize_tokens(stream_k[:, full:], stream_v[:, full:], config, generator, with_sums)
        write_rows(cache, rows, block_table, group_start + full, left, bs)


# ---------------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------------


def hack_attention(
    q: torch.Tensor,
    cu_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    state_slots: torch.Tensor,
    cache: Cache,
    config: KVConfig,
    softmax_scale: float,
) -> torch.Tensor:
    """Homomorphic causal attention of the new queries over the compressed cache (prefill, chunked prefill and
    decode alike). Returns [T, Hq, D] in q's dtype; never dequantizes K or V."""
    out = torch.empty_like(q)
    for i in range(len(seq_lens)):
        rows = slice(int(cu_q[i]), int(cu_q[i + 1]))
        out[rows] = _hack_sequence(q[rows], int(seq_lens[i]), block_tables[i], int(state_slots[i]), cache,
                                   config, softmax_scale).to(q.dtype)
    return out


def hack_decode_attention(q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                          state_slots: torch.Tensor, cache: Cache, config: KVConfig,
                          softmax_scale: float) -> torch.Tensor:
    """One query token per sequence (q [B, Hq, D]): `hack_attention` with cu_q = 0, 1, ..., B."""
    cu_q = torch.arange(q.shape[0] + 1, device=q.device)
    return hack_attention(q, cu_q, seq_lens, block_tables, state_slots, cache, config, softmax_scale)


def _hack_sequence(q: torch.Tensor, seq_len: int, block_table: torch.Tensor, slot: int, cache: Cache,
                   config: KVConfig, softmax_scale: float) -> torch.Tensor:
    num_kv_heads, nq = cache["k_codes"].shape[1], q.shape[0]
    qh = _group_queries(q.float(), num_kv_heads)  # [Hkv, G*nq, D]
    n_sinks, n_paged, n_tail = stored_split(seq_len, config)
    sink_k, sink_v, tail_k, tail_v = _float_state(cache, slot, n_sinks, n_tail)
    paged = _gather_paged(cache, block_table, n_paged, config)
    scores = torch.cat([qh @ sink_k.mT, hack_scores(qh, paged, config), qh @ tail_k.mT], dim=-1)
    probs = _causal_softmax(scores * softmax_scale, seq_len, nq)
    p_sinks, p_paged, p_tail = probs.split([n_sinks, n_paged, n_tail], dim=-1)
    out = p_sinks @ sink_v + hack_pv(p_paged, paged, config) + p_tail @ tail_v
    return _ungroup_queries(out, nq)


def _gather_paged(cache: Cache, block_table: torch.Tensor, n_paged: int, config: KVConfig) -> dict[str, torch.Tensor]:
    """Codes (unpacked), scales, minimums and sums of the first n_paged compressed tokens, [Hkv, rows, w] each."""
    names = ["k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min"]
    if config.sum_elimination:
        names += ["k_sums", "v_sums"]
    if config.token_scales:
        names += ["kv_exp"]
    paged = {name: gather_rows(cache, name, block_table, 0, n_paged, config.block_size) for name in names}
    paged["k_codes"] = unpack_codes(paged["k_codes"], config.k_bits)
    paged["v_codes"] = unpack_codes(paged["v_codes"], config.bits)
    return paged


def hack_scores(qh: torch.Tensor, paged: dict[str, torch.Tensor], config: KVConfig,
                product_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """q·k over the paged tokens from K's codes: [Hkv, M, n_paged]. Any leading dim works in place of Hkv
    (torch_fast.py passes batch x Hkv); product_dtype as in homomorphic_matmul. With token scales, the scores
    of the scaled rows times each token's 2^e."""
    scores = _scaled_row_scores(qh, paged, config, product_dtype)
    if config.token_scales:
        scores = scores * token_factors(paged["kv_exp"], "k").mT
    return scores


def _scaled_row_scores(qh: torch.Tensor, paged: dict[str, torch.Tensor], config: KVConfig,
                       product_dtype: torch.dtype) -> torch.Tensor:
    codes = paged["k_codes"]
    pd = config.head_partition(codes.shape[-1])
    n = codes.shape[1]
    if n == 0:
        return qh.new_empty((*qh.shape[:2], 0))
    k_sums = paged.get("k_sums")
    if config.key_axis == "token":
        a = quantize_int8_partitions(qh, pd)
        b = Quantized(codes.mT, paged["k_scale"].mT, paged["k_min"].mT)
        b_sums = None if k_sums is None else k_sums.mT
        return homomorphic_matmul(a, b, pd, b_sums=b_sums, product_dtype=product_dtype)
    # channel axis: per token group g, fold sK[g] into q, then codes-only product plus q·mK[g]
    pi = config.partition
    groups = paged["k_scale"].shape[1]
    grouped_codes = pad_tokens(codes, groups * pi).unflatten(1, (groups, pi))  # [Hkv, G, Π, D]
    folded = qh.unsqueeze(1) * paged["k_scale"].float().unsqueeze(2)  # [Hkv, G, M, D]
    a = quantize_int8_partitions(folded, pd)
    unit = torch.ones(grouped_codes.shape[:2] + (codes.shape[-1] // pd, pi), device=qh.device)
    b = Quantized(grouped_codes.mT, unit, torch.zeros_like(unit))
    b_sums = None if k_sums is None else pad_tokens(k_sums, groups * pi).unflatten(1, (groups, pi)).mT
    scaled = homomorphic_matmul(a, b, pd, b_sums=b_sums, product_dtype=product_dtype)  # [Hkv, G, M, Π]
    offsets = (qh @ paged["k_min"].float().mT).mT.unsqueeze(-1)  # [Hkv, G, M, 1]
    return (scaled + offsets).permute(0, 2, 1, 3).flatten(2)[:, :, :n]


def hack_pv(p: torch.Tensor, paged: dict[str, torch.Tensor], config: KVConfig,
            product_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """P·V over the paged tokens from V's codes: P [Hkv, M, n_paged] -> [Hkv, M, D] (leading dim and
    product_dtype as in hack_scores). With token scales, P times each token's 2^e is what is quantized."""
    codes = paged["v_codes"]
    if config.token_scales:
        p = p * token_factors(paged["kv_exp"], "v").mT
    hkv, m, n = p.shape
    if n == 0:
        return p.new_zeros((hkv, m, codes.shape[-1]))
    pi = config.partition
    groups = paged["v_scale"].shape[1]
    p_groups = pad_tokens(p.mT, groups * pi).mT.unflatten(-1, (groups, pi)).transpose(1, 2)  # [Hkv, G, M, Π]
    a = quantize_int8(p_groups)
    a = Quantized(a.codes, a.scale.unsqueeze(-1), a.minimum.unsqueeze(-1))  # one partition of Π per row
    b = Quantized(pad_tokens(codes, groups * pi).unflatten(1, (groups, pi)),  # [Hkv, G, Π, D]
                  paged["v_scale"].unsqueeze(2), paged["v_min"].unsqueeze(2))
    v_sums = paged.get("v_sums")
    b_sums = None if v_sums is None else v_sums.unsqueeze(2)
    return homomorphic_matmul(a, b, pi, b_sums=b_sums, product_dtype=product_dtype).sum(1)


def pad_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad dim 1 (tokens) of [H, n, ...] to `length`: zero codes and zero probabilities add nothing."""
    if x.shape[1] == length:
        return x
    pad = x.new_zeros((x.shape[0], length - x.shape[1], *x.shape[2:]))
    return torch.cat([x, pad], dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Float attention: fp16 pages, the dequant baseline, and float prefill
# ---------------------------------------------------------------------------------------------------------------


def dequantize_sequence(cache: Cache, block_table: torch.Tensor, slot: int, seq_len: int,
                        config: KVConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored K and V of a compressed sequence as fp32 [Hkv, seq_len, D]: sinks + dequantized pages + tail."""
    n_sinks, n_paged, n_tail = stored_split(seq_len, config)
    sink_k, sink_v, tail_k, tail_v = _float_state(cache, slot, n_sinks, n_tail)
    k, v = dequantize_paged(_gather_paged(cache, block_table, n_paged, config), config)
    return torch.cat([sink_k, k, tail_k], dim=1), torch.cat([sink_v, v, tail_v], dim=1)


def dequantize_paged(paged: dict[str, torch.Tensor], config: KVConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 K and V [H, n, D] of gathered page rows (unpacked codes; any leading dim H)."""
    pd = config.head_partition(paged["k_codes"].shape[-1])
    if config.key_axis == "token":
        k = dequantize(Quantized(paged["k_codes"].unflatten(-1, (-1, pd)), paged["k_scale"], paged["k_min"]))
        k = k.flatten(-2)
    else:
        k = _dequantize_token_groups(paged["k_codes"], paged["k_scale"], paged["k_min"], config.partition)
    v = _dequantize_token_groups(paged["v_codes"], paged["v_scale"], paged["v_min"], config.partition)
    if config.token_scales:
        k, v = k * token_factors(paged["kv_exp"], "k"), v * token_factors(paged["kv_exp"], "v")
    return k, v


def _dequantize_token_groups(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                             partition: int) -> torch.Tensor:
    """s*q + m per channel over groups of Π tokens: codes [H, n, D], scale/min [H, ceil(n/Π), D] -> fp32."""
    grouped = pad_tokens(codes, scale.shape[1] * partition).unflatten(1, (-1, partition))  # [H, G, Π, D]
    values = torch.mul(grouped, scale.float().unsqueeze(2)).add_(minimum.float().unsqueeze(2))
    return values.flatten(1, 2)[:, : codes.shape[1]]


def dequant_attention(q: torch.Tensor, cu_q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                      state_slots: torch.Tensor, cache: Cache, config: KVConfig,
                      softmax_scale: float) -> torch.Tensor:
    """The dequant baseline: dequantize each sequence's stored K/V to float, then plain causal attention."""
    out = torch.empty_like(q)
    for i in range(len(seq_lens)):
        rows = slice(int(cu_q[i]), int(cu_q[i + 1]))
        k, v = dequantize_sequence(cache, block_tables[i], int(state_slots[i]), int(seq_lens[i]), config)
        out[rows] = causal_attention(q[rows], k, v, softmax_scale)
    return out


def fp16_attention(q: torch.Tensor, cu_q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                   cache: Cache, block_size: int, softmax_scale: float) -> torch.Tensor:
    """fp16 mode: causal attention over each sequence's fp16 pages."""
    out = torch.empty_like(q)
    for i in range(len(seq_lens)):
        rows = slice(int(cu_q[i]), int(cu_q[i + 1]))
        n = int(seq_lens[i])
        k = gather_rows(cache, "k", block_tables[i], 0, n, block_size)
        v = gather_rows(cache, "v", block_tables[i], 0, n, block_size)
        out[rows] = causal_attention(q[rows], k, v, softmax_scale)
    return out


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Float attention of queries q [nq, Hq, D] (the last nq of the keys' positions) over k, v [Hkv, n, D].
    fp32 softmax; returns q's dtype."""
    nq = q.shape[0]
    qh = _group_queries(q.float(), k.shape[0])
    probs = _causal_softmax(qh @ k.float().mT * softmax_scale, k.shape[1], nq)
    return _ungroup_queries(probs @ v.float(), nq).to(q.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Rotation (config.rotate): applied around the ops, which then run unchanged on rotated K, V and q
# ---------------------------------------------------------------------------------------------------------------


def rotate_heads(x: torch.Tensor, rotations: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """x [T, H, D] times M_h (inverse: M_hᵀ) of its KV head, rotations [Hkv, D, D]; H is a multiple of Hkv (the
    G query heads of a KV head share its matrix). Computed in fp32, returned in x's dtype."""
    hkv = rotations.shape[0]
    if x.shape[1] % hkv:
        raise ValueError(f"{x.shape[1]} heads are not a multiple of {hkv} KV heads")
    matrices = rotations.mT if inverse else rotations
    grouped = x.float().unflatten(1, (hkv, x.shape[1] // hkv))  # [T, Hkv, G, D]
    return torch.einsum("tkgd,kde->tkge", grouped, matrices.to(x.device)).flatten(1, 2).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------------


def _float_state(cache: Cache, slot: int, n_sinks: int, n_tail: int) -> tuple[torch.Tensor, ...]:
    return tuple(
        cache[name][slot, :, :n].float()
        for name, n in (("sink_k", n_sinks), ("sink_v", n_sinks), ("tail_k", n_tail), ("tail_v", n_tail))
    )


def _group_queries(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[nq, Hq, D] -> [Hkv, G*nq, D]: the G query heads sharing a KV head become rows (head-major, then token)."""
    nq, hq, d = q.shape
    if hq % num_kv_heads:
        raise ValueError(f"{hq} query heads are not a multiple of {num_kv_heads} KV heads")
    return q.view(nq, num_kv_heads, hq // num_kv_heads, d).permute(1, 2, 0, 3).reshape(num_kv_heads, -1, d)


def _ungroup_queries(x: torch.Tensor, nq: int) -> torch.Tensor:
    """Inverse of _group_queries: [Hkv, G*nq, D] -> [nq, Hq, D]."""
    hkv, rows, d = x.shape
    return x.view(hkv, rows // nq, nq, d).permute(2, 0, 1, 3).reshape(nq, -1, d)


def _causal_softmax(scores: torch.Tensor, seq_len: int, nq: int) -> torch.Tensor:
    """fp32 softmax of [Hkv, G*nq, seq_len] scores; query j (of nq, the last positions) sees keys <= its own."""
    q_pos = torch.arange(seq_len - nq, seq_len, device=scores.device).repeat(scores.shape[1] // nq)
    k_pos = torch.arange(seq_len, device=scores.device)
    masked = scores.float().masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    return torch.softmax(masked, dim=-1)

