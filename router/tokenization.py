"""Prompts to token ids: the tokenizer, the chat template and the limits read from the model directory."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from router.errors import invalid_request


@dataclass(frozen=True)
class ModelInfo:
    max_model_len: int  # context window: prompt + generated tokens
    vocab_size: int
    eos_token_ids: tuple[int, ...]


def load_tokenizer(model_dir: str) -> PreTrainedTokenizerBase:
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"model directory {model_dir!r} does not exist")
    return AutoTokenizer.from_pretrained(model_dir)


def load_model_info(model_dir: str, tokenizer: PreTrainedTokenizerBase, max_model_len: int = 0) -> ModelInfo:
    """max_model_len = 0 takes the config's max_position_embeddings; a larger explicit value is an error."""
    config = AutoConfig.from_pretrained(model_dir)
    context = config.max_position_embeddings
    if max_model_len > context:
        raise ValueError(f"max_model_len {max_model_len} exceeds the model's context window {context}")
    eos = set(_as_ids(config.eos_token_id)) | set(_as_ids(tokenizer.eos_token_id))
    if (Path(model_dir) / "generation_config.json").is_file():
        eos |= set(_as_ids(GenerationConfig.from_pretrained(model_dir).eos_token_id))
    vocab_size = max(config.vocab_size, len(tokenizer))
    return ModelInfo(max_model_len or context, vocab_size, tuple(sorted(eos)))


def _as_ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def encode_completion_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | list[int], vocab_size: int) -> list[int]:
    """A text prompt is tokenized with the tokenizer's special tokens (BOS); token ids are taken as given."""
    if isinstance(prompt, str):
        ids = tokenizer(_valid_text(prompt, "prompt")).input_ids
    else:
        bad = [token for token in prompt if not 0 <= token < vocab_size]
        if bad:
            raise invalid_request(f"token ids {bad[:8]} are outside the vocabulary [0, {vocab_size})", "prompt")
        ids = list(prompt)
    if not ids:
        raise invalid_request("the prompt is empty", "prompt")
    return ids


def _valid_text(text: str, param: str) -> str:
    """JSON may carry lone UTF-16 surrogates ("\\ud800") that no tokenizer can encode: a 400, not a crash."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise invalid_request(f"{param} is not valid Unicode text: a lone surrogate "
                              f"{text[error.start]!r} at position {error.start}", param) from None
    return text


def encode_chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """Render the messages with the model's chat template; the template writes the special tokens itself."""
    if not tokenizer.chat_template:
        raise invalid_request("this model has no chat template; use /v1/completions", "messages")
    for index, message in enumerate(messages):
        _valid_text(message["content"], f"messages.{index}.content")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if not ids:
        raise invalid_request("the chat template rendered an empty prompt", "messages")
    return ids
