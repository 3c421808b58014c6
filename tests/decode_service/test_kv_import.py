"""KV imports off the step's critical path: staged layers are written between steps within a byte budget."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc
import pytest

from common.kv.config import KVConfig
from common.kv.format import KVLayout
from common.sampling import SamplingParams
from common.service import ServiceError
from decode_service.engine import DecodeEngine, StagedLayer
from decode_service.scheduler import Scheduler

LAYOUT = KVLayout(KVConfig(partition=32), num_kv_heads=2, head_dim=32)


def test_staged_layers_are_taken_within_the_budget_and_dropped_for_ended_requests() -> None:
    async def scenario():
        scheduler = Scheduler(LAYOUT, 20, 4, 4)
        engine = DecodeEngine(SimpleNamespace(), scheduler, kv_timeout_s=5, import_budget_bytes=100)
        live, gone = scheduler.admit("a", 40, SamplingParams()), scheduler.admit("b", 40, SamplingParams())
        loop = asyncio.get_running_loop()
        items = [StagedLayer(request, layer, None, nbytes, loop.create_future())
                 for request, layer, nbytes in ((live, 0, 60), (gone, 0, 10), (live, 1, 30), (live, 2, 30),
                                                (live, 3, 500))]
        engine._staged.extend(items)
        scheduler.finish(gone)
        first, second, third = engine._take_staged(), engine._take_staged(), engine._take_staged()
        engine._import_thread.shutdown()
        engine._model_thread.shutdown()
        return items, first, second, third

    items, first, second, third = asyncio.run(scenario())
    assert first == [items[0], items[2]]  # 60 + 30 bytes fit the 100-byte budget; b ended, its layer is dropped
    assert second == [items[3]] and third == [items[4]]  # a layer over the budget still goes, alone
    error = items[1].written.exception()
    assert isinstance(error, ServiceError) and error.code == grpc.StatusCode.CANCELLED


def test_bad_budgets_are_refused() -> None:
    with pytest.raises(ValueError, match="import_budget_bytes"):
        DecodeEngine(SimpleNamespace(), Scheduler(LAYOUT, 4, 1, 1), kv_timeout_s=1, import_budget_bytes=0)
