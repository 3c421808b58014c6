"""Which layers, and which of K and V, the 2-bit KV loss comes from: perplexity with the compressed storage
applied to one layer at a time (or to K or V only), the rest of the cache left 16-bit.

    python -m common.eval.layer_sensitivity --model DIR --text ../shared/data/wiki.test.raw [KV flags]

The serving pool has one layout for all layers, so it cannot quantize a single layer; this tool simulates the
storage instead (`SimulatedKVBackend`): each window is one prefill whose every query sees the cache as the pool
holds it after storing that query's token (16-bit sinks, whole partitions quantized once `window` newer tokens
follow them, the 16-bit tail), with the values dequantized from the pool's own quantizer (`format.quantize_tokens`,
rotation included). That is what `dequant` mode computes (tested equal to the dequant backend's decode steps), in
one forward per window instead of one per token. Prints a markdown table (the change over fp16 KV per layer) and
one JSON line. SmolLM2-135M: 33 perplexity passes of 2,048 tokens, about 8 minutes on one core.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time

import torch
import torch.nn.functional as F

from common.eval.cli import print_json_result
from common.eval.perplexity import read_text_prefix, text_windows
from common.kv import format as fmt
from common.kv import reference
from common.kv.config import KVConfig
from common.kv.interface import ForwardBatch, KVBackend
from common.kv.options import add_kv_arguments, kv_config_from_args, kv_flags
from common.loader import LoadedModel, load_model
from common.default_model import model_from_env

PARTS = ("k", "v")


@dataclasses.dataclass(frozen=True)
class Scope:
    """Where the compressed storage applies: these layers (None: all), these of K and V."""

    layers: frozenset[int] | None = None
    parts: tuple[str, ...] = PARTS

    def covers(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers


class SimulatedKVBackend(KVBackend):
    """One whole-sequence prefill per sequence, attended as the compressed pool would hold it at each token.

    Only prefills from an empty cache are accepted: a sequence is stored once and every query position is
    scored (perplexity), which is all this backend is for.
    """

    def __init__(self, config: KVConfig, num_kv_heads: int, head_dim: int, scope: Scope = Scope()) -> None:
        if not config.compressed:
            raise ValueError("the simulation needs a compressed KV mode (dequant or hack)")
        self.config, self.scope = config, scope
        self.rotations = fmt.rotation_matrices(num_kv_heads, head_dim, config.seed) if config.rotate else None
        self.float_dtype = fmt.STORAGE_DTYPE

    def reserve(self, batch: ForwardBatch) -> None:
        if any(batch.num_cached):
            raise ValueError("SimulatedKVBackend scores whole sequences: every forward must start from an empty cache")

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return torch.cat([self._sequence(layer, q[batch.rows(i)], k[batch.rows(i)], v[batch.rows(i)])
                          for i in range(len(batch.seq_ids))]).to(q.dtype)

    def _sequence(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [L, Hq, D], k/v [L, Hkv, D] -> [L, Hq, D]."""
        length, num_heads, head_dim = q.shape
        q, k, v = (x.float().transpose(0, 1) for x in (q, k, v))  # heads first
        group = num_heads // k.shape[0]
        if self.rotations is not None:
            k, v = k @ self.rotations, v @ self.rotations
            q = (q.unflatten(0, (-1, group)) @ self.rotations.unsqueeze(1)).flatten(0, 1)
        k, v = k.to(self.float_dtype).float(), v.to(self.float_dtype).float()  # the 16-bit sinks and tail
        quantized = self._quantized_mask(length) if self.scope.covers(layer) else None
        stored_k, stored_v = self._stored(k, v, layer)
        keys = [k.unsqueeze(1), stored_k.unsqueeze(1)]  # [Hkv, 1, L, D], broadcast over each KV head's queries
        qg = q.unflatten(0, (-1, group))  # [Hkv, g, L, D]
        scores = qg @ keys[0].transpose(-1, -2)
        if quantized is not None:
            scores = torch.where(quantized, qg @ keys[1].transpose(-1, -2), scores)
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        p = (scores / math.sqrt(head_dim)).masked_fill(~causal, -math.inf).softmax(-1)
        if quantized is None:
            out = p @ v.unsqueeze(1)
        else:
            out = (p * ~quantized) @ v.unsqueeze(1) + (p * quantized) @ stored_v.unsqueeze(1)
        out = out.flatten(0, 1)
        if self.rotations is not None:
            out = (out.unflatten(0, (-1, group)) @ self.rotations.transpose(-1, -2).unsqueeze(1)).flatten(0, 1)
        return out.transpose(0, 1)

    def _quantized_mask(self, length: int) -> torch.Tensor:
        """[L, L]: token j is read from codes by the query at position t (after t + 1 tokens are stored)."""
        mask = torch.zeros(length, length, dtype=torch.bool)
        for t in range(length):
            split = fmt.split_tokens(t + 1, self.config)
            mask[t, split.sinks:split.sinks + split.quantized] = True
        return mask

    def _stored(self, k: torch.Tensor, v: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V as the pool's pages give them back: every whole partition quantized and dequantized."""
        stored_k, stored_v = k.clone(), v.clone()
        if not self.scope.covers(layer):
            return stored_k, stored_v
        split = fmt.split_tokens(k.shape[1], dataclasses.replace(self.config, window=0))
        start, end = split.sinks, split.sinks + split.quantized
        if end > start:
            dk, dv = dequantized_tokens(k[:, start:end], v[:, start:end], self.config)
            if "k" in self.scope.parts:
                stored_k[:, start:end] = dk
            if "v" in self.scope.parts:
                stored_v[:, start:end] = dv
        return stored_k, stored_v

    def free(self, seq_id: int) -> None:
        pass

    def num_tokens(self, seq_id: int) -> int:
        return 0


def dequantized_tokens(k: torch.Tensor, v: torch.Tensor, config: KVConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V [Hkv, n, D] (n a multiple of Π) through the pool's quantizer and back to float (the reference's
    dequantization of page rows)."""
    rows = fmt.quantize_tokens(k, v, config, with_sums=False)
    rows["k_codes"] = fmt.unpack_codes(rows["k_codes"], config.k_bits)
    rows["v_codes"] = fmt.unpack_codes(rows["v_codes"], config.bits)
    return reference.dequantize_paged(rows, config)


def window_perplexity(loaded: LoadedModel, windows: list[list[int]], backend: KVBackend) -> float:
    """exp of the mean negative log-likelihood of every token after each window's first, one forward each."""
    nll, count = 0.0, 0
    for window in windows:
        ids = torch.tensor(window)
        batch = ForwardBatch.build([0], [0], [len(window)])
        backend.reserve(batch)
        logits = loaded.model(ids, batch, backend, logits="all")
        nll += float(F.cross_entropy(logits[:-1].float(), ids[1:], reduction="sum"))
        count += len(window) - 1
        backend.free(0)
    return math.exp(nll / count)


def scopes(num_layers: int) -> list[tuple[str, Scope]]:
    """All layers, K only, V only, then each layer alone."""
    return [("all layers", Scope()), ("all layers, K only", Scope(parts=("k",))),
            ("all layers, V only", Scope(parts=("v",)))] + \
           [(f"layer {i}", Scope(layers=frozenset({i}))) for i in range(num_layers)]


def evaluate(loaded: LoadedModel, config: KVConfig, text: str, context: int, max_tokens: int) -> dict:
    from common.kv.float_backend import FloatKVBackend

    windows = text_windows(loaded.tokenizer, text, context, max_tokens)
    if not windows:
        raise ValueError("the text is too short: it gives no window of at least 2 tokens")
    cfg, start = loaded.config, time.perf_counter()
    fp16 = window_perplexity(loaded, windows, FloatKVBackend.for_model(cfg, dtype=fmt.STORAGE_DTYPE))
    rows = []
    for name, scope in scopes(cfg.num_layers):
        value = window_perplexity(loaded, windows, SimulatedKVBackend(config, cfg.num_kv_heads, cfg.head_dim, scope))
        rows.append({"scope": name, "perplexity": value, "change": value / fp16 - 1})
    return {"fp16_perplexity": fp16, "rows": rows, "tokens": sum(len(w) - 1 for w in windows),
            "kv_flags": " ".join(kv_flags(config)), "seconds": round(time.perf_counter() - start, 2)}


def markdown(result: dict) -> str:
    lines = [f"fp16 KV: {result['fp16_perplexity']:.3f} ({result['tokens']} tokens; `{result['kv_flags']}`)", "",
             "| compressed storage on | perplexity | vs fp16 |", "|---|---|---|"]
    lines += [f"| {r['scope']} | {r['perplexity']:.3f} | {100 * r['change']:+.2f}% |" for r in result["rows"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.eval.layer_sensitivity",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--text", required=True, help="UTF-8 text file")
    parser.add_argument("--max-tokens", type=int, default=2048, help="tokens to score")
    parser.add_argument("--context", type=int, default=512, help="window length in tokens")
    add_kv_arguments(parser, default_mode="dequant")
    args = parser.parse_args(argv)

    def run() -> dict:
        config = kv_config_from_args(args)
        text = read_text_prefix(args.text, args.max_tokens)
        loaded = load_model(model_from_env(args.model), dtype="float32", device="cpu")
        result = evaluate(loaded, config, text, args.context, args.max_tokens)
        print(markdown(result))
        return result

    return print_json_result(run)


if __name__ == "__main__":
    sys.exit(main())
