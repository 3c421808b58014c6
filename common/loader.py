"""Loading a checkpoint into our runtime, fully offline: a Hugging Face directory, a GGUF file (converted once
into a cached Hugging Face directory, see common.gguf_checkpoint), or an embedded model's name (common.default_model).

Config via `transformers.AutoConfig`, weights via `safetensors` (one file or shards listed in
`model.safetensors.index.json`), tokenizer and chat template via `transformers.AutoTokenizer`.
Weights are checked as a whole before anything is copied: missing, unexpected and
mis-shaped tensors are reported together in one `CheckpointError`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from common.config import ModelConfig
from common.default_model import EmbeddedModelMissing, cache_dir, embedded_model_path, served_model_name
from common.gguf_checkpoint import GGUFError, converted_checkpoint, find_gguf
from common.model import CausalLM

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CheckpointError(ValueError):
    """The checkpoint directory is missing, incomplete or does not match its config."""


@dataclass
class LoadedModel:
    model: CausalLM
    tokenizer: object  # a transformers PreTrainedTokenizerBase
    config: ModelConfig
    path: Path  # the Hugging Face directory loaded (for a GGUF file or an embedded model: its cached conversion)
    name: str = ""  # what the user named it: served_model_name(--model), e.g. "smollm2-135m-instruct"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """'auto' (or None) is float32 on CPU and bfloat16 on CUDA."""
    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_model_path(model: str) -> Path:
    """The Hugging Face checkpoint directory behind a --model value: an embedded model's name, a local
    directory, a .gguf file (or a directory holding one; converted on first use), or a hub id (downloaded
    into the local cache)."""
    try:
        embedded = embedded_model_path(model)
    except EmbeddedModelMissing as error:
        raise CheckpointError(str(error)) from None
    path = embedded if embedded is not None else Path(model).expanduser()
    try:
        gguf_file = find_gguf(path)
        if gguf_file is not None:
            return converted_checkpoint(gguf_file, cache_dir())
    except GGUFError as error:
        raise CheckpointError(str(error)) from None
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1 or path.suffix == ".gguf":
        raise CheckpointError(f"model path {model!r} is not a checkpoint directory or GGUF file")
    return _download_from_hub(model)


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as error:  # network down, unknown repo, gated model, offline mode...
        raise CheckpointError(
            f"could not find model {repo_id!r}: it is not a local directory and downloading it from the "
            f"Hugging Face hub failed ({type(error).__name__}: {error}). Pass a local checkpoint directory "
            f"with --model or HACK_MODEL."
        ) from error


def load_model(model: str | os.PathLike, dtype: str | None = None, device: str | None = None) -> LoadedModel:
    from transformers import AutoConfig, AutoTokenizer

    path = resolve_model_path(str(model))
    torch_device = torch.device(device) if device else default_device()
    config = ModelConfig.from_hf(AutoConfig.from_pretrained(path, local_files_only=True))
    weights = read_safetensors(path)
    with torch.device("meta"):
        module = CausalLM(config)
    check_weights(module, weights)
    module.to_empty(device=torch_device)
    module.tie_weights()
    torch_dtype = resolve_dtype(dtype, torch_device)
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(weights[name].to(torch_dtype))
    module.to(torch_dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return LoadedModel(module, tokenizer, config, path, served_model_name(str(model)))


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = ["model.safetensors"]
    missing_files = [name for name in files if not (path / name).exists()]
    if missing_files:
        raise CheckpointError(f"checkpoint {path} is missing weight file(s): {', '.join(missing_files)}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(path / name, framework="pt") as handle:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    return tensors


def check_weights(module: CausalLM, weights: dict[str, torch.Tensor]) -> None:
    """Raise one CheckpointError listing every missing, unexpected or mis-shaped tensor."""
    expected = {name: tuple(p.shape) for name, p in module.named_parameters()}
    ignorable = {"lm_head.weight"} if module.config.tie_word_embeddings else set()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected) - ignorable)
    wrong_shape = [
        f"{name}: checkpoint {tuple(weights[name].shape)}, model {shape}"
        for name, shape in expected.items()
        if name in weights and tuple(weights[name].shape) != shape
    ]
    problems = []
    if missing:
        problems.append("missing tensors: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected tensors: " + ", ".join(unexpected))
    if wrong_shape:
        problems.append("mis-shaped tensors: " + "; ".join(wrong_shape))
    if problems:
        raise CheckpointError("checkpoint does not match its config: " + " | ".join(problems))
