"""`hack-prefill`: the prefill instance (gRPC). Runs prompts in token-budget batches and streams each layer's KV
to the decode instance while the next layer computes. Every flag defaults to its HACK_* environment variable."""
from __future__ import annotations

import argparse
import sys

from common.grpc_security import add_transport_args, security_from_args
from common.kv.factory import make_kv_backend
from common.kv.options import kv_config_from_args
from common.service import add_model_args, env, kv_identity, load_service_model, run_service
from prefill_service.engine import PrefillEngine
from prefill_service.kv_sender import KV_PUSH_MODES
from prefill_service.server import PrefillServicer, add_to_server
from prefill_service.token_bucket import TokenBucket
from prefill_service.worker import PrefillWorker
from proto import PREFILL_SERVICE_NAME

DEFAULT_PORT = 50051


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hack-prefill", description=__doc__.splitlines()[0])
    add_model_args(parser, DEFAULT_PORT)
    add_transport_args(parser, server=True, client=True)  # client: its KV pushes to the decode instances
    parser.add_argument("--token-budget", type=int, default=env("PREFILL_TOKEN_BUDGET", "4096"),
                        help="prompt tokens per prefill batch; a longer prompt runs alone "
                             "(env HACK_PREFILL_TOKEN_BUDGET; default 4096)")
    parser.add_argument("--max-batch-seqs", type=int, default=env("PREFILL_MAX_BATCH_SEQS", "16"),
                        help="prompts per prefill batch (env HACK_PREFILL_MAX_BATCH_SEQS; default 16)")
    parser.add_argument("--kv-link-gbps", type=float, default=env("KV_LINK_GBPS", "0"),
                        help="emulate a KV link of this many Gbit/s (token bucket); 0 = no limit "
                             "(env HACK_KV_LINK_GBPS)")
    parser.add_argument("--kv-push", choices=KV_PUSH_MODES, default=env("KV_PUSH", "layerwise"),
                        help="layerwise: stream each layer's KV while the next one computes; after-forward: push "
                             "the whole KV once the forward is done, as servers without layer-wise transfer do "
                             "(the overlap's ablation; its time past the forward is the link's) (env HACK_KV_PUSH)")
    args = parser.parse_args(argv)
    if args.kv_push not in KV_PUSH_MODES:  # argparse checks the choices of a given flag, not of its default
        parser.error(f"environment variable HACK_KV_PUSH={args.kv_push!r} is invalid: choose from "
                     f"{', '.join(KV_PUSH_MODES)}")
    return args


def build_servicer(args: argparse.Namespace) -> PrefillServicer:
    if args.kv_link_gbps < 0:
        raise ValueError(f"--kv-link-gbps must be >= 0 (0 = no limit), got {args.kv_link_gbps}")
    loaded = load_service_model(args)
    kv_config = kv_config_from_args(args)
    param = next(loaded.model.parameters())
    # Room for one batch: the budget (or one prompt of the whole context) plus a partial page per prompt.
    max_tokens = max(args.token_budget, loaded.config.context_window) + args.max_batch_seqs * kv_config.block_size
    backend = make_kv_backend(kv_config, loaded.config, param.device, param.dtype, max_tokens=max_tokens,
                              max_seqs=args.max_batch_seqs)
    link = TokenBucket.for_link(args.kv_link_gbps) if args.kv_link_gbps else None
    worker = PrefillWorker(loaded, backend)
    worker.grammars.warm_up_in_background()  # structured output's token table, off the first request's path
    engine = PrefillEngine(worker, kv_identity(loaded, backend.layout), args.token_budget, args.max_batch_seqs, link,
                            security_from_args(args), args.kv_push)
    return PrefillServicer(engine, kv_config.mode, loaded.config.context_window, loaded.config.vocab_size)


def main(argv: list[str] | None = None) -> int:
    return run_service("hack-prefill", build_servicer, add_to_server, PREFILL_SERVICE_NAME, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
