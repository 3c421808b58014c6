"""`backend_for_sequences`: a pool that holds the given sequences at once, partial pages included."""
from __future__ import annotations

import pytest

from common.eval.backend import backend_for_sequences
from common.kv.config import KVConfig
from common.kv.interface import ForwardBatch, KVCacheFull


@pytest.mark.parametrize("config", [KVConfig(mode="fp16", partition=32), KVConfig(mode="hack", partition=32)])
def test_holds_every_sequence_and_no_more(stories_model, config) -> None:
    lengths = [1, 17, 33, 65]  # each ends in a partial page
    backend = backend_for_sequences(stories_model, config, lengths)
    backend.reserve(ForwardBatch.build([0, 1, 2, 3], [0] * 4, lengths))
    assert [backend.num_tokens(i) for i in range(4)] == lengths
    if config.mode == "fp16":  # 1 + 1 + 2 + 3 pages, all in use (the compressed modes keep 4 sinks out of pages)
        assert backend.pool.used_blocks == 7 and backend.pool.free_blocks == 0
    with pytest.raises(KVCacheFull):
        backend.reserve(ForwardBatch.build([0, 1, 2, 3], lengths, [32] * 4))
