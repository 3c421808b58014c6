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
        ({"n": 3}, "only n=1"),
        ({"stop": ["ok", ""]}, "non-empty"),
        ({"stream_options": {"include_usage": True}}, "only allowed when `stream`"),
        ({"echo": True}, "`echo` is not supported"),
        ({"best_of": 2}, "`best_of` is not supported"),
        ({"presence_penalty": 0.5}, "`presence_penalty` is not supported"),
        ({"top_p": 0}, "greater than 0"),
        ({"top_k": -2}, "greater than or equal to -1"),
        ({"seed": -1}, "greater than or equal to 0"),
        ({"max_tokens": -5}, "greater than or equal to 1"),
        ({"temprature": 0.1}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_fields_are_rejected_with_a_reason(fields, message):
    with pytest.raises(ValidationError, match=message):
        completion(**fields)


def test_neutral_values_of_unsupported_fields_are_accepted():
    request = completion(logprobs=None, echo=False, best_of=1, presence_penalty=0, frequency_penalty=0.0,
                         logit_bias={}, user="u1", n=1)
    assert request.n == 1


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
