"""The official `openai` client against the router (fake instances behind it)."""
from __future__ import annotations

import openai
import pytest

from tests.router.fake_instances import FakeDecode, FakePrefill
from tests.router.harness import cluster, script

pytestmark = pytest.mark.anyio

ANSWER = " and they played all day. 🌞"


async def test_openai_client_completions_chat_streaming_and_errors(byte_model, byte_tokenizer):
    first, rest = script(byte_tokenizer, ANSWER)
    async with cluster(byte_model, [FakePrefill(first)], [FakeDecode(rest)]) as c:
        client = openai.AsyncOpenAI(base_url=f"{c.url}/v1", api_key="unused", max_retries=0)
        completion = await client.completions.create(model="byte-model", prompt="Tom and Ann", max_tokens=64)
        chunks = [chunk async for chunk in await client.chat.completions.create(
            model="byte-model", messages=[{"role": "user", "content": "Tell me"}], stream=True,
            stream_options={"include_usage": True}, extra_body={"top_k": 5, "kv_mode": "fp16"})]
        models = await client.models.list()
        with pytest.raises(openai.BadRequestError) as bad:
            await client.completions.create(model="byte-model", prompt="x", max_tokens=1000)
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="gpt-4", prompt="x")
        await client.close()
    assert completion.choices[0].text == ANSWER and completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens == len(rest) + 1
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert streamed == ANSWER
    assert chunks[-1].usage.completion_tokens == len(rest) + 1 and chunks[-1].choices == []
    assert [model.id for model in models.data] == ["byte-model"]
    assert "maximum context length is 512 tokens" in bad.value.message
