"""The default model as a user meets it: `hack-cluster` with no --model (router, prefill, decode processes, the
served KV mode `hack`) serving SmolLM2-135M-Instruct, chatting through its own ChatML template."""
from __future__ import annotations

import httpx
import pytest

from common.cluster import Cluster, ClusterConfig
from common.default_model import DEFAULT_MODEL, model_from_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(smollm2_dir, monkeypatch_module):
    monkeypatch_module.delenv("HACK_MODEL", raising=False)
    config = ClusterConfig(model_from_env(None), port=0, router_args=("--health-interval", "0.5"))
    with Cluster(config) as running:
        yield running


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def chat(cluster: Cluster, messages: list[dict[str, str]], max_tokens: int = 32) -> dict:
    response = httpx.post(f"{cluster.url}/v1/chat/completions", timeout=120.0, json={
        "model": DEFAULT_MODEL, "messages": messages, "temperature": 0, "max_tokens": max_tokens})
    assert response.status_code == 200, response.text
    return response.json()


def test_the_default_model_is_listed(cluster) -> None:
    models = httpx.get(f"{cluster.url}/v1/models", timeout=10.0).json()
    assert [card["id"] for card in models["data"]] == [DEFAULT_MODEL]
    assert models["data"][0]["max_model_len"] == 8192


def test_chat_answers_the_capital_of_france(cluster) -> None:
    body = chat(cluster, [{"role": "user", "content": "What is the capital of France?"}])
    answer = body["choices"][0]
    assert "Paris" in answer["message"]["content"]
    assert answer["finish_reason"] == "stop"  # the model ended its turn with <|im_end|>, which is not shown
    assert "<|im_end|>" not in answer["message"]["content"]


def test_system_prompt_and_earlier_turns_reach_the_model(cluster) -> None:
    # The template renders the system prompt instead of SmolLM's built-in one, and every turn: the prompt grows.
    question = [{"role": "user", "content": "What is the capital of France?"}]
    default_system = chat(cluster, question, max_tokens=1)["usage"]["prompt_tokens"]
    own_system = chat(cluster, [{"role": "system", "content": "Be brief."}, *question], max_tokens=1)
    assert own_system["usage"]["prompt_tokens"] < default_system
    turns = [{"role": "user", "content": "My name is Alice."},
             {"role": "assistant", "content": "Nice to meet you, Alice!"},
             {"role": "user", "content": "What is my name?"}]
    assert "Alice" in chat(cluster, turns)["choices"][0]["message"]["content"]
