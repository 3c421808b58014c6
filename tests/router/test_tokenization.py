"""Prompt building and the limits read from a model directory."""
from __future__ import annotations

import json

import pytest

from router.errors import RouterError
from router.tokenization import encode_chat_prompt, encode_completion_prompt, load_model_info, load_tokenizer


def test_model_info_reads_context_vocab_and_eos(byte_model, byte_tokenizer):
    info = load_model_info(str(byte_model), byte_tokenizer)
    assert (info.max_model_len, info.vocab_size, info.eos_token_ids) == (512, 259, (2,))
    assert load_model_info(str(byte_model), byte_tokenizer, max_model_len=17).max_model_len == 17
    with pytest.raises(ValueError, match="exceeds the model's context window 512"):
        load_model_info(str(byte_model), byte_tokenizer, max_model_len=513)


def test_eos_ids_from_generation_config_are_added(tmp_path, byte_model, byte_tokenizer):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (model_dir / name).write_bytes((byte_model / name).read_bytes())
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert load_model_info(str(model_dir), byte_tokenizer).eos_token_ids == (2, 7)


def test_missing_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nowhere"))


def test_completion_prompts(byte_tokenizer):
    assert encode_completion_prompt(byte_tokenizer, "hé", 259) == byte_tokenizer("hé").input_ids
    assert encode_completion_prompt(byte_tokenizer, [5, 258], 259) == [5, 258]
    with pytest.raises(RouterError, match=r"\[259\] are outside the vocabulary"):
        encode_completion_prompt(byte_tokenizer, [5, 259], 259)


def test_chat_prompt_uses_the_template_without_adding_bos_twice(byte_tokenizer):
    ids = encode_chat_prompt(byte_tokenizer, [{"role": "user", "content": "hi"}])
    assert byte_tokenizer.decode(ids) == "<s>user: hi\n<s>assistant: "
    assert ids.count(byte_tokenizer.bos_token_id) == 2


def test_chat_without_a_template_is_a_400(byte_model):
    tokenizer = load_tokenizer(str(byte_model))
    tokenizer.chat_template = None
    with pytest.raises(RouterError, match="no chat template") as raised:
        encode_chat_prompt(tokenizer, [{"role": "user", "content": "hi"}])
    assert raised.value.status == 400
