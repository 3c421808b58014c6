"""The embedded default model: a tiny random-weight Llama generated deterministically on first use.

It lets every command run offline with no model configured. Its output is meaningless text
(random weights); point the system at a real checkpoint with --model or HACK_MODEL.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from common.random_models import RandomModelSpec, write_random_checkpoint

DEFAULT_MODEL_SPEC = RandomModelSpec(
    architecture="LlamaForCausalLM", hidden_size=256, intermediate_size=512, num_layers=4,
    num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=2048, seed=1234,
)
DEFAULT_MODEL_NAME = "hack-tiny-random-llama-v1"


def cache_dir() -> Path:
    return Path(os.environ.get("HACK_CACHE_DIR", Path.home() / ".cache" / "hack-serve"))


def ensure_default_model() -> Path:
    """Path of the default checkpoint, writing it first if needed (atomically, so parallel
    starts never see a half-written directory)."""
    target = cache_dir() / DEFAULT_MODEL_NAME
    if (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    write_random_checkpoint(staging, DEFAULT_MODEL_SPEC)
    try:
        staging.rename(target)
    except OSError:  # another process won the race
        shutil.rmtree(staging, ignore_errors=True)
    return target


def model_from_env(explicit: str | None) -> str:
    """--model if given, else HACK_MODEL, else the embedded default."""
    return explicit or os.environ.get("HACK_MODEL") or str(ensure_default_model())
