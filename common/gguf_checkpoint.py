"""GGUF checkpoints (llama.cpp's format), converted once into a Hugging Face directory in the cache.

Parsing and dequantization come from the `gguf` package (GGUFReader, gguf.quants.dequantize, the tensor name
map); the config and the tokenizer with its chat template come from the GGUF metadata through transformers'
GGUF support. The conversion lands in `<cache>/gguf/<sha256 of the file>/` (config.json, model.safetensors,
tokenizer files), written atomically under a lock, so a later start (or another process starting at the same
time) reuses it and loads in seconds.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

# general.architecture -> the Hugging Face architecture our runtime implements. llama.cpp writes Mistral
# checkpoints as "llama" (transformers tells them apart by general.name; the runtime is the same).
GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# llama.cpp's converter interleaves the Q and K rows of these architectures for its rope kernel.
ROPE_PERMUTED_ARCHITECTURES = ("llama", "mistral")
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                          "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
WEIGHTS_FILE = "model.safetensors"
SOURCE_FILE = "hack-gguf-source.json"  # written last: a cache directory without it is incomplete


class GGUFError(ValueError):
    """The GGUF file is unreadable, truncated, or holds something the runtime does not implement."""


def find_gguf(path: Path) -> Path | None:
    """The GGUF file `path` names: the file itself, or the only *.gguf in a directory without config.json."""
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if not path.is_dir() or (path / "config.json").exists():
        return None
    candidates = sorted(path.glob("*.gguf"))
    if len(candidates) > 1:
        raise GGUFError(f"{path} holds several GGUF files ({', '.join(c.name for c in candidates)}): "
                        f"pass one of them as --model")
    return candidates[0] if candidates else None


def converted_checkpoint(gguf_path: Path, cache_root: Path) -> Path:
    """The Hugging Face directory converted from `gguf_path`, converting it first if no cache entry exists."""
    digest = file_digest(gguf_path, cache_root)
    target = cache_root / "gguf" / digest
    if (target / SOURCE_FILE).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{digest}.lock"):
        if (target / SOURCE_FILE).exists():  # another process converted it while we waited
            return target
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
        try:
            started = time.monotonic()
            log.warning("converting %s into %s (first load only)", gguf_path, target)
            convert(gguf_path, staging)
            (staging / SOURCE_FILE).write_text(json.dumps({"gguf": str(gguf_path.resolve()), "sha256": digest}))
            shutil.rmtree(target, ignore_errors=True)  # an incomplete leftover
            staging.rename(target)
            log.warning("converted %s in %.1f s", gguf_path.name, time.monotonic() - started)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def file_digest(path: Path, cache_root: Path) -> str:
    """sha256 of the file, remembered per (path, size, mtime) so a multi-GB file is hashed once."""
    stat = path.stat()
    stamp = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    memo = cache_root / "gguf" / "digests" / hashlib.sha256(stamp.encode()).hexdigest()
    if memo.exists():
        return memo.read_text().strip()
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            hasher.update(chunk)
    digest = hasher.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    staging = memo.with_name(f".{memo.name}.{os.getpid()}")
    staging.write_text(digest)
    staging.replace(memo)
    return digest


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def convert(gguf_path: Path, out_dir: Path) -> None:
    """Write config.json, model.safetensors and the tokenizer files of a Hugging Face checkpoint."""
    from safetensors.torch import save_file

    reader = open_reader(gguf_path)
    architecture = gguf_architecture(reader, gguf_path)
    check_tensor_types(reader, gguf_path)
    hf_config = _hf_config(gguf_path)
    hf_config.architectures = [GGUF_ARCHITECTURES[hf_config.model_type]]
    hf_config.save_pretrained(out_dir)
    weights = dequantized_weights(reader, architecture, hf_config.num_hidden_layers,
                                  hf_config.num_attention_heads, hf_config.num_key_value_heads)
    save_file(weights, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    _hf_tokenizer(gguf_path).save_pretrained(out_dir)


def open_reader(gguf_path: Path):
    """A GGUFReader, after checking that every tensor's data lies inside the file (truncation)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(gguf_path)
    except Exception as error:  # bad magic, truncated header, garbage metadata: numpy/struct/value errors
        raise GGUFError(f"{gguf_path} is not a readable GGUF file (corrupt or truncated?): "
                        f"{type(error).__name__}: {error}") from None
    size = gguf_path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size or tensor.data.nbytes != tensor.n_bytes:
            raise GGUFError(f"{gguf_path} is truncated: tensor {tensor.name} needs bytes up to "
                            f"{tensor.data_offset + tensor.n_bytes}, the file has {size}")
    if not reader.tensors:
        raise GGUFError(f"{gguf_path} holds no tensors")
    return reader


def gguf_architecture(reader, gguf_path: Path) -> str:
    field = reader.get_field("general.architecture")
    if field is None:
        raise GGUFError(f"{gguf_path} has no general.architecture in its metadata")
    architecture = field.contents()
    if architecture not in GGUF_ARCHITECTURES:
        raise GGUFError(f"{gguf_path}: unsupported GGUF architecture {architecture!r}; supported: "
                        f"{', '.join(GGUF_ARCHITECTURES)}")
    return architecture


def check_tensor_types(reader, gguf_path: Path) -> None:
    """One error naming every tensor of a type we cannot dequantize, before any work is done."""
    unsupported = [f"{t.name} ({t.tensor_type.name})" for t in reader.tensors
                   if t.tensor_type.name not in SUPPORTED_TENSOR_TYPES]
    if unsupported:
        shown = ", ".join(unsupported[:8]) + (f" and {len(unsupported) - 8} more" if len(unsupported) > 8 else "")
        raise GGUFError(f"{gguf_path}: unsupported GGUF tensor type in {shown}; supported types: "
                        f"{', '.join(SUPPORTED_TENSOR_TYPES)}")


def dequantized_weights(reader, architecture: str, num_layers: int, num_heads: int,
                        num_kv_heads: int) -> dict[str, torch.Tensor]:
    """Every tensor under its Hugging Face name, dequantized to float32 (F16/BF16 kept as they are)."""
    import gguf

    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == _gguf_arch_for_names(architecture))
    hf_names = _reverse_name_map(gguf.get_tensor_name_map(arch, num_layers), num_layers)
    weights: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = hf_names.get(tensor.name)
        if name is None:
            if tensor.name == "rope_freqs.weight":  # llama3 rope factors; the config carries rope_scaling
                continue
            raise GGUFError(f"GGUF tensor {tensor.name!r} has no counterpart in a {architecture} model")
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # GGUF lists dimensions fastest first
        value = _as_torch(tensor).reshape(shape)
        if architecture in ROPE_PERMUTED_ARCHITECTURES and name.endswith(("q_proj.weight", "k_proj.weight")):
            value = _unpermute_rope_rows(value, num_heads if "q_proj" in name else num_kv_heads)
        weights[name] = value.contiguous()
    return weights


def _as_torch(tensor) -> torch.Tensor:
    from gguf import GGMLQuantizationType, quants

    kind = tensor.tensor_type
    if kind in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return torch.from_numpy(np.array(tensor.data))
    return torch.from_numpy(np.asarray(quants.dequantize(tensor.data, kind), dtype=np.float32))


def _unpermute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's `permute` (per head: rows [0, 2, 4, ..., 1, 3, ...] -> interleaved pairs)."""
    rows = weight.shape[0]
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _gguf_arch_for_names(architecture: str) -> str:
    return "llama" if architecture == "mistral" else architecture


def _reverse_name_map(name_map, num_layers: int) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face parameter name, for the parameters our runtime has."""
    hf_names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    per_layer = ["input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
                 "mlp.up_proj.weight", "mlp.down_proj.weight", "self_attn.o_proj.weight",
                 "self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    per_layer += [f"self_attn.{p}_proj.{kind}" for p in "qkv" for kind in ("weight", "bias")]
    per_layer += [f"mlp.{p}_proj.bias" for p in ("gate", "up", "down")]
    hf_names += [f"model.layers.{i}.{name}" for i in range(num_layers) for name in per_layer]
    mapping = {}
    for hf_name in hf_names:
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is not None:
            mapping[gguf_name] = hf_name
    return mapping


def _hf_config(gguf_path: Path):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as error:
        raise GGUFError(f"{gguf_path}: could not build a model config from the GGUF metadata: {error}") from None
    if config.model_type not in GGUF_ARCHITECTURES:
        raise GGUFError(f"{gguf_path}: unsupported model type {config.model_type!r}")
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # the weights we write are plain floats
    return config


def _hf_tokenizer(gguf_path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as error:
        raise GGUFError(f"{gguf_path}: could not build a tokenizer from the GGUF metadata: {error}") from None
