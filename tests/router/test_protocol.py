"""Request validation of the OpenAI protocol models (the HTTP-level error bodies are in test_app.py)."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from router.protocol import ChatCompletionRequest, CompletionRequest


def completion(**fields: object) -> CompletionRequest:
    return CompletionRequest(**({"model": "m", "prompt": "hi"} | fields))


def test_defaults_leave_sampling_to_the_server():
    request = completion()
    assert request.max_tokens is None and request.temperature is None and request.stop_strings == []
    assert request.include_usage is False and request.kv_mode is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"n": 17}, "less than or equal to 16"),
        ({"stop": ["ok", ""]}, "non-empty"),
        ({"stream_options": {"include_usage": True}}, "only allowed when `stream`"),
        ({"best_of": 2}, "`best_of` different from `n`"),
        ({"presence_penalty": 2.5}, "less than or equal to 2"),
        ({"top_p": 0}, "greater than 0"),
        ({"top_k": -2}, "greater than or equal to -1"),
        ({"top_k": 2**31}, "less than or equal to 2147483647"),
        ({"seed": -1}, "greater than or equal to 0"),
        ({"max_tokens": -5}, "greater than or equal to 0"),
        ({"max_tokens": True}, "valid integer"),
        ({"max_tokens": "5"}, "valid integer"),
        ({"temperature": "0.5"}, "valid number"),
        ({"ignore_eos": "yes"}, "valid boolean"),
        ({"stop_token_ids": [-5]}, "greater than or equal to 0"),
        ({"logit_bias": {"a": 1.0}}, "keys must be token ids"),
        ({"logit_bias": {"3": -101}}, r"in \[-100, 100\]"),
        ({"min_tokens": 9, "max_tokens": 3}, "must not exceed"),
        ({"logprobs": 21}, "less than or equal to 20"),
        ({"suffix": "end"}, "`suffix` is not supported"),
        ({"response_format": {"type": "json_schema"}}, "`json_schema.schema` is required"),
    ],
)
def test_invalid_fields_are_rejected_with_a_reason(fields, message):
    with pytest.raises(ValidationError, match=message):
        completion(**fields)


def test_unknown_fields_are_accepted_and_named():
    request = completion(temprature=0.1, stream=True,
                         stream_options={"include_usage": True, "continuous_usage_stats": True, "extra": 1})
    assert request.ignored_fields == ["temprature", "stream_options.extra"]
    assert request.include_usage and request.continuous_usage
    assert completion().ignored_fields == []


def test_sampling_extras_and_logprob_counts():
    request = completion(logprobs=2, echo=True, presence_penalty=0.5, frequency_penalty=-1, repetition_penalty=1.2,
                         logit_bias={"7": -100}, min_tokens=2, n=3, best_of=3, include_stop_str_in_output=True)
    assert request.top_logprobs_count() == 2 and request.prompt_logprobs_count() == 2
    assert completion(logprobs=0).prompt_logprobs_count() is None
    assert completion(max_tokens=0, echo=True).scores_prompt_only and not completion(max_tokens=0).scores_prompt_only
    assert not ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}],
                                     max_tokens=0).scores_prompt_only
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], logprobs=True,
                                 top_logprobs=3)
    assert chat.top_logprobs_count() == 3 and chat.prompt_logprobs_count() is None
    assert ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}]).top_logprobs_count() is None
    with pytest.raises(ValidationError, match="needs `logprobs`"):
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], top_logprobs=3)


def test_prompt_forms():
    assert completion(prompt=["one prompt"]).prompt == "one prompt"
    assert completion(prompt=[1, 17, 5]).prompt == [1, 17, 5]
    with pytest.raises(ValidationError, match="batched prompts"):
        completion(prompt=["a", "b"])


def test_stop_and_stream_options():
    request = completion(stop="END", stream=True, stream_options={"include_usage": True})
    assert request.stop_strings == ["END"] and request.include_usage
    assert completion(stop=["a", "bc"]).stop_strings == ["a", "bc"]


def test_chat_messages_and_max_completion_tokens():
    request = ChatCompletionRequest(
        model="m",
        messages=[{"role": "system", "content": "S"},
                  {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        max_tokens=5,
        max_completion_tokens=17,
    )
    assert request.template_messages() == [{"role": "system", "content": "S"}, {"role": "user", "content": "ab"}]
    assert request.requested_max_tokens() == 17
    with pytest.raises(ValidationError, match="at least 1 item"):
        ChatCompletionRequest(model="m", messages=[])
    with pytest.raises(ValidationError):
        ChatCompletionRequest(model="m", messages=[{"role": "robot", "content": "x"}])
