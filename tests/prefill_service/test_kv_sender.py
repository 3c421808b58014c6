"""The KV push stream: layer-wise (each layer as soon as it ran) or after the forward (all at once, at its end)."""
from __future__ import annotations

import asyncio

from prefill_service.kv_sender import KVSender
from proto import hack_pb2


async def stream_order(after_forward: bool) -> list[str]:
    """What the PushKV stream had yielded at each step of a two-layer forward."""
    sender = KVSender(None, "decode:1", hack_pb2.KVHeader(request_id="r", kv_mode=hack_pb2.KV_MODE_FP16),
                      after_forward=after_forward)
    seen: list[str] = []

    async def consume() -> None:  # what gRPC does with the request stream
        async for message in sender._messages():
            seen.append(message.WhichOneof("chunk") + (str(message.block.layer) if message.HasField("block") else ""))

    consumer = asyncio.create_task(consume())
    for layer in range(2):
        sender.put_layer(layer, [b"kv"])
        await asyncio.sleep(0.01)
        seen.append(f"| layer {layer} ran")
    sender.finish(7)
    await asyncio.wait_for(consumer, 5)
    return seen


def test_a_layerwise_push_sends_each_layer_as_it_runs() -> None:
    assert asyncio.run(stream_order(after_forward=False)) == [
        "header", "block0", "| layer 0 ran", "block1", "| layer 1 ran", "trailer"]


def test_an_after_forward_push_holds_the_layers_until_the_forward_is_done() -> None:
    assert asyncio.run(stream_order(after_forward=True)) == [
        "header", "| layer 0 ran", "| layer 1 ran", "block0", "block1", "trailer"]
