"""Model configuration: the subset of a Hugging Face config that our runtime implements.

`ModelConfig.from_hf` reads a `transformers` config object and refuses, with an error that
names the problem, anything the runtime does not implement exactly (another architecture,
an unknown rope scaling type, an activation other than SiLU).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
SUPPORTED_ROPE_TYPES = ("default", "llama3")


class UnsupportedModelError(ValueError):
    """The checkpoint asks for something this runtime does not implement."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    # Llama-3 frequency scaling (rope_type == "llama3").
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"unsupported rope_scaling type {self.rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if self.theta <= 0:
            raise UnsupportedModelError(f"rope_theta must be positive, got {self.theta}")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projection biases (Qwen2, some Llama finetunes)
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {self.architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "head_dim", "max_position_embeddings")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UnsupportedModelError(f"config field {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads ({self.num_heads}) is not a multiple of num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise UnsupportedModelError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def context_window(self) -> int:
        return self.max_position_embeddings

    @staticmethod
    def from_hf(hf: Any) -> "ModelConfig":
        """Build from a `transformers.PretrainedConfig`."""
        architectures = getattr(hf, "architectures", None) or []
        if len(architectures) != 1:
            raise UnsupportedModelError(f"config.json must name exactly one architecture, got {architectures}")
        activation = getattr(hf, "hidden_act", "silu")
        if activation != "silu":
            raise UnsupportedModelError(f"unsupported hidden_act {activation!r}; only 'silu' (SwiGLU) is implemented")
        num_heads = hf.num_attention_heads
        return ModelConfig(
            architecture=architectures[0],
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // num_heads,
            max_position_embeddings=_context_window(hf),
            rms_norm_eps=hf.rms_norm_eps,
            rope=_rope_config(hf),
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            attention_bias=architectures[0] == "Qwen2ForCausalLM" or bool(getattr(hf, "attention_bias", False)),
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            qk_norm=architectures[0] == "Qwen3ForCausalLM",
            bos_token_id=getattr(hf, "bos_token_id", None),
            eos_token_ids=_as_id_tuple(getattr(hf, "eos_token_id", None)),
        )


def _context_window(hf: Any) -> int:
    """max_position_embeddings, capped by a sliding window (we implement full attention only,
    which is exact as long as no sequence outgrows the window)."""
    window = hf.max_position_embeddings
    uses_window = getattr(hf, "use_sliding_window", True)  # Qwen2/3 have an explicit switch; Mistral has none
    sliding = getattr(hf, "sliding_window", None)
    if uses_window and sliding:
        window = min(window, int(sliding))
    return window


def _rope_config(hf: Any) -> RopeConfig:
    # transformers >= 5 keeps everything in rope_parameters; older versions use rope_theta + rope_scaling.
    params = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "llama3":
        return RopeConfig(theta=float(theta), rope_type=rope_type)
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )


def _as_id_tuple(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)
