"""The OpenAI serving logic: HTTP requests in, completions out (routes stay thin, see app.py).

Life cycle of one request:
  1. validate (protocol.py), check the model name, build the prompt ids (chat template for chat),
     check prompt + max_tokens against the context window;
  2. `Orchestrator.generate` runs it on a decode and a prefill instance and yields token ids (with n > 1 the
     choices share one prefill and one KV push; their tokens come interleaved, tagged with their choice);
  3. `_text_outputs` turns them into text, each choice on its own: incremental detokenization, stop strings (a
     match stops that choice, which cancels it on the decode instance; the last one closes the token stream),
     metrics;
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
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from pydantic import BaseModel
from transformers import PreTrainedTokenizerBase

from common.structured import GrammarError, check_schema, schema_text
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
    ChatLogprobs,
    ChatStreamChoice,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    DetokenizeRequest,
    DetokenizeResponse,
    FinishReason,
    GenerationParams,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TokenLogprob,
    TopLogprob,
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
class ScoredToken:
    """A token of the output (or the echoed prompt) with its logprobs, when the client asked for them."""

    token_id: int
    logprobs: hack_pb2.TokenLogprobs | None  # None: the first prompt token (no context to score it)


@dataclass(frozen=True)
class TextOutput:
    index: int  # the choice
    text: str  # new text since the previous output of this choice
    finish_reason: FinishReason | None
    num_tokens: int  # completion tokens of this choice so far
    tokens: tuple[ScoredToken, ...] = ()  # tokens since the previous output, when logprobs were asked for


@dataclass(frozen=True)
class _Choice:
    """One of the request's n sequences and how its output is shaped."""

    index: int
    generation: GenerationRequest
    stop_strings: list[str]
    include_stop: bool
    min_tokens: int
    want_logprobs: bool
    echo_text: str = ""  # completions' echo: the prompt text, sent before the output
    discard_output: bool = False  # max_tokens 0: score the prompt, generate nothing


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
        self._logged_ignored: set[str] = set()

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self._config.model_name, root=self._config.model,
                                         max_model_len=self._model_info.max_model_len)])

    def note_ignored_fields(self, fields: list[str]) -> None:
        """Log each unknown request field the first time a request sends it."""
        new = [name for name in fields if name not in self._logged_ignored]
        if new:
            self._logged_ignored.update(new)
            logger.warning("requests carry fields this server does not know; they are ignored: %s", ", ".join(new))

    # ------------------------------------------------------------ tokenizer endpoints

    def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        self._check_model(request.model)
        if request.messages is not None:
            ids = encode_chat_prompt(self._tokenizer, [{"role": m.role, "content": m.text()} for m in request.messages])
        else:
            ids = self._tokenizer(request.prompt, add_special_tokens=request.add_special_tokens).input_ids
        strs = self._tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self._model_info.max_model_len, tokens=ids,
                                token_strs=strs)

    def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self._check_model(request.model)
        bad = [token for token in request.tokens if token >= self._model_info.vocab_size]
        if bad:
            raise invalid_request(f"token ids {bad[:8]} are outside the vocabulary "
                                  f"[0, {self._model_info.vocab_size})", "tokens")
        return DetokenizeResponse(prompt=self._tokenizer.decode(request.tokens))

    # ------------------------------------------------------------ completions

    async def completion(self, request: CompletionRequest) -> CompletionResponse | AsyncIterator[str]:
        arrival = time.perf_counter()
        request_id, choices = self._prepare("cmpl", request, lambda: encode_completion_prompt(
            self._tokenizer, request.prompt, self._model_info.vocab_size))
        prompt_ids, created = choices[0].generation.prompt_ids, int(time.time())
        if request.echo:
            echo_text = request.prompt if isinstance(request.prompt, str) else self._tokenizer.decode(prompt_ids)
            choices = [replace(choice, echo_text=echo_text) for choice in choices]
        outputs = self._outputs(choices, arrival)
        top_k = request.top_logprobs_count()

        def response(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> CompletionResponse:
            return CompletionResponse(id=request_id, created=created, model=request.model,
                                      choices=choices, usage=usage)

        def render_logprobs(tokens: Sequence[ScoredToken], offset: int) -> CompletionLogprobs | None:
            return None if top_k is None else self._completion_logprobs(tokens, top_k, offset)

        if not request.stream:
            collected = await _collect(outputs, len(choices))
            return response(
                [CompletionChoice(index=c.index, text=c.text, finish_reason=c.finish_reason,
                                  logprobs=render_logprobs(c.tokens, 0)) for c in collected],
                UsageInfo.of(len(prompt_ids), sum(c.num_tokens for c in collected)))
        offsets = [0] * len(choices)

        def render(output: TextOutput, usage: UsageInfo | None) -> CompletionResponse:
            logprobs = render_logprobs(output.tokens, offsets[output.index])
            offsets[output.index] += len(output.text)
            return response([CompletionChoice(index=output.index, text=output.text, logprobs=logprobs,
                                              finish_reason=output.finish_reason)], usage)

        return await _event_stream(outputs, render, len(prompt_ids), request,
                                   usage=lambda usage: response([], usage))

    def _completion_logprobs(self, tokens: Sequence[ScoredToken], top_k: int, offset: int) -> CompletionLogprobs:
        """The legacy shape; as vLLM, the top dict holds the k most likely tokens plus the chosen one."""
        result = CompletionLogprobs()
        for token in tokens:
            text = self._token_str(token.token_id)
            result.tokens.append(text)
            result.text_offset.append(offset)
            offset += len(text)
            if token.logprobs is None:
                result.token_logprobs.append(None)
                result.top_logprobs.append(None)
                continue
            result.token_logprobs.append(token.logprobs.logprob)
            top = {self._token_str(t): lp for t, lp in zip(token.logprobs.top_token_ids[:top_k],
                                                            token.logprobs.top_logprobs[:top_k])}
            top.setdefault(text, token.logprobs.logprob)
            result.top_logprobs.append(top)
        return result

    # ------------------------------------------------------------ chat completions

    async def chat_completion(self, request: ChatCompletionRequest) -> ChatCompletionResponse | AsyncIterator[str]:
        arrival = time.perf_counter()
        request_id, choices = self._prepare("chatcmpl", request, lambda: encode_chat_prompt(
            self._tokenizer, self._checked_messages(request)))
        prompt_len, created = len(choices[0].generation.prompt_ids), int(time.time())
        outputs = self._outputs(choices, arrival)
        top_k = request.top_logprobs_count()

        def render_logprobs(tokens: Sequence[ScoredToken]) -> ChatLogprobs | None:
            return None if top_k is None else ChatLogprobs(content=[self._chat_logprob(t, top_k) for t in tokens])

        if not request.stream:
            collected = await _collect(outputs, len(choices))
            return ChatCompletionResponse(
                id=request_id, created=created, model=request.model,
                choices=[ChatChoice(index=c.index, message=AssistantMessage(content=c.text),
                                    logprobs=render_logprobs(c.tokens), finish_reason=c.finish_reason)
                         for c in collected],
                usage=UsageInfo.of(prompt_len, sum(c.num_tokens for c in collected)))

        def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=request_id, created=created, model=request.model,
                                       choices=choices, usage=usage)

        def render(output: TextOutput, usage: UsageInfo | None) -> ChatCompletionChunk:
            return chunk([ChatStreamChoice(index=output.index, delta=DeltaMessage(content=output.text or None),
                                           logprobs=render_logprobs(output.tokens),
                                           finish_reason=output.finish_reason)], usage)

        preamble = [chunk([ChatStreamChoice(index=c.index, delta=DeltaMessage(role="assistant", content=""))],
                          UsageInfo.of(prompt_len, 0) if request.include_usage and request.continuous_usage
                          else None) for c in choices]
        return await _event_stream(outputs, render, prompt_len, request, usage=lambda usage: chunk([], usage),
                                   preamble=preamble)

    def _chat_logprob(self, token: ScoredToken, top_k: int) -> TokenLogprob:
        assert token.logprobs is not None  # chat never echoes the prompt
        text = self._token_str(token.token_id)
        top = [TopLogprob(token=self._token_str(t), logprob=lp, bytes=list(self._token_str(t).encode()))
               for t, lp in zip(token.logprobs.top_token_ids[:top_k], token.logprobs.top_logprobs[:top_k])]
        return TokenLogprob(token=text, logprob=token.logprobs.logprob, bytes=list(text.encode()), top_logprobs=top)

    def _token_str(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id])

    # ------------------------------------------------------------ request building

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self._config.model_name:
            raise RouterError(f"The model `{model}` does not exist.", status=404, param="model",
                              code="model_not_found")

    def _prepare(
        self, id_prefix: str, request: GenerationParams, encode_prompt: Callable[[], list[int]]
    ) -> tuple[str, list[_Choice]]:
        """Check the request against the model and build what the instances need (a 4xx when it does not fit):
        the response id and how each choice's output is shaped. The n choices run as one generation (one
        prefill), choice i seeded with seed + i on the instances (as vLLM's parallel sampling)."""
        try:
            self._check_model(request.model)
            self.note_ignored_fields(request.ignored_fields)
            request_id = f"{id_prefix}-{uuid.uuid4().hex}"
            generation = self._generation_request(request_id, request, encode_prompt())
        except RouterError:
            self._metrics.requests.labels("invalid").inc()
            raise
        return request_id, [_Choice(index, generation, request.stop_strings, request.include_stop_str_in_output,
                                    request.min_tokens, request.top_logprobs_count() is not None,
                                    discard_output=request.scores_prompt_only) for index in range(request.n)]

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
        if request.scores_prompt_only:  # one token is generated and dropped
            requested = 1
        elif requested == 0:
            raise invalid_request("max_tokens must be at least 1 (0 only scores the prompt, with `echo`)",
                                  "max_tokens")
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
        bias = {int(token): value for token, value in (request.logit_bias or {}).items()}
        bad = [token for token in [*bias, *(request.stop_token_ids or ())] if not 0 <= token < vocab_size]
        if bad:
            raise invalid_request(f"token ids {bad[:8]} are outside the vocabulary [0, {vocab_size})",
                                  "logit_bias" if bad[0] in bias else "stop_token_ids")
        json_schema = self._json_schema(request)
        stop_ids = set(request.stop_token_ids or ())
        if not request.ignore_eos:
            stop_ids |= set(self._model_info.eos_token_ids)
        sampling = hack_pb2.SamplingParams(
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            top_k=min(max(request.top_k or 0, 0), vocab_size),  # a k past the vocabulary keeps every token
            seed=request.seed,
            presence_penalty=request.presence_penalty or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0,
            repetition_penalty=request.repetition_penalty or 1.0,
            logit_bias=bias,
            min_tokens=min(request.min_tokens, max_tokens),
            logprobs=request.top_logprobs_count(),
            json_schema=json_schema,
        )
        return GenerationRequest(
            request_id=request_id,
            prompt_ids=tuple(prompt_ids),
            sampling=sampling,
            stop_token_ids=tuple(sorted(stop_ids)),
            max_tokens=max_tokens,
            kv_mode=kv_mode_to_proto(request.kv_mode or self._config.kv_mode),
            prompt_logprobs=request.prompt_logprobs_count(),
            n=request.n,
        )

    @staticmethod
    def _json_schema(request: GenerationParams) -> str | None:
        """The JSON schema the output must match (response_format), checked here so a bad one is a 400."""
        response_format = request.response_format
        if response_format is None or response_format.type == "text":
            return None
        schema = schema_text(response_format.json_schema.schema_ if response_format.type == "json_schema" else None)
        try:
            check_schema(schema)
        except GrammarError as error:
            raise invalid_request(str(error), "response_format") from None
        return schema

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

    async def _outputs(self, choices: list[_Choice], arrival: float) -> AsyncIterator[TextOutput]:
        """Text deltas of every choice as they come; each choice's last one carries its finish reason. Counts
        the request's outcome."""
        generation = choices[0].generation  # one generation for all n choices
        texts = [_ChoiceText(self._tokenizer, choice, _LatencyRecorder(self._metrics, arrival)) for choice in choices]
        self._metrics.prompt_tokens.inc(len(generation.prompt_ids))
        prompt_scores: list[ScoredToken] = []

        def on_prefill(reply: hack_pb2.PrefillResponse) -> None:
            if len(reply.prompt_logprobs) != len(generation.prompt_ids) - 1:
                raise RouterError(f"the prefill returned {len(reply.prompt_logprobs)} prompt logprobs for "
                                  f"{len(generation.prompt_ids)} prompt tokens", status=502, code="protocol_error")
            prompt_scores.extend(ScoredToken(token, lp) for token, lp in
                                 zip(generation.prompt_ids, [None, *reply.prompt_logprobs]))

        status = "cancelled"
        stopped: set[int] = set()  # choices that finished here: the orchestrator cancels them on D
        try:
            tokens = self._orchestrator.generate(
                generation, on_prefill if generation.prompt_logprobs is not None else None, stopped)
            async with contextlib.aclosing(tokens):
                async for token in tokens:
                    output = texts[token.choice].feed(token, prompt_scores)
                    if output is None:
                        continue
                    if output.finish_reason is not None:
                        stopped.add(token.choice)
                        self._metrics.generation_tokens.inc(output.num_tokens)
                    yield output
                    if len(stopped) == len(choices):
                        status = "success"
                        return  # leaving `aclosing` cancels the request on D when a stop string ended it
        except RouterError as error:
            status = "invalid" if error.status < 500 else "failed"
            raise
        finally:
            self._metrics.requests.labels(status).inc()


class _ChoiceText:
    """One choice's tokens to text: incremental detokenization, stop strings, echo, logprobs, latency."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, choice: _Choice, latency: "_LatencyRecorder") -> None:
        self.choice, self.latency = choice, latency
        self.detokenizer = IncrementalDetokenizer(tokenizer, choice.generation.prompt_ids)
        self.stops = StopStringMatcher(choice.stop_strings, choice.include_stop)
        self.num_tokens = 0

    def feed(self, token: hack_pb2.GeneratedToken, prompt_scores: list[ScoredToken]) -> TextOutput | None:
        """The text delta of one more token (None when it adds nothing); its finish reason when it ends the choice."""
        choice, stops = self.choice, self.stops
        self.num_tokens += 1
        self.latency.token_arrived()
        finish = _FINISH_REASONS.get(token.finish_reason, "stop")  # a reason added to the proto later
        if choice.discard_output:  # max_tokens 0: only the echoed prompt is the output
            finish, self.num_tokens = "length", 0
            scored: list[ScoredToken] = []
            text = ""
        else:
            scored = [ScoredToken(token.token_id, token.logprobs)] if choice.want_logprobs else []
            text = stops.feed(_token_text(self.detokenizer, token.token_id, finish),
                              check=self.num_tokens > choice.min_tokens)
        if stops.stopped:
            finish = "stop"
        elif finish is not None:
            text += stops.flush()
        if self.num_tokens <= 1 and choice.echo_text:
            text = choice.echo_text + text
            scored = prompt_scores + scored if choice.want_logprobs else scored
        if finish is not None:
            self.latency.finished()
        if text or scored or finish is not None:
            return TextOutput(choice.index, text, finish, self.num_tokens, tuple(scored))
        return None


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


@dataclass
class _Collected:
    index: int
    text: str = ""
    finish_reason: FinishReason = "stop"
    num_tokens: int = 0
    tokens: list[ScoredToken] = field(default_factory=list)


async def _collect(outputs: AsyncIterator[TextOutput], n: int) -> list[_Collected]:
    collected = [_Collected(index) for index in range(n)]
    parts: list[list[str]] = [[] for _ in range(n)]
    async with contextlib.aclosing(outputs):
        async for output in outputs:
            choice = collected[output.index]
            parts[output.index].append(output.text)
            choice.tokens.extend(output.tokens)
            choice.num_tokens = output.num_tokens
            if output.finish_reason is not None:
                choice.finish_reason = output.finish_reason
    for choice, texts in zip(collected, parts):
        choice.text = "".join(texts)
    return collected


async def _event_stream(
    outputs: AsyncIterator[TextOutput],
    render: Callable[[TextOutput, UsageInfo | None], BaseModel],
    prompt_len: int,
    request: GenerationParams,
    usage: Callable[[UsageInfo], BaseModel],
    preamble: Sequence[BaseModel] = (),
) -> AsyncIterator[str]:
    """Start the request, then return its SSE body. Errors before the first output raise (an HTTP error).

    `render` makes the chunk of one output (with the usage so far under continuous_usage_stats), `usage` the
    final usage chunk (with include_usage).
    """
    first = await anext(outputs)
    continuous = request.include_usage and request.continuous_usage
    tokens_per_choice: dict[int, int] = {}

    def usage_now(output: TextOutput) -> UsageInfo:
        tokens_per_choice[output.index] = output.num_tokens
        return UsageInfo.of(prompt_len, sum(tokens_per_choice.values()))

    async def events() -> AsyncIterator[str]:
        try:
            async with contextlib.aclosing(outputs):
                for chunk in preamble:
                    yield _sse(chunk)
                output = first
                while True:
                    counted = usage_now(output)
                    yield _sse(render(output, counted if continuous else None))
                    output = await anext(outputs, None)
                    if output is None:
                        break
            if request.include_usage:
                yield _sse(usage(counted))
        except RouterError as error:
            logger.warning("stream failed after it started: %s", error.message)
            yield f"data: {json.dumps(error.to_dict())}\n\n"
        yield "data: [DONE]\n\n"

    return events()


def _sse(chunk: BaseModel) -> str:
    payload = chunk.model_dump(mode="json")
    # As OpenAI streams: usage only where set, chat deltas without empty fields.
    if payload.get("usage", ...) is None:
        del payload["usage"]
    for choice in payload.get("choices", []):
        if "delta" in choice:
            choice["delta"] = {key: value for key, value in choice["delta"].items() if value is not None}
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
