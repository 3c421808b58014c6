"""In-process generation: batched prefill of mixed-length prompts, then batched decode steps.

This is the single-process path (`python -m common.generate`, the accuracy tools, and the
ground truth the cluster tests compare against). The decode service runs the same model
forward with continuous batching across requests.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from common.kv.interface import ForwardBatch, KVBackend
from common.loader import LoadedModel
from common.sampling import Sampler, SamplingParams, TokenHistory
from common.sequence import Sequence, validate_prompt


@dataclass(frozen=True)
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str


class Engine:
    def __init__(self, loaded: LoadedModel, kv: KVBackend) -> None:
        self.loaded = loaded
        self.kv = kv
        self.device = next(loaded.model.parameters()).device
        self._ids = itertools.count()

    def encode(self, prompt: str) -> list[int]:
        return list(self.loaded.tokenizer.encode(prompt))

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Completion]:
        """Generate for all prompts together; each result equals what it would be alone."""
        config = self.loaded.config
        for prompt, p in zip(prompts, params, strict=True):
            validate_prompt(prompt, p.max_tokens, config.context_window, config.vocab_size)
        eos = config.eos_token_ids or _tokenizer_eos(self.loaded.tokenizer)
        seqs = [Sequence(next(self._ids), list(prompt), p, eos) for prompt, p in zip(prompts, params)]
        sampler = Sampler()
        try:
            self._step(seqs, sampler, prefill=True)
            while running := [s for s in seqs if not s.finished]:
                self._step(running, sampler, prefill=False)
        finally:
            for seq in seqs:
                self.kv.free(seq.seq_id)
        return [self._completion(seq) for seq in seqs]

    def _step(self, seqs: list[Sequence], sampler: Sampler, prefill: bool) -> None:
        if prefill:
            tokens = [t for s in seqs for t in s.prompt_ids]
            batch = ForwardBatch.build([s.seq_id for s in seqs], [0] * len(seqs),
                                       [len(s.prompt_ids) for s in seqs], self.device)
        else:
            tokens = [s.last_token for s in seqs]
            batch = ForwardBatch.build([s.seq_id for s in seqs], [s.num_tokens - 1 for s in seqs],
                                       [1] * len(seqs), self.device)
        self.kv.reserve(batch)
        logits = self.loaded.model(torch.tensor(tokens, device=self.device), batch, self.kv)
        histories = [TokenHistory(s.prompt_ids, s.output_ids) for s in seqs]
        sampled = sampler.sample(logits, [s.params for s in seqs], [len(s.output_ids) for s in seqs], histories)
        for seq, token in zip(seqs, sampled):
            seq.append(token)
            if not seq.finished and seq.params.stop and self._stop_string_index(seq) is not None:
                seq.finish_reason = "stop"

    def _stop_string_index(self, seq: Sequence) -> int | None:
        text = self.loaded.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        hits = [text.find(stop) for stop in seq.params.stop if stop in text]
        return min(hits) if hits else None

    def _completion(self, seq: Sequence) -> Completion:
        text = self.loaded.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        cut = self._stop_string_index(seq) if seq.params.stop else None
        if cut is not None:
            text = text[:cut]
        return Completion(seq.prompt_ids, seq.output_ids, text, seq.finish_reason or "length")


def _tokenizer_eos(tokenizer: object) -> tuple[int, ...]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return () if eos is None else (int(eos),)
