"""Records passed between the hack-bench stages: dataset -> client -> metrics."""

from dataclasses import dataclass, field


class BenchmarkError(RuntimeError):
    """A benchmark cannot run as configured (bad input, unreachable server, unusable tokenizer)."""


@dataclass(frozen=True)
class SampleRequest:
    """One prompt to send.

    `prompt_len` counts tokens without special tokens (the server may add BOS); it is None when no tokenizer
    was given, and is then taken from the server's `usage.prompt_tokens`.
    """

    prompt: str
    prompt_len: int | None
    expected_output_len: int
    prompt_token_ids: list[int] | None = None


@dataclass
class RequestOutput:
    """What the client observed for one request. Times are in seconds.

    `ttft` is measured to the first chunk that carries content, `itl` holds the gaps between later content
    chunks, and `latency` runs to the last content chunk (vLLM's definitions). `start_time` is relative to the
    start of the benchmark. `output_tokens` is the server's `usage.completion_tokens` when it sent one.
    """

    success: bool = False
    generated_text: str = ""
    prompt_len: int | None = None
    output_tokens: int | None = None
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    start_time: float = 0.0
    error: str = ""
