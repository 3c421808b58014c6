"""Where a model's attention goes: the share on its first tokens (attention sinks) and on its most recent ones.

    python -m common.eval.attention_profile --model DIR --text FILE [--context 256 --windows 4 --sinks 4 --recent 64]

The model prefills --windows windows of --context tokens of the text with a float KV backend that records, per
layer, the mean attention probability that queries at positions >= --recent put on the first --sinks tokens and
on the last --recent tokens (their own included). These shares say what the 16-bit parts of a compressed cache
buy on this model: the sinks keep the first tokens exact, the open partition (requant elimination) the most
recent up to Π - 1. Prints a markdown table and a JSON line; bad input exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from common.default_model import model_from_env
from common.eval.perplexity import read_text_prefix, text_windows
from common.kv.interface import ForwardBatch, KVBackend
from common.loader import LoadedModel, load_model


class AttentionRecorder(KVBackend):
    """Float attention for single prefill forwards (nothing is cached) that records where the probability goes."""

    def __init__(self, num_layers: int, sinks: int, recent: int) -> None:
        self.sinks, self.recent = sinks, recent
        self.sink_share: list[list[float]] = [[] for _ in range(num_layers)]  # one entry per sequence
        self.recent_share: list[list[float]] = [[] for _ in range(num_layers)]
        self._lengths: dict[int, int] = {}

    def reserve(self, batch: ForwardBatch) -> None:
        if any(batch.num_cached):
            raise ValueError("AttentionRecorder runs single prefill forwards only")
        self._lengths = dict(zip(batch.seq_ids, batch.num_new))

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               batch: ForwardBatch) -> torch.Tensor:
        out = torch.empty_like(q)
        for i in range(len(batch.seq_ids)):
            rows = batch.rows(i)
            probs = causal_probabilities(q[rows], k[rows])  # [Hq, n, n]
            group = q.shape[1] // k.shape[1]
            out[rows] = (probs @ v[rows].float().repeat_interleave(group, 1).transpose(0, 1)).transpose(0, 1)
            self._record(layer, probs)
        return out

    def _record(self, layer: int, probs: torch.Tensor) -> None:
        n = probs.shape[-1]
        if n <= self.recent:
            return
        measured = probs[:, self.recent:]  # queries at positions recent..n-1
        q_pos = torch.arange(self.recent, n).unsqueeze(1)
        k_pos = torch.arange(n).unsqueeze(0)
        window = (k_pos <= q_pos) & (k_pos > q_pos - self.recent)
        self.sink_share[layer].append(float(measured[..., :self.sinks].sum(-1).mean()))
        self.recent_share[layer].append(float((measured * window).sum(-1).mean()))

    def free(self, seq_id: int) -> None:
        self._lengths.pop(seq_id, None)

    def num_tokens(self, seq_id: int) -> int:
        return self._lengths.get(seq_id, 0)


def causal_probabilities(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """fp32 causal softmax(q k^T / sqrt(D)) of one sequence: q [n, Hq, D], k [n, Hkv, D] -> [Hq, n, n]."""
    n, heads, head_dim = q.shape
    keys = k.float().repeat_interleave(heads // k.shape[1], 1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), keys) * head_dim**-0.5
    future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)


def profile(loaded: LoadedModel, text: str, context: int, windows: int, sinks: int, recent: int) -> list[dict]:
    """Per layer: mean share of attention on the first `sinks` tokens and on the last `recent` tokens."""
    tokens = text_windows(loaded.tokenizer, text, context, windows * context)
    tokens = [w for w in tokens if len(w) == context][:windows]
    if not tokens:
        raise ValueError(f"the text is too short for one window of {context} tokens")
    recorder = AttentionRecorder(loaded.config.num_layers, sinks, recent)
    device = next(loaded.model.parameters()).device
    batch = ForwardBatch.build(list(range(len(tokens))), [0] * len(tokens), [context] * len(tokens), device)
    recorder.reserve(batch)
    with torch.no_grad():
        loaded.model(torch.tensor([t for w in tokens for t in w], device=device), batch, recorder)
    return [{"layer": layer, "sink_share": sum(s) / len(s), "recent_share": sum(r) / len(r)}
            for layer, (s, r) in enumerate(zip(recorder.sink_share, recorder.recent_share))]


def markdown_table(rows: list[dict], sinks: int, recent: int) -> str:
    lines = [f"| layer | attention on the first {sinks} tokens | attention on the last {recent} tokens |",
             "|---|---|---|"]
    lines += [f"| {r['layer']} | {100 * r['sink_share']:.1f}% | {100 * r['recent_share']:.1f}% |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.eval.attention_profile",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--text", required=True)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--recent", type=int, default=64)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device")
    args = parser.parse_args(argv)
    try:
        if args.windows < 1 or args.sinks < 0 or not 1 <= args.recent < args.context:
            raise ValueError("need --windows >= 1, --sinks >= 0 and 1 <= --recent < --context")
        text = read_text_prefix(args.text, args.windows * args.context)
        loaded = load_model(model_from_env(args.model), dtype=args.dtype, device=args.device)
        if args.context > loaded.config.context_window:
            raise ValueError(f"--context must be <= {loaded.config.context_window}, got {args.context}")
        rows = profile(loaded, text, args.context, args.windows, args.sinks, args.recent)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(markdown_table(rows, args.sinks, args.recent))
    print(json.dumps({"context": args.context, "sinks": args.sinks, "recent": args.recent, "layers": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
