"""Prompt sources for `hack-bench serve`.

Four datasets, chosen with `--dataset-name`:

- `random`: prompts of an exact token length drawn from the tokenizer's vocabulary (`--random-input-len`,
  `--random-output-len`, `--random-range-ratio`, as in `vllm bench serve`);
- `sharegpt`: first human turn / first reply of a ShareGPT JSON file, with vLLM's filtering rules;
- `text`: a plain text file, one prompt per line;
- `long`: windows of exactly `--long-input-len` tokens cut from a text file (long-context prefill).

Every token count excludes special tokens. Prompts built from token ids are checked to re-encode to exactly
the requested length, so `random` and `long` lengths are exact whether sent as text or as token ids.
"""

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from bench.hack_bench.records import BenchmarkError, SampleRequest

logger = logging.getLogger(__name__)

DATASET_NAMES = ("random", "sharegpt", "text", "long")
NEEDS_TOKENIZER = frozenset({"random", "sharegpt", "long"})

# vLLM's ShareGPT filter: conversations shorter or longer than this are dropped.
SHAREGPT_MIN_TOKENS = 4
SHAREGPT_MAX_PROMPT_TOKENS = 1024
SHAREGPT_MAX_TOTAL_TOKENS = 2048

# Decode/encode round trips allowed to reach an exact token count before giving up.
MAX_LENGTH_FIX_TRIES = 10


@dataclass(frozen=True)
class DatasetConfig:
    """Which prompts to build; validated on construction."""

    name: str = "random"
    path: Path | None = None
    num_prompts: int = 1000
    seed: int = 0
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    sharegpt_output_len: int | None = None
    text_output_len: int = 128
    long_input_len: int = 1024
    long_output_len: int = 128

    def __post_init__(self) -> None:
        if self.name not in DATASET_NAMES:
            raise BenchmarkError(f"unknown dataset {self.name!r}; choose one of {', '.join(DATASET_NAMES)}")
        if self.num_prompts < 1:
            raise BenchmarkError(f"--num-prompts must be >= 1, got {self.num_prompts}")
        if not 0.0 <= self.random_range_ratio < 1.0:
            raise BenchmarkError(f"--random-range-ratio must be in [0, 1), got {self.random_range_ratio}")
        for flag, value in self._lengths().items():
            if value is not None and value < 1:
                raise BenchmarkError(f"--{flag} must be >= 1, got {value}")
        if self.name != "random":
            self._check_path()

    def _lengths(self) -> dict[str, int | None]:
        return {
            "random-input-len": self.random_input_len,
            "random-output-len": self.random_output_len,
            "sharegpt-output-len": self.sharegpt_output_len,
            "text-output-len": self.text_output_len,
            "long-input-len": self.long_input_len,
            "long-output-len": self.long_output_len,
        }

    def _check_path(self) -> None:
        if self.path is None:
            raise BenchmarkError(f"--dataset-name {self.name} needs --dataset-path")
        if not Path(self.path).is_file():
            raise BenchmarkError(f"--dataset-path {self.path} is not a file")


def load_tokenizer(tokenizer: str | None, model: str | None) -> PreTrainedTokenizerBase | None:
    """Load the tokenizer from `--tokenizer`, else from `--model` when it names a local model: a directory, a
    .gguf file or an embedded model name such as smollm2-135m-instruct (resolved as every command's --model).

    Only local models are accepted: the benchmark never downloads from a model hub.
    """
    if tokenizer is not None:
        directory = local_model_dir(tokenizer)
        if directory is None:
            raise BenchmarkError(f"--tokenizer {tokenizer} is not a local directory, .gguf file or embedded model")
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    directory = local_model_dir(model) if model is not None else None
    return AutoTokenizer.from_pretrained(directory, local_files_only=True) if directory else None


def local_model_dir(model: str) -> Path | None:
    from common.default_model import DEFAULT_MODEL, TINY_RANDOM_MODEL
    from common.loader import CheckpointError, resolve_model_path

    if model not in (DEFAULT_MODEL, TINY_RANDOM_MODEL) and not Path(model).is_dir() and \
            not (model.endswith(".gguf") and Path(model).is_file()):
        return None
    try:
        return resolve_model_path(model)
    except CheckpointError as error:
        raise BenchmarkError(str(error)) from None


def sample_requests(config: DatasetConfig, tokenizer: PreTrainedTokenizerBase | None) -> list[SampleRequest]:
    """Build `config.num_prompts` requests from the configured dataset, deterministically from `config.seed`."""
    if tokenizer is None and config.name in NEEDS_TOKENIZER:
        raise BenchmarkError(
            f"--dataset-name {config.name} needs a tokenizer: pass --tokenizer DIR "
            "(or --model DIR when the model name is a local directory; without either, the server's model "
            "directory from /v1/models is used when it is readable here)"
        )
    rng = np.random.default_rng(config.seed)
    samplers: dict[str, Callable[..., list[SampleRequest]]] = {
        "random": sample_random,
        "sharegpt": sample_sharegpt,
        "text": sample_text,
        "long": sample_long,
    }
    return samplers[config.name](config, tokenizer, rng)


def count_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    return len(encode(tokenizer, text))


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # verbose=False: whole files are encoded on purpose, longer than the model's context.
    return tokenizer.encode(text, add_special_tokens=False, verbose=False)


# --------------------------------------------------------------------------------------------- random


def sample_random(
    config: DatasetConfig, tokenizer: PreTrainedTokenizerBase, rng: np.random.Generator
) -> list[SampleRequest]:
    n = config.num_prompts
    input_lens = uniform_lengths(config.random_input_len, config.random_range_ratio, n, rng)
    output_lens = uniform_lengths(config.random_output_len, config.random_range_ratio, n, rng)
    vocab = self_contained_token_ids(tokenizer)

    def draw(count: int) -> list[int]:
        return rng.choice(vocab, size=count).tolist()

    samples = []
    for input_len, output_len in zip(input_lens, output_lens):
        text, ids = decode_to_exact_length(tokenizer, draw(input_len), input_len, extend=draw)
        samples.append(SampleRequest(text, input_len, output_len, ids))
    return samples


def uniform_lengths(mean: int, range_ratio: float, count: int, rng: np.random.Generator) -> list[int]:
    """Lengths drawn uniformly from [mean * (1 - ratio), mean * (1 + ratio)], never below 1."""
    low = max(1, math.floor(mean * (1.0 - range_ratio)))
    high = max(low, math.ceil(mean * (1.0 + range_ratio)))
    return rng.integers(low, high + 1, size=count).tolist()


def self_contained_token_ids(tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """Ids of non-special tokens that survive decode -> encode alone and repeated.

    Sampling from these (rather than the whole vocabulary, as vLLM does) keeps random prompts stable under
    re-encoding: byte-fallback pieces and word fragments would merge or split and change the token count.
    """
    special = set(tokenizer.all_special_ids)
    candidates = [i for i in range(len(tokenizer)) if i not in special]
    singles = tokenizer.batch_decode([[i] for i in candidates])
    doubles = tokenizer.batch_decode([[i, i] for i in candidates])
    singles_ids = tokenizer(singles, add_special_tokens=False).input_ids
    doubles_ids = tokenizer(doubles, add_special_tokens=False).input_ids
    kept = [
        token
        for token, one, two in zip(candidates, singles_ids, doubles_ids)
        if one == [token] and two == [token, token]
    ]
    if not kept:
        raise BenchmarkError("the tokenizer has no token that re-encodes to itself; cannot build random prompts")
    return np.asarray(kept)


def decode_to_exact_length(
    tokenizer: PreTrainedTokenizerBase,
    token_ids: Sequence[int],
    target_len: int,
    extend: Callable[[int], list[int]],
) -> tuple[str, list[int]]:
    """Decode `token_ids` to text whose re-encoding has exactly `target_len` tokens.

    Decoding and re-encoding can merge or split tokens; each round trims the surplus or appends
    `extend(missing)` more tokens. Returns the text and its re-encoded ids.
    """
    ids = list(token_ids)
    for _ in range(MAX_LENGTH_FIX_TRIES):
        text = tokenizer.decode(ids)
        encoded = encode(tokenizer, text)
        if len(encoded) == target_len:
            return text, encoded
        if len(encoded) > target_len:
            # Trim whole characters: cutting tokens can split a multi-byte character, which decodes to U+FFFD
            # and re-encodes longer again.
            encoded = encode(tokenizer, longest_prefix_within(tokenizer, text, target_len))
        ids = encoded + extend(target_len - len(encoded))
    raise BenchmarkError(
        f"could not build a prompt that re-encodes to exactly {target_len} tokens "
        f"after {MAX_LENGTH_FIX_TRIES} tries"
    )


def longest_prefix_within(tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int) -> str:
    """The longest prefix of `text` (found by bisection on characters) encoding to at most `max_tokens`."""
    low, high = 0, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        if count_tokens(tokenizer, text[:middle]) <= max_tokens:
            low = middle
        else:
            high = middle - 1
    return text[:low]


# ------------------------------------------------------------------------------------------- sharegpt


def sample_sharegpt(
    config: DatasetConfig, tokenizer: PreTrainedTokenizerBase, rng: np.random.Generator
) -> list[SampleRequest]:
    pairs = _sharegpt_pairs(Path(config.path))
    samples: list[SampleRequest] = []
    for index in rng.permutation(len(pairs)):
        if len(samples) == config.num_prompts:
            break
        prompt, completion = pairs[index]
        sample = _sharegpt_sample(tokenizer, prompt, completion, config.sharegpt_output_len)
        if sample is not None:
            samples.append(sample)
    return _fill_by_resampling(samples, config.num_prompts, rng, source=str(config.path))


def _sharegpt_pairs(path: Path) -> list[tuple[str, str]]:
    """(first turn, second turn) of every conversation with at least two turns."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BenchmarkError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(entries, list):
        raise BenchmarkError(f"{path} must hold a JSON list of ShareGPT conversations")
    pairs = []
    for entry in entries:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if isinstance(turns, list) and len(turns) >= 2:
            pairs.append((str(turns[0].get("value", "")), str(turns[1].get("value", ""))))
    return pairs


def _sharegpt_sample(
    tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str, fixed_output_len: int | None
) -> SampleRequest | None:
    """The request for one conversation, or None when vLLM's length filter drops it."""
    prompt_ids = encode(tokenizer, prompt)
    output_len = fixed_output_len if fixed_output_len is not None else count_tokens(tokenizer, completion)
    if not is_valid_sharegpt_pair(len(prompt_ids), output_len, check_output_len=fixed_output_len is None):
        return None
    return SampleRequest(prompt, len(prompt_ids), output_len, prompt_ids)


def is_valid_sharegpt_pair(prompt_len: int, output_len: int, check_output_len: bool = True) -> bool:
    """vLLM's ShareGPT filter; the output length is not checked when it is fixed by a flag."""
    if prompt_len < SHAREGPT_MIN_TOKENS:
        return False
    if check_output_len and output_len < SHAREGPT_MIN_TOKENS:
        return False
    return prompt_len <= SHAREGPT_MAX_PROMPT_TOKENS and prompt_len + output_len <= SHAREGPT_MAX_TOTAL_TOKENS


def _fill_by_resampling(
    samples: list[SampleRequest], wanted: int, rng: np.random.Generator, source: str
) -> list[SampleRequest]:
    """Top up to `wanted` requests by drawing again from `samples` (vLLM's oversampling)."""
    if not samples:
        raise BenchmarkError(f"{source} has no usable prompt")
    missing = wanted - len(samples)
    if missing > 0:
        logger.warning("%s has only %d usable prompts; re-using some to reach %d", source, len(samples), wanted)
        samples = samples + [samples[i] for i in rng.integers(0, len(samples), size=missing)]
    return samples


# ----------------------------------------------------------------------------------------------- text


def sample_text(
    config: DatasetConfig, tokenizer: PreTrainedTokenizerBase | None, rng: np.random.Generator
) -> list[SampleRequest]:
    """The file's non-blank lines in order, cycled when there are fewer lines than prompts."""
    lines = [line.strip() for line in Path(config.path).read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line]
    if not prompts:
        raise BenchmarkError(f"{config.path} has no non-blank line")
    if len(prompts) < config.num_prompts:
        logger.warning("%s has %d prompts; cycling to reach %d", config.path, len(prompts), config.num_prompts)
    samples = []
    for i in range(config.num_prompts):
        prompt = prompts[i % len(prompts)]
        ids = encode(tokenizer, prompt) if tokenizer is not None else None
        samples.append(SampleRequest(prompt, len(ids) if ids is not None else None, config.text_output_len, ids))
    return samples


# ----------------------------------------------------------------------------------------------- long


def sample_long(
    config: DatasetConfig, tokenizer: PreTrainedTokenizerBase, rng: np.random.Generator
) -> list[SampleRequest]:
    """Windows of exactly `long_input_len` tokens starting at random places in the file."""
    source = encode(tokenizer, Path(config.path).read_text(encoding="utf-8"))
    target = config.long_input_len
    # Room after the window so re-encoding that shortens the window can be topped up from the text.
    slack = max(16, target // 8)
    if len(source) < target + slack:
        raise BenchmarkError(
            f"{config.path} has {len(source)} tokens, too few for --long-input-len {target} "
            f"(needs {target + slack})"
        )
    samples = []
    for start in rng.integers(0, len(source) - target - slack + 1, size=config.num_prompts).tolist():
        extend = _tokens_after(source, start + target)
        text, ids = decode_to_exact_length(tokenizer, source[start : start + target], target, extend)
        samples.append(SampleRequest(text, target, config.long_output_len, ids))
    return samples


def _tokens_after(source: list[int], position: int) -> Callable[[int], list[int]]:
    """An `extend` callback handing out, in order, the source tokens that follow `position`."""
    next_position = position

    def take(count: int) -> list[int]:
        nonlocal next_position
        taken = source[next_position : next_position + count]
        next_position += len(taken)
        return taken

    return take
