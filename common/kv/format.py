"""The HACK compressed KV format: quantization, bit packing, page layout and byte accounting.

Quantization (asymmetric, b bits, one partition of Π values x):
    m = min x, s = (max x - m) / (2^b - 1), q = round((x - m) / s) in [0, 2^b - 1], x ≈ s*q + m.
With config.ranges="mse" the range [lo, hi] of each K/V partition is not its min/max but the pair of least squared
error among lo = min + a (max - min), hi = max - b (max - min) for a, b in CLIP_GRID (values outside are clamped
to the end codes); the bytes are the same. Stored m and s are fp16. m is rounded toward -inf and s toward +inf when cast, so that every x lies inside
[m, m + s*(2^b - 1)] and the nearest-rounding error is at most s/2 with the *stored* s. A constant partition
stores s = 0 and codes 0 (exactly x = m). Stochastic rounding: q = floor((x - m)/s + u), u ~ U[0, 1) from a
torch.Generator, so E[s*q + m] = x.

Notation: Hkv = KV heads, D = head_dim, bs = block_size (tokens per page), Π = partition,
Πd = min(Π, D) (partitions that run along head_dim), b = bits. Every tensor is C-contiguous.

Per layer pool tensors, `nb` pages; a page holds bs tokens of one layer for all KV heads:
    fp16 mode:
        k, v          fp16  [nb, Hkv, bs, D]        (KVLayout.float_dtype: bf16 for bf16 models, see below)
    dequant and hack modes (identical storage):
        k_codes       uint8 [nb, Hkv, bs, D*bk/8]  codes packed along D (bk = config.k_bits, b unless key_bits
                                                   sets K's own width): element j of each group of 8/b
        v_codes       uint8 [nb, Hkv, bs, D*b/8]   consecutive codes sits at bit offset b*j (LSB first)
        k_scale/k_min fp16  [nb, Hkv, bs, D/Πd]    key_axis="token": per token, partitions of Πd along D
                      fp16  [nb, Hkv, bs/Π, D]     key_axis="channel": per channel over groups of Π tokens
        k_sums        int16 [nb, Hkv, bs, D/Πd]    per token, per Πd-partition sum of K codes (both axes)
        v_scale/v_min fp16  [nb, Hkv, bs/Π, D]     V per channel over groups of Π tokens
        v_sums        int16 [nb, Hkv, bs/Π, D]     per channel, per token-group sum of V codes
        kv_exp        uint8 [nb, Hkv, bs, 1]       config.token_scales only: per token, the exponents e of the
                                                   powers of two its K and V rows were divided by before
                                                   quantization, 4-bit two's complement, K's in the low nibble
                                                   (`token_exponents`); the stored row is 2^e * (s*q + m)
    The *_sums tensors exist only with sum_elimination (else attention recomputes them from the codes).
Token scales (config.token_scales): e = round(log2(max |x|)) over the token's row of one KV head (0 for a zero
row), clamped to [-8, 7] (one nibble; SmolLM2's rows span -5..4), so the scaled row x / 2^e has its largest
magnitude in [2^-0.5, 2^0.5) unless clamped; scaling by a power of two is exact, and a clamped e is still exact.
Per-channel groups of Π tokens then quantize rows of equal magnitude: a small token keeps its own resolution
instead of the group's largest token's. Attention stays on the codes: token t's score is 2^e_t times the score
of its scaled row (q·k_t = 2^e_t q·k'_t), and P·V = (P diag(2^e))·V', P scaled before it is quantized.
Per sequence state (compressed modes), indexed by the sequence's state slot, fp16 (KVLayout.float_dtype):
    sink_k, sink_v  [max_seqs, Hkv, num_sinks, D]  the first num_sinks tokens, never quantized
    tail_k, tail_v  [max_seqs, Hkv, Π + W, D]      the tail: the W = config.window most recent tokens (a KIVI-style
                                                   16-bit recent window, 0 by default) and before them the open
                                                   partition, tokens that do not fill a partition of Π yet; the
                                                   oldest Π tail tokens are quantized once when the tail reaches
                                                   Π + W tokens, so it holds between W and Π + W - 1 of them
The uncompressed K/V (fp16-mode pages, sinks, tail) are stored in the model's 16-bit compute dtype (bf16 for a
bf16 model, fp16 for fp16 and fp32 models): KVLayout.float_dtype, part of KVLayout.wire_identity, so a
sender and a receiver that disagree refuse the push. Scales and minimums are always fp16.
Tail tokens are stored in order from the first unquantized one (compressed index = quantized count).
Token at position pos >= num_sinks has compressed index c = pos - num_sinks, stored in page
block_table[c // bs] at slot c % bs (fp16 mode: num_sinks is ignored, c = pos). Pages are allocated for every
compressed index, including the tail's, so a tail flush never needs a new page. With requant_elimination off the
tail is also quantized into its page slots at every step (a partial token group has its own s/m over the tokens
present) and attention reads those codes instead of the tail.

Rotation (config.rotate): what is stored for KV head h is k·M_h and v·M_h (rows), M_h = `rotation_matrices`
[h], an orthogonal D x D matrix (a seeded randomized Hadamard one: diag(±1)·H/√D; a seeded random orthogonal
one where D is not a power of two). Queries are rotated alike (q·M_h·(k·M_h)ᵀ = q·kᵀ) and each attention output
rotated back (P·(V·M_h)·M_hᵀ = P·V), so every op above runs unchanged on rotated data; sinks and tail hold
rotated fp16 values too. Sender and receiver derive M from (seed, Hkv, D): both must agree on rotate and seed.

Wire (wire.py), one chunk = one page of one layer (only its filled slots, always whole partitions in the
compressed modes) or the sequence state of one layer (sinks + tail). Little-endian throughout:
    header  WIRE_HEADER (30 bytes, see its field list below)
    payload the chunk's tensors in `page_fields` / `STATE_FIELDS` order, raw little-endian bytes each
    trailer CRC32 (zlib) of header + payload, uint32
Sums are not sent: the receiver recomputes them from the codes.
"""
from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass
from typing import NamedTuple

import torch

from common.kv.config import KVConfig

STORAGE_DTYPE = torch.float16  # scales and minimums; by default also the uncompressed K/V (KVLayout.float_dtype)
FLOAT_DTYPES = (torch.float16, torch.bfloat16)  # what uncompressed K/V can be stored as


def float_dtype_for(compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype uncompressed K/V (fp16-mode pages, sinks, tail) is stored in for a model computing in
    compute_dtype: its own 16-bit dtype (a bf16 model's K/V stay bf16: its own numbers, no fp16 overflow), fp16
    for fp32 models."""
    return compute_dtype if compute_dtype in FLOAT_DTYPES else torch.float16

# magic, version, kind, mode, bits, key_axis, partition, num_kv_heads, head_dim, layer, index,
# num_tokens, num_sink_tokens
WIRE_HEADER = struct.Struct("<4sHBBBBHHHHIII")
WIRE_MAGIC = b"HKVC"
WIRE_VERSION = 1
WIRE_TRAILER = struct.Struct("<I")
WIRE_OVERHEAD_BYTES = WIRE_HEADER.size + WIRE_TRAILER.size

STATE_FIELDS = ("sink_k", "sink_v", "tail_k", "tail_v")

Cache = dict[str, torch.Tensor]  # one layer's pool tensors by name (the names and shapes above)


class Quantized(NamedTuple):
    """Codes of partitions along the last dim; scale and minimum have one entry per partition."""

    codes: torch.Tensor  # uint8 (b-bit codes) or int8 (signed 8-bit form, see reference.quantize_int8)
    scale: torch.Tensor
    minimum: torch.Tensor


CLIP_GRID = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)  # fractions of a partition's range tried off each end


def quantize(
    x: torch.Tensor,
    bits: int,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
    param_dtype: torch.dtype | None = STORAGE_DTYPE,
    ranges: str = "minmax",
) -> Quantized:
    """Quantize x asymmetrically with one partition = the whole last dim.

    Returns codes uint8 [..., P] and scale/minimum [...] in param_dtype (None keeps fp32, for Q and P which are
    never stored). The codes are computed against the rounded parameters, so dequantize() is what gets stored.
    ranges="mse" clips each partition's range to the least squared error (module doc).
    """
    levels = 2**bits - 1
    xf = x.float()
    lo, hi = xf.amin(-1), xf.amax(-1)
    if ranges == "mse":
        lo, hi = least_error_range(xf, lo, hi, levels)
    elif ranges != "minmax":
        raise ValueError(f"unknown ranges {ranges!r}")
    minimum = lo if param_dtype is None else _cast_toward(lo, param_dtype, down=True)
    scale = (hi - minimum.float()) / levels
    if param_dtype is not None:
        scale = _cast_toward(scale, param_dtype, down=False)
    safe = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
    t = (xf - minimum.float().unsqueeze(-1)) / safe.unsqueeze(-1)
    if rounding == "nearest":
        t = torch.round(t)
    elif rounding == "stochastic":
        t = torch.floor(t + torch.rand(t.shape, generator=generator, device=t.device))
    else:
        raise ValueError(f"unknown rounding {rounding!r}")
    codes = t.clamp_(0, levels).to(torch.uint8)
    return Quantized(codes, scale, minimum)


def least_error_range(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                      levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per partition (last dim of x), the clipped [lo', hi'] of least squared round-to-nearest error among
    lo' = lo + a (hi - lo), hi' = hi - b (hi - lo) for a, b in CLIP_GRID; (a, b) = (0, 0) wins ties."""
    width = hi - lo
    best_lo, best_hi, best_error = lo, hi, None
    for a in CLIP_GRID:
        for b in CLIP_GRID:
            low, high = lo + a * width, hi - b * width
            step = ((high - low) / levels).clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
            codes = ((x - low.unsqueeze(-1)) / step).round_().clamp_(0, levels)
            error = (codes.mul_(step).add_(low.unsqueeze(-1)).sub_(x)).square_().sum(-1)
            if best_error is None:
                best_error = error
                continue
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_lo, best_hi = torch.where(better, low, best_lo), torch.where(better, high, best_hi)
    return best_lo, best_hi


def dequantize(q: Quantized) -> torch.Tensor:
    """fp32 values s*q + m of a `quantize` result."""
    return q.codes.float() * q.scale.float().unsqueeze(-1) + q.minimum.float().unsqueeze(-1)


def _cast_toward(x: torch.Tensor, dtype: torch.dtype, down: bool) -> torch.Tensor:
    """Cast fp32 -> dtype rounding toward -inf (down) or +inf, so the cast never shrinks the covered range."""
    y = x.to(dtype)
    wrong = y.float() > x if down else y.float() < x
    limit = torch.full_like(y, -math.inf if down else math.inf)
    return torch.where(wrong, torch.nextafter(y, limit), y)


def rotation_matrices(num_kv_heads: int, head_dim: int, seed: int) -> torch.Tensor:
    """[Hkv, D, D] fp32 orthogonal matrices M_h (see the module doc): signs from torch.Generator(seed)."""
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (num_kv_heads, head_dim, 1), generator=gen).float() * 2 - 1
    if head_dim & (head_dim - 1) == 0:
        hadamard = torch.ones(1, 1)
        while hadamard.shape[0] < head_dim:  # Sylvester: [[H, H], [H, -H]]
            hadamard = torch.cat([torch.cat([hadamard, hadamard], 1), torch.cat([hadamard, -hadamard], 1)], 0)
        return signs * hadamard / math.sqrt(head_dim)
    gaussian = torch.randn(num_kv_heads, head_dim, head_dim, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return (signs * q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)).float()


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., D] -> uint8 [..., D*bits/8]; code j of each byte group sits at bit offset bits*j."""
    per_byte = 8 // bits
    if codes.shape[-1] % per_byte:
        raise ValueError(f"last dim {codes.shape[-1]} is not a multiple of {per_byte} codes per byte")
    if bits == 8:
        return codes.to(torch.uint8)
    grouped = codes.to(torch.int32).unflatten(-1, (-1, per_byte))
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * bits
    return (grouped << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_codes: uint8 [..., D*bits/8] -> uint8 codes [..., D]."""
    if bits == 8:
        return packed
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & (2**bits - 1)
    return codes.flatten(-2).to(torch.uint8)


def code_sums(codes: torch.Tensor, partition: int, dim: int = -1) -> torch.Tensor:
    """int16 sums of unpacked codes over consecutive partitions of `partition` elements along dim."""
    grouped = codes.to(torch.int32).unflatten(dim, (-1, partition))
    reduce_dim = dim + 1 if dim >= 0 else dim
    return grouped.sum(reduce_dim).to(torch.int16)


@dataclass(frozen=True)
class PageField:
    """One per-page tensor: [Hkv, rows, width] per page, one row per `tokens_per_row` tokens."""

    name: str
    dtype: torch.dtype
    tokens_per_row: int
    width: int

    def rows(self, num_tokens: int) -> int:
        return -(-num_tokens // self.tokens_per_row)

    def shape(self, num_kv_heads: int, num_tokens: int) -> tuple[int, int, int]:
        return (num_kv_heads, self.rows(num_tokens), self.width)

    def nbytes(self, num_kv_heads: int, num_tokens: int) -> int:
        return math.prod(self.shape(num_kv_heads, num_tokens)) * self.dtype.itemsize


class TokenSplit(NamedTuple):
    """Where the n tokens of a sequence live: 16-bit sinks, whole quantized partitions, 16-bit open tail."""

    sinks: int
    quantized: int
    tail: int


def quantized_count(rest: int, config: KVConfig) -> int:
    """Of `rest` tokens after the sinks, how many are quantized: the whole partitions that leave at least
    config.window tokens behind them (the tail keeps the window plus the open partition)."""
    return max(0, rest - config.window) // config.partition * config.partition


def split_tokens(num_tokens: int, config: KVConfig) -> TokenSplit:
    """Sinks, whole partitions and 16-bit tail of a sequence of num_tokens (fp16 mode: all tokens are paged)."""
    if not config.compressed:
        return TokenSplit(0, num_tokens, 0)
    sinks = min(num_tokens, config.num_sinks)
    rest = num_tokens - sinks
    quantized = quantized_count(rest, config)
    return TokenSplit(sinks, quantized, rest - quantized)


@dataclass(frozen=True)
class KVLayout:
    """Shapes and byte counts of one layer's KV for a given config and attention geometry."""

    config: KVConfig
    num_kv_heads: int
    head_dim: int
    float_dtype: torch.dtype = STORAGE_DTYPE  # uncompressed K/V: fp16-mode pages, sinks and tail (float_dtype_for)

    def __post_init__(self) -> None:
        if self.num_kv_heads < 1 or self.head_dim < 1:
            raise ValueError(f"need num_kv_heads >= 1 and head_dim >= 1, got {self.num_kv_heads}, {self.head_dim}")
        if self.float_dtype not in FLOAT_DTYPES:
            raise ValueError(f"uncompressed K/V are stored as one of {FLOAT_DTYPES}, got {self.float_dtype}")
        if self.config.compressed:
            self.config.head_partition(self.head_dim)  # validates head_dim against Π and bits

    @property
    def head_partition(self) -> int:
        return self.config.head_partition(self.head_dim)

    @property
    def wire_identity(self) -> str:
        """KVConfig.wire_identity plus the dtype of the uncompressed K/V: what a sender's and a receiver's pools
        must share for pushed KV bytes to mean the same values."""
        return f"{self.config.wire_identity} dtype={str(self.float_dtype).removeprefix('torch.')}"

    @property
    def num_sinks(self) -> int:
        return self.config.num_sinks if self.config.compressed else 0

    def page_fields(self, with_sums: bool | None = None) -> list[PageField]:
        """Per-page tensors in storage and wire order; sums follow config.sum_elimination unless overridden."""
        cfg, d = self.config, self.head_dim
        if not cfg.compressed:
            return [PageField("k", self.float_dtype, 1, d), PageField("v", self.float_dtype, 1, d)]
        pd, pi = self.head_partition, cfg.partition
        k_rows, k_width = (1, d // pd) if cfg.key_axis == "token" else (pi, d)
        fields = [
            PageField("k_codes", torch.uint8, 1, d * cfg.k_bits // 8),
            PageField("k_scale", STORAGE_DTYPE, k_rows, k_width),
            PageField("k_min", STORAGE_DTYPE, k_rows, k_width),
            PageField("v_codes", torch.uint8, 1, d * cfg.bits // 8),
            PageField("v_scale", STORAGE_DTYPE, pi, d),
            PageField("v_min", STORAGE_DTYPE, pi, d),
        ]
        if cfg.token_scales:
            fields += [PageField("kv_exp", torch.uint8, 1, 1)]
        if cfg.sum_elimination if with_sums is None else with_sums:
            fields += [PageField("k_sums", torch.int16, 1, d // pd), PageField("v_sums", torch.int16, pi, d)]
        return fields

    def state_shapes(self) -> dict[str, tuple[int, int, int]]:
        """Per-sequence 16-bit state, [Hkv, tokens, D] per state slot (empty in fp16 mode)."""
        if not self.config.compressed:
            return {}
        h, d = self.num_kv_heads, self.head_dim
        sinks, tail = (h, self.num_sinks, d), (h, self.config.partition + self.config.window, d)
        return {"sink_k": sinks, "sink_v": sinks, "tail_k": tail, "tail_v": tail}

    def split(self, num_tokens: int) -> TokenSplit:
        return split_tokens(num_tokens, self.config)

    def blocks_for(self, num_tokens: int) -> int:
        """Pages a sequence of num_tokens needs (every compressed index has a page slot, tail included)."""
        return -(-(num_tokens - min(num_tokens, self.num_sinks)) // self.config.block_size)

    @property
    def block_bytes(self) -> int:
        """Bytes of one page of one layer in the pool."""
        return sum(f.nbytes(self.num_kv_heads, self.config.block_size) for f in self.page_fields())

    @property
    def state_bytes(self) -> int:
        """Bytes of one sequence's 16-bit state slot of one layer in the pool."""
        return sum(math.prod(s) * self.float_dtype.itemsize for s in self.state_shapes().values())

    def memory_bytes(self, num_tokens: int, num_layers: int = 1) -> int:
        """Exact pool bytes a sequence of num_tokens holds: its pages plus its state slot, over all layers."""
        return num_layers * (self.blocks_for(num_tokens) * self.block_bytes + self.state_bytes)

    def page_token_counts(self, num_tokens: int) -> list[int]:
        """Tokens in each page chunk on the wire: whole partitions only in the compressed modes."""
        stored = self.split(num_tokens).quantized
        bs = self.config.block_size
        return [min(bs, stored - start) for start in range(0, stored, bs)]

    def page_wire_bytes(self, page_tokens: int) -> int:
        payload = sum(f.nbytes(self.num_kv_heads, page_tokens) for f in self.page_fields(with_sums=False))
        return WIRE_OVERHEAD_BYTES + payload

    def state_wire_bytes(self, sinks: int, tail: int) -> int:
        return WIRE_OVERHEAD_BYTES + 2 * (sinks + tail) * self.num_kv_heads * self.head_dim * self.float_dtype.itemsize

    def wire_bytes(self, num_tokens: int, num_layers: int = 1) -> int:
        """Exact serialized bytes (wire.py) of a sequence's KV: page chunks plus, compressed, one state chunk."""
        split = self.split(num_tokens)
        per_layer = sum(self.page_wire_bytes(n) for n in self.page_token_counts(num_tokens))
        if self.config.compressed:
            per_layer += self.state_wire_bytes(split.sinks, split.tail)
        return num_layers * per_layer

    def fp16_bytes(self, num_tokens: int, num_layers: int = 1) -> int:
        """Raw bytes of num_tokens of 16-bit K and V (the uncompressed reference size)."""
        return num_layers * 2 * num_tokens * self.num_kv_heads * self.head_dim * self.float_dtype.itemsize


def quantize_tokens(
    k: torch.Tensor,
    v: torch.Tensor,
    config: KVConfig,
    generator: torch.Generator | None = None,
    with_sums: bool = True,
) -> dict[str, torch.Tensor]:
    """Quantize n tokens of K and V ([Hkv, n, D] each) into page rows ([Hkv, rows, width] per field).

    Token groups of Π start at token 0; a last group shorter than Π (requant_elimination off) gets its own
    scale/min over the tokens present.
    """
    pi, bits, k_bits, d = config.partition, config.bits, config.k_bits, k.shape[-1]
    pd = config.head_partition(d)
    rows: dict[str, torch.Tensor] = {}
    if config.token_scales:
        k_exp, v_exp = token_exponents(k), token_exponents(v)
        rows["kv_exp"] = (k_exp & 15 | v_exp << 4).view(torch.uint8)
        k, v = torch.ldexp(k.float(), -k_exp.float()), torch.ldexp(v.float(), -v_exp.float())
    if config.key_axis == "token":
        kq = quantize(k.unflatten(-1, (-1, pd)), k_bits, config.rounding, generator, ranges=config.ranges)
        k_codes = kq.codes.flatten(-2)
    else:
        kq = _quantize_token_groups(k, pi, k_bits, config.rounding, generator, config.ranges)
        k_codes = kq.codes
    vq = _quantize_token_groups(v, pi, bits, config.rounding, generator, config.ranges)
    rows["k_codes"], rows["k_scale"], rows["k_min"] = pack_codes(k_codes, k_bits), kq.scale, kq.minimum
    rows["v_codes"], rows["v_scale"], rows["v_min"] = pack_codes(vq.codes, bits), vq.scale, vq.minimum
    if with_sums:
        rows["k_sums"] = code_sums(k_codes, pd)
        rows["v_sums"] = _group_sums(vq.codes, pi)
    return rows


EXPONENT_RANGE = (-8, 7)  # a token exponent is a 4-bit two's complement nibble of kv_exp


def token_exponents(x: torch.Tensor) -> torch.Tensor:
    """int8 [..., n, 1]: per row of x [..., n, D], round(log2(max |x|)) clamped to EXPONENT_RANGE, 0 for a zero
    row (module doc)."""
    peak = x.detach().abs().amax(-1, keepdim=True).float()
    exponent = torch.where(peak > 0, torch.log2(peak).round(), torch.zeros_like(peak))
    return exponent.clamp(*EXPONENT_RANGE).to(torch.int8)


@functools.cache
def _factor_table(device: torch.device) -> torch.Tensor:
    """fp32 [256, 2]: 2^e of K's (low nibble) and V's (high nibble) exponent for each kv_exp byte."""
    nibbles = torch.stack([torch.arange(256) & 15, torch.arange(256) >> 4], dim=1)
    return torch.exp2((nibbles - 16 * (nibbles >> 3)).float()).to(device)


def token_factors(kv_exp: torch.Tensor, part: str | None = None) -> torch.Tensor:
    """fp32 2^e of K's (part "k") or V's ("v") exponents in stored kv_exp bytes (uint8, any shape), or both
    stacked on a new last dim (part None): one lookup. Always finite (2^-8 to 2^7), whatever the byte."""
    both = _factor_table(kv_exp.device)[kv_exp.long()]
    return both if part is None else both[..., "kv".index(part)]


def _quantize_token_groups(
    x: torch.Tensor, partition: int, bits: int, rounding: str, generator: torch.Generator | None,
    ranges: str = "minmax",
) -> Quantized:
    """Per channel over groups of `partition` tokens: x [H, n, D] -> codes [H, n, D], scale/min [H, groups, D].
    Nearest rounding quantizes all whole groups at once (the same per-group arithmetic, a few large ops instead
    of a few per group); stochastic rounding draws group by group, in the order its generator replays."""
    parts, start = [], 0
    whole = x.shape[1] // partition * partition
    if rounding == "nearest" and whole:
        groups = x[:, :whole].unflatten(1, (-1, partition)).transpose(2, 3)  # [H, G, D, Π]: a group along last dim
        q = quantize(groups, bits, rounding, generator, ranges=ranges)
        parts.append(Quantized(q.codes.transpose(2, 3).flatten(1, 2), q.scale, q.minimum))
        start = whole
    for start in range(start, x.shape[1], partition):
        group = x[:, start : start + partition].transpose(1, 2)  # [H, D, tokens]: partition along the last dim
        q = quantize(group, bits, rounding, generator, ranges=ranges)
        parts.append(Quantized(q.codes.transpose(1, 2), q.scale.unsqueeze(1), q.minimum.unsqueeze(1)))
    return Quantized(*(torch.cat(t, dim=1) for t in zip(*parts)))


def _group_sums(codes: torch.Tensor, partition: int) -> torch.Tensor:
    """int16 per-channel code sums over token groups: [H, n, D] -> [H, ceil(n/Π), D]."""
    groups = -(-codes.shape[1] // partition)
    padded = codes.new_zeros((codes.shape[0], groups * partition, codes.shape[2]))  # zero codes add nothing
    padded[:, : codes.shape[1]] = codes
    return padded.unflatten(1, (groups, partition)).sum(2, dtype=torch.int32).to(torch.int16)


def recompute_sums(rows: dict[str, torch.Tensor], config: KVConfig, head_dim: int) -> dict[str, torch.Tensor]:
    """k_sums and v_sums of page rows from their packed codes (import, and sum_elimination off)."""
    k_codes = unpack_codes(rows["k_codes"], config.k_bits)
    v_codes = unpack_codes(rows["v_codes"], config.bits)
    return {
        "k_sums": code_sums(k_codes, config.head_partition(head_dim)),
        "v_sums": _group_sums(v_codes, config.partition),
    }


TRANSFER_GROUP_BYTES = 4 << 20  # page bytes per group moved with one copy per field (export, wire, import)


def page_groups(layout: KVLayout, num_pages: int) -> list[tuple[int, int]]:
    """[start, stop) page ranges of about TRANSFER_GROUP_BYTES each: big enough that a layer moves in a few
    copies per field, small enough that a CPU host reuses the buffers instead of page-faulting fresh ones."""
    page_bytes = sum(f.nbytes(layout.num_kv_heads, layout.config.block_size) for f in layout.page_fields(False))
    step = max(1, TRANSFER_GROUP_BYTES // page_bytes)
    return [(start, min(start + step, num_pages)) for start in range(0, num_pages, step)]


@dataclass
class LayerKV:
    """One layer of one sequence's stored KV, detached from any pool (export, wire, import).

    pages: each page's rows for its filled slots ({field: [Hkv, rows, width]} in `page_fields(with_sums=False)`
    order); compressed modes send whole partitions only. state: sink_k/sink_v [Hkv, sinks, D] and tail_k/tail_v
    [Hkv, tail, D] fp16 (empty in fp16 mode). stacked (export and wire decode set it): the page fields of each
    `page_groups` group as one tensor [group pages, Hkv, rows per page, width] that the pages are views of (a
    partial last page's extra rows are padding), so a layer moves with one copy per field and group.
    """

    num_tokens: int
    pages: list[dict[str, torch.Tensor]]
    state: dict[str, torch.Tensor]
    stacked: list[dict[str, torch.Tensor]] | None = None

    @staticmethod
    def from_stacked(layout: KVLayout, num_tokens: int, stacked: list[dict[str, torch.Tensor]],
                     page_tokens: list[int], state: dict[str, torch.Tensor]) -> "LayerKV":
        fields = layout.page_fields(with_sums=False)
        pages = []
        for (start, _), group in zip(page_groups(layout, len(page_tokens)), stacked):
            for i, tensors in enumerate(zip(*(group[f.name] for f in fields))):
                count = page_tokens[start + i]
                pages.append({f.name: t[:, : f.rows(count)] for f, t in zip(fields, tensors)})
        return LayerKV(num_tokens, pages, state, stacked)
