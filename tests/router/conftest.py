"""Router test fixtures. The helpers that start a router in front of fake instances are in harness.py."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def byte_model(random_checkpoint: Callable[..., Path]) -> Path:
    return random_checkpoint()


@pytest.fixture(scope="session")
def byte_tokenizer(byte_model: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(byte_model)
