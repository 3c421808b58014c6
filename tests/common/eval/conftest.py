"""Fixtures for the eval-tool tests: one torch thread (tiny tensors run far faster without a thread pool) and the
stories260K model loaded once."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.loader import LoadedModel, load_model


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def stories_model(stories260k: Path) -> LoadedModel:
    return load_model(stories260k, dtype="float32", device="cpu")
