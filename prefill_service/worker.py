"""The prefill service's model side: one batched prompt forward whose KV leaves layer by layer.

`LayerExporter` sits between the model and the paged backend: right after a layer's attention stored that
layer's K/V, it exports and encodes it (common/kv/wire.py chunks) for every sequence of the batch and hands the
chunks to a callback, so the KV sender streams layer l while layer l + 1 computes. Runs on the model thread.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from common.kv.backends import PagedKVBackend
from common.kv.interface import ForwardBatch, KVBackend
from common.kv.wire import encode_layer
from common.loader import LoadedModel
from common.sampling import Sampler, SamplingParams, TokenHistory, TokenLogprobs, choice_params
from common.structured import GrammarCompiler, mask_logits

LayerCallback = Callable[[int, int, list[bytes]], None]  # (seq_id, layer, that layer's wire chunks)


class LayerExporter(KVBackend):
    def __init__(self, backend: PagedKVBackend, on_layer: LayerCallback) -> None:
        self.backend, self.on_layer = backend, on_layer

    def reserve(self, batch: ForwardBatch) -> None:
        self.backend.reserve(batch)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               batch: ForwardBatch) -> torch.Tensor:
        out = self.backend.attend(layer, q, k, v, batch)
        for seq_id in batch.seq_ids:
            self.on_layer(seq_id, layer, encode_layer(self.backend.layout, layer,
                                                      self.backend.export_layer(seq_id, layer)))
        return out

    def free(self, seq_id: int) -> None:
        self.backend.free(seq_id)

    def num_tokens(self, seq_id: int) -> int:
        return self.backend.num_tokens(seq_id)


@dataclass(frozen=True)
class PrefillOutput:
    first_tokens: tuple[int, ...]  # one per choice (n > 1: choice i sampled with seed + i)
    first_logprobs: tuple[TokenLogprobs | None, ...]  # per choice; None where the request asked for none
    prompt_logprobs: list[TokenLogprobs] | None  # prompt tokens 1.. (when asked for), for echo / scoring

    @property
    def first_token(self) -> int:
        return self.first_tokens[0]


class PrefillWorker:
    def __init__(self, loaded: LoadedModel, backend: PagedKVBackend) -> None:
        self.loaded, self.backend = loaded, backend
        self.device = next(loaded.model.parameters()).device
        self.sampler = Sampler()
        self.grammars = GrammarCompiler(loaded.tokenizer, loaded.config.vocab_size)

    def run(self, seq_ids: list[int], prompts: list[list[int]], params: list[SamplingParams],
            on_layer: LayerCallback, prompt_logprobs: list[int | None] | None = None,
            choices: list[int] | None = None) -> list[PrefillOutput]:
        """Prefill the prompts together, stream their KV through on_layer, return each one's first token per
        choice (choices[i] of them for prompt i, from its last position's logits) and the logprobs asked for.
        The pool holds the prompts only for the duration of the call."""
        prompt_logprobs = prompt_logprobs or [None] * len(prompts)
        choices = choices or [1] * len(prompts)
        batch = ForwardBatch.build(seq_ids, [0] * len(seq_ids), [len(p) for p in prompts], self.device)
        exporter = LayerExporter(self.backend, on_layer)
        want_all = any(k is not None for k in prompt_logprobs)
        try:
            exporter.reserve(batch)
            tokens = torch.tensor([t for prompt in prompts for t in prompt], device=self.device)
            logits = self.loaded.model(tokens, batch, exporter, logits="all" if want_all else "last")
            last = logits[batch.cu_new[1:] - 1] if want_all else logits
            last = last.repeat_interleave(torch.tensor(choices, device=last.device), dim=0)  # a row per choice
            rows = [p for prompt_params, n in zip(params, choices) for p in choice_params(prompt_params, n)]
            last = mask_logits(last, [self.grammars.matcher(p.json_schema) if p.json_schema is not None else None
                                      for p in rows])
            histories = [TokenHistory(prompt, ()) for prompt, n in zip(prompts, choices) for _ in range(n)]
            sampled = self.sampler.run(last, rows, [0] * len(rows), histories)
            scored = [None if k is None else score_prompt(logits[batch.rows(i)], prompts[i], k)
                      for i, k in enumerate(prompt_logprobs)]
            starts = [sum(choices[:i]) for i in range(len(choices))]
            return [PrefillOutput(tuple(sampled.tokens[start:start + n]), tuple(sampled.logprobs[start:start + n]),
                                  prompt_lp) for start, n, prompt_lp in zip(starts, choices, scored)]
        finally:
            for seq_id in seq_ids:
                self.backend.free(seq_id)


def score_prompt(logits: torch.Tensor, prompt: list[int], k: int) -> list[TokenLogprobs]:
    """Logprob of each prompt token after the first given what precedes it, with the top k at each position."""
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
    targets = torch.tensor(prompt[1:], device=logits.device)[:, None]
    parts = [logprobs.gather(1, targets).double()]
    if k:
        top = logprobs.topk(k, dim=-1)
        parts += [top.indices.double(), top.values.double()]
    rows = torch.cat(parts, dim=1).cpu().tolist()  # one transfer
    return [TokenLogprobs(row[0], tuple(int(t) for t in row[1:1 + k]), tuple(row[1 + k:])) for row in rows]
