"""RouterConfig validation."""
from __future__ import annotations

import pytest

from router.config import RouterConfig


def config(**fields: object) -> RouterConfig:
    return RouterConfig(**({"model": "m", "prefill_addresses": ("p:1",), "decode_addresses": ("d:1",)} | fields))


def test_served_model_name_defaults_to_the_model_path():
    assert config().model_name == "m"
    assert config(served_model_name="tiny").model_name == "tiny"
    assert config(model="/ckpt/stories260K").model_name == "stories260K"
    assert config(model="/gguf/SmolLM2-135M-Instruct.Q4_1.gguf").model_name == "SmolLM2-135M-Instruct.Q4_1"
    assert config(model="smollm2-135m-instruct").model_name == "smollm2-135m-instruct"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"model": ""}, "model"),
        ({"prefill_addresses": ()}, "at least one prefill"),
        ({"decode_addresses": ("d:1", "d:1")}, "duplicate decode"),
        ({"decode_addresses": ("localhost",)}, "not host:port"),
        ({"prefill_addresses": ("h:99999",)}, "not host:port"),
        ({"policy": "random"}, "unknown policy"),
        ({"kv_mode": "int8"}, "unknown kv_mode"),
        ({"port": 70000}, "port"),
        ({"health_interval_s": 0}, "health_interval_s"),
        ({"max_prefill_attempts": 0}, "max_prefill_attempts"),
        ({"max_model_len": -1}, "max_model_len"),
    ],
)
def test_bad_settings_fail_when_built(fields, message):
    with pytest.raises(ValueError, match=message):
        config(**fields)
