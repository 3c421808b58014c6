"""Tiny random-weight checkpoints of each supported architecture, written as real Hugging Face
checkpoint directories (config.json, model.safetensors, tokenizer files).

Used by the tests (with transformers as the reference) and as the embedded default model, so
the system runs offline with no model configured. Weights come from a fixed seed, so the same
arguments always give the same checkpoint.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

ARCHITECTURE_MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
BYTE_VOCAB = 256
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2; bytes follow


@dataclass(frozen=True)
class RandomModelSpec:
    architecture: str = "LlamaForCausalLM"
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 1
    head_dim: int = 64
    vocab_size: int = BYTE_VOCAB + len(SPECIAL_TOKENS)
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    seed: int = 0


def hf_config_dict(spec: RandomModelSpec) -> dict:
    config = {
        "architectures": [spec.architecture],
        "model_type": ARCHITECTURE_MODEL_TYPES[spec.architecture],
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": spec.rope_theta,
        "hidden_act": "silu",
        "tie_word_embeddings": spec.tie_word_embeddings,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    if spec.rope_scaling:
        config["rope_scaling"] = dict(spec.rope_scaling, rope_theta=spec.rope_theta)
    if spec.architecture == "MistralForCausalLM":
        config["sliding_window"] = None
    if spec.architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        config["use_sliding_window"] = False
    return config


def random_weights(spec: RandomModelSpec) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(spec.seed)

    def normal(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    def norm_weight(dim: int) -> torch.Tensor:
        return 1.0 + normal(dim, std=0.1)

    h, d, inner = spec.hidden_size, spec.head_dim, spec.intermediate_size
    q_dim, kv_dim = spec.num_heads * d, spec.num_kv_heads * d
    weights = {"model.embed_tokens.weight": normal(spec.vocab_size, h, std=1.0), "model.norm.weight": norm_weight(h)}
    for i in range(spec.num_layers):
        prefix = f"model.layers.{i}."
        weights |= {
            prefix + "self_attn.q_proj.weight": normal(q_dim, h, std=h**-0.5),
            prefix + "self_attn.k_proj.weight": normal(kv_dim, h, std=h**-0.5),
            prefix + "self_attn.v_proj.weight": normal(kv_dim, h, std=h**-0.5),
            prefix + "self_attn.o_proj.weight": normal(h, q_dim, std=q_dim**-0.5),
            prefix + "mlp.gate_proj.weight": normal(inner, h, std=h**-0.5),
            prefix + "mlp.up_proj.weight": normal(inner, h, std=h**-0.5),
            prefix + "mlp.down_proj.weight": normal(h, inner, std=inner**-0.5),
            prefix + "input_layernorm.weight": norm_weight(h),
            prefix + "post_attention_layernorm.weight": norm_weight(h),
        }
        if spec.architecture == "Qwen2ForCausalLM":
            for name, dim in (("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)):
                weights[prefix + f"self_attn.{name}.bias"] = normal(dim, std=0.1)
        if spec.architecture == "Qwen3ForCausalLM":
            weights[prefix + "self_attn.q_norm.weight"] = norm_weight(d)
            weights[prefix + "self_attn.k_norm.weight"] = norm_weight(d)
    if not spec.tie_word_embeddings:
        weights["lm_head.weight"] = normal(spec.vocab_size, h, std=h**-0.5)
    return weights


def write_byte_tokenizer(directory: Path, vocab_size: int) -> None:
    """A byte-level tokenizer (every UTF-8 byte is one token) with <s>/</s> and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab |= {symbol: len(SPECIAL_TOKENS) + i for i, symbol in enumerate(sorted(alphabet))}
    if vocab_size < len(vocab):
        raise ValueError(f"a byte tokenizer needs vocab_size >= {len(vocab)}, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        model_max_length=1 << 20,
    )
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    fast.save_pretrained(directory)


def write_random_checkpoint(directory: str | Path, spec: RandomModelSpec = RandomModelSpec()) -> Path:
    """Write a complete checkpoint directory for `spec` and return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config_dict(spec), indent=2))
    save_file(random_weights(spec), directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "random_model_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    write_byte_tokenizer(directory, spec.vocab_size)
    return directory
