"""Fixtures for hack-bench tests: a fake OpenAI-compatible SSE server and a tiny word-level tokenizer.

The fake server streams one chunk per output token (" t0", " t1", ...) and misbehaves on purpose when the
prompt contains a trigger word: HTTP400 (400 JSON error), MIDSTREAM_ERROR (error event inside a 200 stream,
then [DONE]) or NO_DONE (stream closes without [DONE]).
"""

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

FAKE_MODEL = "fake-model"
TOKEN_DELAY_S = 0.002
# Trigger words stay out of the vocabulary (they encode as <unk>) so random prompts never contain them.
TINY_VOCAB = ["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(40))]


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def _prompt_words(payload: dict, chat: bool) -> list:
    if chat:
        return payload["messages"][-1]["content"].split()
    prompt = payload["prompt"]
    return prompt if isinstance(prompt, list) else prompt.split()


async def _token_stream(payload: dict, chat: bool, words: list, server_state: dict) -> AsyncIterator[str]:
    server_state["in_flight"] += 1
    server_state["peak_in_flight"] = max(server_state["peak_in_flight"], server_state["in_flight"])
    try:
        n_tokens = payload.get("max_completion_tokens" if chat else "max_tokens") or 16
        if chat:
            yield _sse({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
        for i in range(n_tokens):
            await asyncio.sleep(TOKEN_DELAY_S)
            if "MIDSTREAM_ERROR" in words and i == 2:
                yield _sse({"error": {"message": "decode worker crashed", "type": "InternalServerError"}})
                yield _sse("[DONE]")
                return
            piece = {"delta": {"content": f" t{i}"}} if chat else {"text": f" t{i}"}
            yield _sse({"choices": [{"index": 0, **piece}]})
        if "NO_DONE" in words:
            return
        if (payload.get("stream_options") or {}).get("include_usage"):
            yield _sse({"choices": [], "usage": {"prompt_tokens": len(words), "completion_tokens": n_tokens}})
        yield _sse("[DONE]")
    finally:
        server_state["in_flight"] -= 1


def create_fake_openai_app() -> FastAPI:
    """A FastAPI app speaking just enough of the OpenAI streaming API; records every request body."""
    app = FastAPI()
    app.state.payloads = []
    app.state.load = {"in_flight": 0, "peak_in_flight": 0}
    app.state.model_root = None  # the model directory /v1/models reports (as vLLM's `root`), when set

    @app.get("/v1/models")
    async def list_models() -> dict:
        entry = {"id": FAKE_MODEL, "object": "model"}
        if app.state.model_root is not None:
            entry["root"] = app.state.model_root
        return {"object": "list", "data": [entry]}

    async def respond(request: Request, chat: bool):
        payload = await request.json()
        app.state.payloads.append(payload)
        if payload.get("model") != FAKE_MODEL:
            return JSONResponse({"error": {"message": f"model {payload.get('model')} not found"}}, status_code=404)
        words = _prompt_words(payload, chat)
        if "HTTP400" in words:
            return JSONResponse({"error": {"message": "prompt rejected", "code": 400}}, status_code=400)
        return StreamingResponse(_token_stream(payload, chat, words, app.state.load), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await respond(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await respond(request, chat=True)

    return app


class FakeServer:
    def __init__(self, app: FastAPI, base_url: str) -> None:
        self.app = app
        self.base_url = base_url

    @property
    def payloads(self) -> list[dict]:
        return self.app.state.payloads

    @property
    def peak_in_flight(self) -> int:
        return self.app.state.load["peak_in_flight"]

    def reset(self) -> None:
        self.app.state.payloads.clear()
        self.app.state.load.update(in_flight=0, peak_in_flight=0)


@pytest.fixture(scope="session")
def fake_server() -> Iterator[FakeServer]:
    """The fake server on a free loopback port, in a background thread."""
    app = create_fake_openai_app()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("fake OpenAI server did not start within 10 s")
        time.sleep(0.01)
    yield FakeServer(app, f"http://127.0.0.1:{sock.getsockname()[1]}")
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture
def server(fake_server: FakeServer) -> FakeServer:
    """The shared fake server with its request log cleared."""
    fake_server.reset()
    return fake_server


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved whitespace word-level tokenizer: every token is a word, so decode/encode is exact."""
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(TINY_VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    directory = tmp_path_factory.mktemp("tiny_tokenizer")
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir: Path) -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def stories_tokenizer(stories260k: Path):
    """The real stories260K tokenizer (byte-fallback BPE); skipped without ../shared."""
    return AutoTokenizer.from_pretrained(stories260k)
