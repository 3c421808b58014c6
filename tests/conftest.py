"""Shared fixtures: paths into ../shared (skipped with a reason when absent) and tiny random checkpoints."""
from __future__ import annotations

from pathlib import Path

import pytest

from common.random_models import RandomModelSpec, write_random_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
STORIES260K = SHARED_DIR / "models" / "stories260K"
TINYSTORIES_VAL = SHARED_DIR / "data" / "tinystories_val.txt"


def require_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: this test needs the ../shared checkout beside the repository")
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
