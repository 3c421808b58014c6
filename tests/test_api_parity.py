"""OpenAI/vLLM API parity through a real cluster (router, prefill and decode processes; tiny random model, fp16
KV): the official `openai` client exercising every sampling field, the tokenizer endpoints, and lm-eval-style
prompt scoring checked against the model's own log-softmax."""
from __future__ import annotations

import json

import grpc
import httpx
import openai
import pytest
import torch

from common.cluster import Cluster, ClusterConfig
from common.engine import Engine
from common.kv.config import KVConfig
from common.kv.factory import make_kv_backend
from common.kv.interface import ForwardBatch
from common.loader import load_model
from common.sampling import SamplingParams
from proto import hack_pb2, hack_pb2_grpc

pytestmark = pytest.mark.slow

EOS = 2  # </s> of the byte tokenizer


@pytest.fixture(scope="module")
def checkpoint(random_checkpoint):
    return random_checkpoint()


@pytest.fixture(scope="module")
def MODEL(checkpoint) -> str:  # noqa: N802 - reads as the constant it is
    return checkpoint.name


@pytest.fixture(scope="module")
def cluster(checkpoint):
    config = ClusterConfig(str(checkpoint), kv_mode="fp16", port=0, router_args=("--health-interval", "0.5"))
    with Cluster(config) as running:
        yield running


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_model(checkpoint, device="cpu")


@pytest.fixture
def client(cluster):
    with openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def fp16_engine(loaded) -> Engine:
    return Engine(loaded, make_kv_backend(KVConfig(mode="fp16"), loaded.config, "cpu", torch.float32, max_tokens=512))


def log_softmax_over(loaded, ids: list[int]) -> torch.Tensor:
    """The model's log-probabilities after every position of `ids` ([len(ids), V]), fp16 KV."""
    kv = make_kv_backend(KVConfig(mode="fp16"), loaded.config, "cpu", torch.float32, max_tokens=512)
    batch = ForwardBatch.build([0], [0], [len(ids)])
    kv.reserve(batch)
    logits = loaded.model(torch.tensor(ids), batch, kv, logits="all")
    return torch.log_softmax(logits.float(), dim=-1)


def token_id(cluster, text: str) -> int:
    ids = httpx.post(f"{cluster.url}/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
    assert len(ids) == 1
    return ids[0]


def prefill_counters(cluster) -> hack_pb2.Counters:
    with grpc.insecure_channel(cluster.by_role("prefill")[0].address) as channel:
        return hack_pb2_grpc.PrefillServiceStub(channel).Stats(hack_pb2.StatsRequest()).counters


def test_n_choices_are_different_and_reproducible_with_a_seed(client, cluster, MODEL):
    def ask(**fields):
        return client.completions.create(model=MODEL, prompt="Once upon", max_tokens=8, n=3, seed=11,
                                         extra_body={"ignore_eos": True}, **fields)

    before = prefill_counters(cluster)
    first = ask(temperature=0.8)
    assert prefill_counters(cluster).requests_total == before.requests_total + 1  # one prefill for 3 choices
    again = ask(temperature=0.8)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert len(set(texts)) == 3
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    prompt_len = httpx.post(f"{cluster.url}/tokenize", json={"prompt": "Once upon"}).json()["count"]
    assert first.usage.completion_tokens == 24 and first.usage.prompt_tokens == prompt_len  # the prompt once
    greedy = ask(temperature=0)
    assert len({c.text for c in greedy.choices}) == 1
    streamed = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2,
                                              max_tokens=4, seed=3, stream=True, extra_body={"ignore_eos": True},
                                              stream_options={"include_usage": True})
    chunks = list(streamed)
    indexes = [choice.index for chunk in chunks for choice in chunk.choices]
    assert set(indexes) == {0, 1} and indexes[:2] == [0, 1]  # the role preambles, in choice order
    finished = [choice.index for chunk in chunks for choice in chunk.choices if choice.finish_reason]
    assert sorted(finished) == [0, 1] and chunks[-1].usage.completion_tokens == 8


def test_prompt_scoring_equals_the_models_log_softmax(client, loaded, MODEL):
    """lm-eval-harness loglikelihood requests: echo, logprobs=1, max_tokens 0 or 1."""
    prompt = [1, 80, 101, 44, 200, 7, 66, 66, 90]
    reference = log_softmax_over(loaded, prompt)
    for max_tokens in (0, 1):
        response = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=1,
                                              max_tokens=max_tokens, temperature=0)
        logprobs = response.choices[0].logprobs
        assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
        expected = reference[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])].tolist()
        assert logprobs.token_logprobs[1:len(prompt)] == pytest.approx(expected, abs=1e-4)
        assert len(logprobs.tokens) == len(prompt) + max_tokens
        assert response.usage.completion_tokens == max_tokens
        if max_tokens:  # the greedy token's logprob is the maximum of the last position
            assert logprobs.token_logprobs[-1] == pytest.approx(reference[-1].max().item(), abs=1e-4)
    streamed = list(client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=1, max_tokens=2,
                                              temperature=0, stream=True, extra_body={"ignore_eos": True}))
    streamed_logprobs = [lp for chunk in streamed for choice in chunk.choices if choice.logprobs
                         for lp in choice.logprobs.token_logprobs]
    assert streamed_logprobs[0] is None and len(streamed_logprobs) == len(prompt) + 2
    assert streamed_logprobs[1:len(prompt)] == pytest.approx(expected, abs=1e-4)


def test_output_logprobs_equal_the_models_log_probabilities(client, cluster, loaded, MODEL):
    prompt = [1, 70, 111, 33]
    reference = fp16_engine(loaded).generate([prompt], [SamplingParams(6, temperature=0, ignore_eos=True)])[0]
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=2,
                                         extra_body={"ignore_eos": True})
    log_softmax = log_softmax_over(loaded, prompt + reference.token_ids)
    positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(reference.token_ids))
    expected = log_softmax[positions, torch.tensor(reference.token_ids)].tolist()
    logprobs = response.choices[0].logprobs
    assert logprobs.token_logprobs == pytest.approx(expected, abs=1e-4)
    assert all(top for top in logprobs.top_logprobs)  # distinct ids may decode to one string (bytes: U+FFFD)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=5, logprobs=True, top_logprobs=3, temperature=0,
                                          extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(entry.top_logprobs) == 3 for entry in content)
    assert all(entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5) for entry in content)
    streamed = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                              max_tokens=5, logprobs=True, top_logprobs=3, temperature=0,
                                              stream=True, extra_body={"ignore_eos": True})
    entries = [e for chunk in streamed for choice in chunk.choices if choice.logprobs for e in choice.logprobs.content]
    assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in content], abs=1e-5)


def test_penalties_match_in_process_generation(client, loaded, MODEL):
    prompt = [1, 65, 66, 65, 66, 65]
    # A negative presence penalty pulls the output back to its own tokens (the random model never repeats
    # otherwise), the frequency penalty pushes each one away again as its count grows.
    fields = dict(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=-2.0)
    params = SamplingParams(12, temperature=0, ignore_eos=True, **fields)
    reference = fp16_engine(loaded).generate([prompt], [params])[0]
    plain = fp16_engine(loaded).generate([prompt], [SamplingParams(12, temperature=0, ignore_eos=True)])[0]
    response = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=12, temperature=0, presence_penalty=-2.0, frequency_penalty=0.5,
        extra_body={"repetition_penalty": 1.3, "ignore_eos": True}, logprobs=0)
    tokens = response.choices[0].logprobs.tokens
    decode = loaded.tokenizer.decode
    assert tokens == [decode([t]) for t in reference.token_ids]
    assert reference.token_ids != plain.token_ids  # the penalties do change this output


def test_logit_bias_min_tokens_and_stop_strings(client, cluster, MODEL):
    a = token_id(cluster, "a")
    forced = client.completions.create(model=MODEL, prompt="x", max_tokens=6, temperature=0,
                                       logit_bias={str(a): 100})
    assert forced.choices[0].text == "aaaaaa"
    eos_first = client.completions.create(model=MODEL, prompt="x", max_tokens=6, temperature=0,
                                          logit_bias={str(EOS): 100}, extra_body={"min_tokens": 3})
    assert eos_first.usage.completion_tokens == 4 and eos_first.choices[0].finish_reason == "stop"
    stopped = client.completions.create(model=MODEL, prompt="x", max_tokens=6, temperature=0,
                                        logit_bias={str(a): 100}, stop=["aaa"],
                                        extra_body={"include_stop_str_in_output": True})
    assert stopped.choices[0].text == "aaa" and stopped.choices[0].finish_reason == "stop"


def test_continuous_usage_unknown_fields_and_tokenizer_endpoints(cluster, MODEL):
    url = cluster.url
    with httpx.Client(base_url=url, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True},
                "some_new_openai_field": {"x": 1}}) as response:
            assert response.status_code == 200
            assert response.headers["x-ignored-fields"] == "some_new_openai_field"
            chunks = [json.loads(line[6:]) for line in response.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        assert all("usage" in chunk for chunk in chunks)
        counts = [chunk["usage"]["completion_tokens"] for chunk in chunks]
        assert counts == sorted(counts) and counts[-1] == 5
        tokens = http.post("/tokenize", json={"prompt": "hello"}).json()
        assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 512
        assert http.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"].endswith("hello")
        assert http.get("/version").json()["version"]
        model = http.get("/v1/models").json()["data"][0]
        assert model["id"] == MODEL and model["max_model_len"] == 512 and model["root"]
        bad = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": True})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"


def test_structured_output_follows_the_schema(client, MODEL):
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "blue"]}, "ok": {"type": "boolean"}},
              "required": ["color", "ok"], "additionalProperties": False}
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "pick"}],
                                          max_tokens=60, temperature=0.9, seed=4, response_format=response_format)
    document = json.loads(chat.choices[0].message.content)
    assert document["color"] in ("red", "blue") and isinstance(document["ok"], bool)
    assert chat.choices[0].finish_reason == "stop"
    completion = client.completions.create(model=MODEL, prompt="x", max_tokens=8, temperature=0,
                                           extra_body={"response_format": {"type": "json_object"}})
    assert completion.choices[0].text.startswith("{")
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "x", "schema": {"type": "nope"}}})
    assert "invalid JSON schema" in bad.value.message
