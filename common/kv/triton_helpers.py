"""Device helpers shared by the HACK Triton kernels (`triton_*.py` beside this file).

Conventions every kernel follows:
  * head_dim is viewed as NP partitions of PD = Πd channels; homomorphic tiles carry that split as a leading
    axis, e.g. a query tile is [NP, BLOCK_M, PD] and a key-code tile [NP, PD, BLOCK_N], so one batched `tl.dot`
    yields the per-partition integer products [NP, BLOCK_M, BLOCK_N] that the correction terms scale.
  * A paged tile is one token group of Π tokens: Π divides block_size, so a tile never crosses a page and has
    exactly one V scale/min row (and one K row with key_axis="channel").
  * Softmax runs in the log2 domain (scores pre-multiplied by softmax_scale * log2(e)), FlashAttention-style.
  * Packed codes are loaded as bytes, each once, and unpacked in registers.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from common.kv.config import KVConfig
from common.kv.format import KVLayout

LOG2E = 1.0 / math.log(2.0)
MIN_DOT = 16  # tl.dot needs every tile dim >= 16; smaller tiles (tiny test models) multiply-and-sum instead
MIN_INT8_DOT_K = 32  # the int8 MMA reduces over k=32 at a time


@triton.jit
def round_half_even(x):
    """torch.round for |x| < 2^22: adding 1.5 * 2^23 leaves no fraction bits, so fp32 addition rounds to even."""
    return (x + 12582912.0) - 12582912.0


@triton.jit
def _byte_codes(packed, BITS: tl.constexpr):
    """[..., B, 1] bytes -> [..., B, 8/BITS] codes: code j of a byte sits at bit BITS*j (format.pack_codes)."""
    shifts = tl.arange(0, 8 // BITS) * BITS
    return (packed.to(tl.int32) >> shifts) & ((1 << BITS) - 1)


@triton.jit
def unpack_rows(packed, BITS: tl.constexpr):
    """Packed bytes [N, B] -> int32 codes [N, B*8/BITS], unpacked in registers (each byte loaded once)."""
    n: tl.constexpr = packed.shape[0]
    b: tl.constexpr = packed.shape[1]
    return tl.reshape(_byte_codes(packed[:, :, None], BITS), (n, b * (8 // BITS)))


@triton.jit
def unpack_columns(packed, BITS: tl.constexpr):
    """Packed bytes [P, B, N] (bytes along axis 1) -> int32 codes [P, B*8/BITS, N]."""
    p: tl.constexpr = packed.shape[0]
    b: tl.constexpr = packed.shape[1]
    n: tl.constexpr = packed.shape[2]
    codes = _byte_codes(tl.permute(packed, (0, 2, 1))[:, :, :, None], BITS)  # [P, N, B, 8/BITS]
    return tl.permute(tl.reshape(codes, (p, n, b * (8 // BITS))), (0, 2, 1))


@triton.jit
def quantize_int8(x, AXIS: tl.constexpr):
    """Asymmetric 8-bit quantization along AXIS in the signed form of reference.quantize_int8.

    Returns (codes int8, scale, minimum, code sum int32); the last three keep AXIS with size 1, so that
    x ≈ scale * codes + minimum broadcasts back.
    """
    lo = tl.min(x, axis=AXIS, keep_dims=True)
    hi = tl.max(x, axis=AXIS, keep_dims=True)
    scale = (hi - lo) / 255.0
    safe = tl.where(scale > 0, scale, 1.0)
    codes = tl.minimum(tl.maximum(round_half_even((x - lo) / safe), 0.0), 255.0) - 128.0
    code_sum = tl.sum(codes.to(tl.int32), axis=AXIS, keep_dims=True)
    return codes.to(tl.int8), scale, lo + 128.0 * scale, code_sum


@triton.jit
def matmul(a, b, OUT_DTYPE: tl.constexpr, USE_DOT: tl.constexpr):
    """a [.., M, K] @ b [.., K, N] (2D, or batched 3D) accumulated in OUT_DTYPE (tl.int32 or tl.float32);
    fp32 operands multiply as tf32 on the tensor cores."""
    if USE_DOT:
        return tl.dot(a, b, out_dtype=OUT_DTYPE)
    return tl.sum(tl.expand_dims(a.to(OUT_DTYPE), -1) * tl.expand_dims(b.to(OUT_DTYPE), -3), axis=-2)


@triton.jit
def code_matmul(a, a_sum, codes, BITS: tl.constexpr, USE_DOT: tl.constexpr):
    """Exact int32 Σ_k a[m, k] * codes[k, n] of int8 `a` (row sums a_sum, broadcastable) and stored codes.

    The MMA takes int8 operands: 8-bit codes (0..255) are shifted by -128 and the shift is added back through
    a's code sums.
    """
    if BITS == 8:
        return matmul(a, (codes - 128).to(tl.int8), tl.int32, USE_DOT) + 128 * a_sum
    return matmul(a, codes.to(tl.int8), tl.int32, USE_DOT)


@triton.jit
def softmax_step(scores, m_i, l_i):
    """One online-softmax step over a tile of log2-domain scores [M, N] (masked entries -inf).

    Returns the tile's unnormalized probabilities, the factor rescaling what was accumulated before, and the
    new running max and sum. A row with no visible key yet keeps max -inf and gets zero probabilities.
    """
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(scores - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def tile_page(block_table_row, first_index, BLOCK_SIZE: tl.constexpr):
    """(page id as int64, slot in the page) of compressed index first_index of a sequence."""
    page = tl.load(block_table_row + first_index // BLOCK_SIZE).to(tl.int64)
    return page, first_index % BLOCK_SIZE


@triton.jit
def stored_split(seq_len, NUM_SINKS: tl.constexpr, PARTITION: tl.constexpr, REQUANT_ELIM: tl.constexpr,
                 WINDOW: tl.constexpr):
    """(sinks, paged, tail) token counts as attention reads them: reference.stored_split. The tail holds the
    open partition and the WINDOW newest tokens (format.quantized_count)."""
    n_sinks = tl.minimum(seq_len, NUM_SINKS)
    rest = seq_len - n_sinks
    if REQUANT_ELIM:
        n_tail = rest - tl.maximum(rest - WINDOW, 0) // PARTITION * PARTITION
    else:
        n_tail = rest * 0
    return n_sinks, rest - n_tail, n_tail


@triton.jit
def prefill_rows(block, head, seq_len, num_queries, G: tl.constexpr, BLOCK_G: tl.constexpr,
                 BLOCK_T: tl.constexpr):
    """A prefill program's rows, BLOCK_T query tokens x the G query heads of KV head `head`, token-major (row =
    token * BLOCK_G + query head in the group): each row's query token (index among the sequence's queries),
    query head, validity and position [M, 1] (the queries are the sequence's last tokens)."""
    rows = tl.arange(0, BLOCK_T * BLOCK_G)
    token = block * BLOCK_T + rows // BLOCK_G
    q_heads = head * G + rows % BLOCK_G
    row_mask = (token < num_queries) & (rows % BLOCK_G < G)
    return token, q_heads, row_mask, (seq_len - num_queries + token)[:, None]


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def use_dot(*dims: int) -> bool:
    """Whether tiles of these dims are large enough for tl.dot (else the multiply-and-sum fallback)."""
    return min(dims) >= MIN_DOT


def use_int8_dot(m: int, k: int, n: int) -> bool:
    return min(m, n) >= MIN_DOT and k >= MIN_INT8_DOT_K


# ---------------------------------------------------------------------------------------------------------------
# Host-side argument checks shared by the launchers: a kernel reading a wrong shape or stride fails silently,
# so every launcher validates its inputs first.
# ---------------------------------------------------------------------------------------------------------------


def check_cache(cache: dict[str, torch.Tensor], config: KVConfig, num_kv_heads: int, head_dim: int,
                device: torch.device) -> None:
    """Every page and state tensor of one compressed layer is present, contiguous and shaped as format.py says."""
    if not config.compressed:
        raise ValueError(f"the HACK kernels need a compressed KV mode, got {config.mode!r}")
    float_dtype = cache["tail_k"].dtype if "tail_k" in cache else torch.float16  # fp16 or the model's bf16
    layout = KVLayout(config, num_kv_heads, head_dim, float_dtype)
    expected = {f.name: (f.shape(num_kv_heads, config.block_size), f.dtype) for f in layout.page_fields()}
    expected |= {name: (shape, float_dtype) for name, shape in layout.state_shapes().items()}
    for name, (inner, dtype) in expected.items():  # [pages or state slots, *inner]
        t = cache.get(name)
        if t is None:
            raise ValueError(f"KV cache is missing {name!r}")
        if tuple(t.shape[1:]) != tuple(inner) or t.dtype != dtype:
            raise ValueError(f"cache[{name!r}] is {tuple(t.shape)} {t.dtype}, expected [*, {inner}] {dtype}")
        if not t.is_contiguous() or t.device != device:
            raise ValueError(f"cache[{name!r}] must be contiguous on {device}")


def check_index(name: str, t: torch.Tensor, ndim: int, length: int | None, device: torch.device) -> None:
    if t.dim() != ndim or t.dtype.is_floating_point or t.dtype == torch.bool or t.device != device:
        raise ValueError(f"{name} must be a {ndim}-d integer tensor on {device}, got {tuple(t.shape)} {t.dtype}")
    if length is not None and t.shape[0] != length:
        raise ValueError(f"{name} has {t.shape[0]} entries, expected {length}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must have a unit stride in its last dim")


def check_tokens(name: str, x: torch.Tensor, head_dim: int | None = None) -> None:
    """A [T, H, D] float tensor whose channels are contiguous (token and head strides are free)."""
    if x.dim() != 3 or not x.dtype.is_floating_point or x.stride(-1) != 1:
        raise ValueError(f"{name} must be a [T, H, D] float tensor with unit channel stride, got {tuple(x.shape)}")
    if head_dim is not None and x.shape[2] != head_dim:
        raise ValueError(f"{name} has head_dim {x.shape[2]}, expected {head_dim}")


def check_sequences(seq_lens_or_cached: torch.Tensor, block_tables: torch.Tensor, state_slots: torch.Tensor,
                    device: torch.device) -> int:
    """The per-sequence index tensors agree on the batch size B; returns B."""
    batch = seq_lens_or_cached.shape[0]
    check_index("seq_lens/num_cached", seq_lens_or_cached, 1, None, device)
    check_index("block_tables", block_tables, 2, batch, device)
    check_index("state_slots", state_slots, 1, batch, device)
    return batch


def check_append_inputs(k: torch.Tensor, v: torch.Tensor, cu_new: torch.Tensor, num_cached: torch.Tensor,
                        block_tables: torch.Tensor, state_slots: torch.Tensor, cache: dict[str, torch.Tensor],
                        config: KVConfig) -> tuple[int, int]:
    """Validate quantize-append arguments; returns (num_kv_heads, head_dim)."""
    check_tokens("k", k)
    check_tokens("v", v, k.shape[2])
    if v.shape != k.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    batch = check_sequences(num_cached, block_tables, state_slots, k.device)
    check_index("cu_new", cu_new, 1, batch + 1, k.device)
    check_cache(cache, config, k.shape[1], k.shape[2], k.device)
    return k.shape[1], k.shape[2]


def check_attention_inputs(q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                           state_slots: torch.Tensor, cache: dict[str, torch.Tensor],
                           config: KVConfig) -> tuple[int, int, int]:
    """Validate attention arguments; returns (num_kv_heads, query heads per KV head, head_dim)."""
    check_tokens("q", q)
    num_kv_heads, head_dim = cache["k_codes"].shape[1] if "k_codes" in cache else 0, q.shape[2]
    if not num_kv_heads or q.shape[1] % num_kv_heads:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of the cache's {num_kv_heads} KV heads")
    check_sequences(seq_lens, block_tables, state_slots, q.device)
    check_cache(cache, config, num_kv_heads, head_dim, q.device)
    return num_kv_heads, q.shape[1] // num_kv_heads, head_dim


def sum_tensors(cache: dict[str, torch.Tensor], config: KVConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(k_sums, v_sums) pointers for a kernel; without sum_elimination the kernel recomputes the sums and never
    reads these, so the code tensors stand in."""
    if config.sum_elimination:
        return cache["k_sums"], cache["v_sums"]
    return cache["k_codes"], cache["v_codes"]


def exp_tensors(cache: dict[str, torch.Tensor], config: KVConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(K's, V's) token-exponent pointers for a kernel: both kv_exp (a nibble each); without token scales the
    kernel never reads them, so the code tensors stand in."""
    if config.token_scales:
        return cache["kv_exp"], cache["kv_exp"]
    return cache["k_codes"], cache["v_codes"]


def output_for(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """The attention output tensor: `out` when given (checked against q), else a new one like q."""
    if out is None:
        return torch.empty_like(q)
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device} with unit channel stride")
    return out
