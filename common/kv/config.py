"""`KVConfig`: how the KV cache is stored and how attention is computed on it.

Three modes share one config:
  fp16     uncompressed 16-bit pages (the disaggregated baseline);
  dequant  HACK's compressed storage, dequantized to float before every attention (KIVI/KVQuant-style baseline);
  hack     HACK's compressed storage, attention computed directly on the codes (homomorphic).
The byte layout behind the fields is documented in `format.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

KVMode = Literal["fp16", "dequant", "hack"]
KeyAxis = Literal["token", "channel"]
Rounding = Literal["nearest", "stochastic"]
Ranges = Literal["minmax", "mse"]

MODES: tuple[str, ...] = ("fp16", "dequant", "hack")
BITS: tuple[int, ...] = (2, 4, 8)
PARTITIONS: tuple[int, ...] = (32, 64, 128)
KEY_AXES: tuple[str, ...] = ("token", "channel")
ROUNDINGS: tuple[str, ...] = ("nearest", "stochastic")
RANGES: tuple[str, ...] = ("minmax", "mse")


# The paper's HACK format: min/max ranges, no rotation, no 16-bit window, no token scales; also what the Triton
# append kernel implements (ops.store_kernel_gap). The paper's own setting is 2 bits at Π=64 (it also studies 32 and
# 128), the default Π here is 128: KVConfig(partition=PAPER_PARTITION, **PAPER_SETTING) or the flags
# --partition 64 --ranges minmax --no-rotate --window 0 --no-token-scales select it.
PAPER_SETTING = {"ranges": "minmax", "rotate": False, "window": 0, "token_scales": False}
PAPER_PARTITION = 64


@dataclass(frozen=True)
class KVConfig:
    mode: KVMode = "hack"
    bits: int = 2  # bits per K/V code
    # bits per K code when K differs from V (0: `bits`). 4-bit keys keep long-range retrieval that 2-bit keys lose
    # (docs/accuracy.md, "Long context"), at about 25% of fp16's wire instead of 19%; attention stays on the codes
    key_bits: int = 0
    # Π: values sharing one scale/min. 128 (the paper's is 64): half the scale/min bytes buy a longer 16-bit window
    # within the same wire bytes, which pays more than the finer partitions on SmolLM2-135M (docs/accuracy.md)
    partition: int = 128
    block_size: int = 0  # tokens per page, a multiple of Π; 0 means Π
    # K partitions: per token along head_dim (paper v1) or per channel along Π tokens (KIVI / the paper's artifact).
    # "channel" is the default (docs/accuracy.md): at 2 bits/Π=64, stories260K perplexity 5.84 vs 32.2 for "token",
    # and 2.8x less attention error at head_dim 128 with outlier key channels.
    key_axis: KeyAxis = "channel"
    rounding: Rounding = "nearest"
    # each K/V partition's [min, min + scale * (2^b - 1)]: its min and max, or the clipped range of least squared
    # error (format.CLIP_GRID; values outside are clamped): the same bytes, costs only quantization time.
    # "mse", window=192, Π=128 and rotate are the defaults, chosen by perplexity and wire bytes on SmolLM2-135M's
    # tuning text (docs/accuracy.md); PAPER_SETTING with PAPER_PARTITION gives back the paper's
    # plain 2-bit, Π=64 format.
    ranges: Ranges = "mse"
    num_sinks: int = 4  # first tokens kept 16-bit: halves the attention error with a sink token (docs/accuracy.md)
    # most recent tokens kept 16-bit beyond the open partition (KIVI's residual; docs/accuracy.md): a token is
    # quantized once `window` newer tokens follow its partition. 192 (was 160): better on both tuning texts at
    # 512- and 2,048-token contexts for the same wire bytes at 4,096 tokens (mean wire 19.35%, memory 22.75% of fp16)
    window: int = 192
    # K and V rotated per KV head by a seeded randomized Hadamard matrix before they are stored (QuaRot/QuIP#):
    # q·k and P·V are unchanged (q is rotated alike, the output rotated back), outliers spread over channels
    rotate: bool = True
    # each quantized token's K and V rows divided by a power of two near their largest magnitude before the
    # per-channel quantization, the exponent stored (one int8 per token and head, format.py): tokens of small
    # magnitude keep their own resolution instead of the group's largest token's. Homomorphic: a token's score is
    # multiplied by its K scale, a probability by its V scale before P·V. On by default: on SmolLM2-135M's tuning
    # texts +1.6% vs +3.3% (Wikipedia slice, simulated) with 512-token windows, for 1 byte per token and head
    # (wire 19.6% of fp16 at 4,096 tokens instead of 19.4%; docs/accuracy.md)
    token_scales: bool = True
    sum_elimination: bool = True  # store per-partition code sums instead of recomputing them at every attention
    requant_elimination: bool = True  # keep the open partition 16-bit instead of requantizing it every step
    quantized_prefill: bool = True  # prefill attends to the stored (compressed) K/V, not the original float K/V
    seed: int = 0  # seeds stochastic rounding and the rotation's signs

    def __post_init__(self) -> None:
        if self.block_size == 0:
            object.__setattr__(self, "block_size", self.partition)
        _check_choice("mode", self.mode, MODES)
        _check_choice("bits", self.bits, BITS)
        _check_choice("key_bits", self.key_bits, (0, *BITS))
        _check_choice("partition", self.partition, PARTITIONS)
        _check_choice("key_axis", self.key_axis, KEY_AXES)
        _check_choice("rounding", self.rounding, ROUNDINGS)
        _check_choice("ranges", self.ranges, RANGES)
        if self.block_size < 0 or self.block_size % self.partition:
            raise ValueError(
                f"block_size must be a positive multiple of partition={self.partition}, got {self.block_size}"
            )
        if self.num_sinks < 0:
            raise ValueError(f"num_sinks must be >= 0, got {self.num_sinks}")
        if self.window < 0:
            raise ValueError(f"window must be >= 0, got {self.window}")

    @property
    def wire_identity(self) -> str:
        """The options a prefill and a decode instance must share for pushed KV to mean the same thing there
        (how tokens split into sinks, pages and the 16-bit tail; the code layout; the rotation). Options that
        only change how new tokens are quantized (ranges, rounding) or what is cached locally are left out."""
        if not self.compressed:
            return "fp16"
        rotation = f"rotate(seed={self.seed})" if self.rotate else "no-rotate"
        key_bits = f" key_bits={self.k_bits}" if self.k_bits != self.bits else ""
        token_scales = " token_scales" if self.token_scales else ""
        return (f"bits={self.bits}{key_bits} partition={self.partition} key_axis={self.key_axis} sinks={self.num_sinks} "
                f"window={self.window} requant_elimination={self.requant_elimination} {rotation}{token_scales}")

    @property
    def k_bits(self) -> int:
        """Bits per K code (V codes have `bits`)."""
        return self.key_bits or self.bits

    @property
    def compressed(self) -> bool:
        """True for the modes that store 2/4/8-bit codes (dequant, hack)."""
        return self.mode != "fp16"

    def head_partition(self, head_dim: int) -> int:
        """Πd: partition size for partitions that run along head_dim."""
        pd = min(self.partition, head_dim)
        if head_dim % pd or (head_dim * min(self.bits, self.k_bits)) % 8:
            raise ValueError(
                f"head_dim={head_dim} must be a multiple of min(partition, head_dim)={pd} and fill whole bytes "
                f"at {self.bits} bits"
            )
        return pd

    @staticmethod
    def from_dict(values: dict) -> "KVConfig":
        """Build from a plain mapping (CLI flags, JSON); unknown keys are an error, not silently dropped."""
        unknown = sorted(set(values) - set(KVConfig.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown KV config keys: {unknown}")
        return KVConfig(**values)


def _check_choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"KVConfig.{name} must be one of {choices}, got {value!r}")
