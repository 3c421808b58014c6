"""The OpenAI serving logic: HTTP requests in, completions out (routes stay thin, see app.py).

Life cycle of one request:
  1. validate (protocol.py), check the model name, build the prompt ids (chat template for chat),
     check prompt + max_tokens against the context window;
  2. `Orchestrator.generate` runs it on a decode and a prefill instance and yields token ids;
  3. `_text_outputs` turns them into text: incremental detokenization, stop strings (a match closes the token
     stream, which cancels the request on the decode instance), metrics;
  4. non-streaming: collect into one response; streaming: wait for the first output before answering, so a
     request that fails before producing anything gets a proper HTTP error, then send SSE chunks. A failure
     after that ends the stream with an error event, then `[DONE]`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from pydantic import BaseModel
from transformers import PreTrainedTokenizerBase

from proto import hack_pb2, kv_mode_to_proto
from router.config import RouterConfig
from router.detokenizer import IncrementalDetokenizer, StopStringMatcher
from router.errors import RouterError, invalid_request
from router.metrics import RouterMetrics
from router.orchestrator import GenerationRequest, Orchestrator
from router.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatStreamChoice,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    FinishReason,
    GenerationParams,
    ModelCard,
    ModelList,
    UsageInfo,
)
from router.tokenization import ModelInfo, encode_chat_prompt, encode_completion_prompt

logger = logging.getLogger(__name__)

_FINISH_REASONS: dict[int, FinishReason | None] = {
    hack_pb2.FINISH_REASON_NONE: None,
    hack_pb2.FINISH_REASON_STOP: "stop",
    hack_pb2.FINISH_REASON_LENGTH: "length",
}


@dataclass(frozen=True)
class TextOutput:
    text: str  # new text since the previous output
    finish_reason: FinishReason | None
    num_tokens: int  # completion tokens so far


class OpenAIServing:
    def __init__(
        self,
        config: RouterConfig,
        tokenizer: PreTrainedTokenizerBase,
        model_info: ModelInfo,
        orchestrator: Orchestrator,
        metrics: RouterMetrics,
    ) -> None:
        self._config = config
        self._tokenizer = tokenizer
        self._model_info = model_info
        self._orchestrator = orchestrator
        self._metrics = metrics

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self._config.model_name, max_model_len=self._model_info.max_model_len)])

    async def completion(self, request: CompletionRequest) -> CompletionResponse | AsyncIterator[str]:
        arrival = time.perf_counter()
        generation = self._prepare("cmpl", request, lambda: encode_completion_prompt(
            self._tokenizer, request.prompt, self._model_info.vocab_size))
        outputs = self._text_outputs(generation, request.stop_strings, arrival)
        prompt_len, created = len(generation.prompt_ids), int(time.time())

        def response(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> CompletionResponse:
            return CompletionResponse(id=generation.request_id, created=created, model=request.model,
                                      choices=choices, usage=usage)

        if not request.stream:
            text, finish, num_tokens = await _collect(outputs)
            return response([CompletionChoice(text=text, finish_reason=finish)], UsageInfo.of(prompt_len, num_tokens))
        return await _event_stream(
            outputs,
            render=lambda output: response([CompletionChoice(text=output.text, finish_reason=output.finish_reason)]),
            usage=(lambda n: response([], UsageInfo.of(prompt_len, n))) if request.include_usage else None,
        )

    async def chat_completion(self, request: ChatCompletionRequest) -> ChatCompletionResponse | AsyncIterator[str]:
        arrival = time.perf_counter()
        generation = self._prepare("chatcmpl", request, lambda: encode_chat_prompt(
            self._tokenizer, self._checked_messages(request)))
        outputs = self._text_outputs(generation, request.stop_strings, arrival)
        prompt_len, created = len(generation.prompt_ids), int(time.time())

        if not request.stream:
            text, finish, num_tokens = await _collect(outputs)
            choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=finish)
            return ChatCompletionResponse(id=generation.request_id, created=created, model=request.model,
                                          choices=[choice], usage=UsageInfo.of(prompt_len, num_tokens))

        def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=generation.request_id, created=created, model=request.model,
                                       choices=choices, usage=usage)

        return await _event_stream(
            outputs,
            render=lambda output: chunk([ChatStreamChoice(delta=DeltaMessage(content=output.text or None),
                                                          finish_reason=output.finish_reason)]),
            usage=(lambda n: chunk([], UsageInfo.of(prompt_len, n))) if request.include_usage else None,
            preamble=chunk([ChatStreamChoice(delta=DeltaMessage(role="assistant", content=""))]),
        )

    # ------------------------------------------------------------ request building

    def _prepare(
        self, id_prefix: str, request: GenerationParams, encode_prompt: Callable[[], list[int]]
    ) -> GenerationRequest:
        """Check the request against the model and build what the instances need (a 4xx when it does not fit)."""
        try:
            if request.model != self._config.model_name:
                raise RouterError(f"The model `{request.model}` does not exist.", status=404, param="model",
                                  code="model_not_found")
            return self._generation_request(f"{id_prefix}-{uuid.uuid4().hex}", request, encode_prompt())
        except RouterError:
            self._metrics.requests.labels("invalid").inc()
            raise

    def _checked_messages(self, request: ChatCompletionRequest) -> list[dict[str, str]]:
        if len(request.messages) > self._config.max_messages:
            raise invalid_request(f"{len(request.messages)} messages are more than this server's limit of "
                                  f"{self._config.max_messages}", "messages")
        return request.template_messages()

    def _generation_request(
        self, request_id: str, request: GenerationParams, prompt_ids: list[int]
    ) -> GenerationRequest:
        context, prompt_len = self._model_info.max_model_len, len(prompt_ids)
        self._check_limits(request, prompt_len)
        requested = request.requested_max_tokens()
        max_tokens = requested if requested is not None else context - prompt_len  # fill the window, like vLLM
        if requested is None and self._config.max_tokens_limit:
            max_tokens = min(max_tokens, self._config.max_tokens_limit)
        if max_tokens < 1 or prompt_len + max_tokens > context:
            completion_len = max(max_tokens, 1)
            raise invalid_request(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{prompt_len + completion_len} tokens ({prompt_len} in the prompt, {completion_len} for the "
                "completion). Shorten the prompt or lower max_tokens.",
                "max_tokens" if requested is not None else "prompt",
            )
        vocab_size = self._model_info.vocab_size
        stop_ids = set(request.stop_token_ids or ())
        if any(not 0 <= token < vocab_size for token in stop_ids):
            raise invalid_request(f"stop_token_ids must be token ids in [0, {vocab_size})", "stop_token_ids")
        if not request.ignore_eos:
            stop_ids |= set(self._model_info.eos_token_ids)
        sampling = hack_pb2.SamplingParams(
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            top_k=min(max(request.top_k or 0, 0), vocab_size),  # a k past the vocabulary keeps every token
            seed=request.seed,
        )
        return GenerationRequest(
            request_id=request_id,
            prompt_ids=tuple(prompt_ids),
            sampling=sampling,
            stop_token_ids=tuple(sorted(stop_ids)),
            max_tokens=max_tokens,
            kv_mode=kv_mode_to_proto(request.kv_mode or self._config.kv_mode),
        )

    def _check_limits(self, request: GenerationParams, prompt_len: int) -> None:
        """This deployment's limits on prompt tokens and max_tokens (0 = only the context window)."""
        limit = self._config.max_prompt_tokens
        if limit and prompt_len > limit:
            raise invalid_request(f"the prompt has {prompt_len} tokens, more than this server's limit of {limit}",
                                  "messages" if isinstance(request, ChatCompletionRequest) else "prompt")
        limit, requested = self._config.max_tokens_limit, request.requested_max_tokens()
        if limit and requested is not None and requested > limit:
            raise invalid_request(f"max_tokens {requested} is more than this server's limit of {limit}",
                                  "max_tokens")

    # ------------------------------------------------------------ tokens to text

    async def _text_outputs(
        self, generation: GenerationRequest, stop_strings: list[str], arrival: float
    ) -> AsyncIterator[TextOutput]:
        """Text deltas of the request; the last one carries the finish reason. Counts the request's outcome."""
        detokenizer = IncrementalDetokenizer(self._tokenizer, generation.prompt_ids)
        stops = StopStringMatcher(stop_strings)
        latency = _LatencyRecorder(self._metrics, arrival)
        self._metrics.prompt_tokens.inc(len(generation.prompt_ids))
        status = "cancelled"
        try:
            async with contextlib.aclosing(self._orchestrator.generate(generation)) as tokens:
                num_tokens = 0
                async for token in tokens:
                    num_tokens += 1
                    latency.token_arrived()
                    finish = _FINISH_REASONS.get(token.finish_reason, "stop")  # a reason added to the proto later
                    text = stops.feed(_token_text(detokenizer, token.token_id, finish))
                    if stops.stopped:
                        finish = "stop"
                    elif finish is not None:
                        text += stops.flush()
                    if finish is not None:
                        status = "success"
                        latency.finished()
                        self._metrics.generation_tokens.inc(num_tokens)
                    if text or finish is not None:
                        yield TextOutput(text, finish, num_tokens)
                    if finish is not None:
                        return  # leaving `aclosing` cancels the request on D when a stop string ended it
        except RouterError as error:
            status = "invalid" if error.status < 500 else "failed"
            raise
        finally:
            self._metrics.requests.labels(status).inc()


def _token_text(detokenizer: IncrementalDetokenizer, token_id: int, finish: FinishReason | None) -> str:
    if finish == "stop":  # a stop token: its text is not part of the output
        return detokenizer.flush()
    text = detokenizer.push(token_id)
    return text + detokenizer.flush() if finish is not None else text


class _LatencyRecorder:
    """TTFT, inter-token latency and end-to-end latency of one request."""

    def __init__(self, metrics: RouterMetrics, arrival: float) -> None:
        self._metrics = metrics
        self._arrival = arrival
        self._last: float | None = None

    def token_arrived(self) -> None:
        now = time.perf_counter()
        if self._last is None:
            self._metrics.ttft.observe(now - self._arrival)
        else:
            self._metrics.inter_token_latency.observe(now - self._last)
        self._last = now

    def finished(self) -> None:
        self._metrics.e2e_latency.observe(time.perf_counter() - self._arrival)


async def _collect(outputs: AsyncIterator[TextOutput]) -> tuple[str, FinishReason, int]:
    parts: list[str] = []
    last: TextOutput | None = None
    async for last in outputs:
        parts.append(last.text)
    assert last is not None and last.finish_reason is not None  # _text_outputs always ends with a finish
    return "".join(parts), last.finish_reason, last.num_tokens


async def _event_stream(
    outputs: AsyncIterator[TextOutput],
    render: Callable[[TextOutput], BaseModel],
    usage: Callable[[int], BaseModel] | None,
    preamble: BaseModel | None = None,
) -> AsyncIterator[str]:
    """Start the request, then return its SSE body. Errors before the first output raise (an HTTP error).

    `render` makes the chunk of one output, `usage` the final usage chunk from the completion token count.
    """
    first = await anext(outputs)

    async def events() -> AsyncIterator[str]:
        last = first
        try:
            async with contextlib.aclosing(outputs):
                if preamble is not None:
                    yield _sse(preamble)
                yield _sse(render(first))
                async for last in outputs:
                    yield _sse(render(last))
            if usage is not None:
                yield _sse(usage(last.num_tokens))
        except RouterError as error:
            logger.warning("stream failed after it started: %s", error.message)
            yield f"data: {json.dumps(error.to_dict())}\n\n"
        yield "data: [DONE]\n\n"

    return events()


def _sse(chunk: BaseModel) -> str:
    payload = chunk.model_dump(mode="json")
    # As OpenAI streams: usage only on the final usage chunk, chat deltas without empty fields.
    if payload.get("usage", ...) is None:
        del payload["usage"]
    for choice in payload.get("choices", []):
        if "delta" in choice:
            choice["delta"] = {key: value for key, value in choice["delta"].items() if value is not None}
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
