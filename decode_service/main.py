"""`hack-decode`: the decode instance (gRPC). Holds the compressed KV caches and generates tokens in
continuous batches. Every flag defaults to its HACK_* environment variable."""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from common.grpc_security import add_transport_args
from common.addresses import join_host_port
from common.kv.factory import make_kv_backend
from common.kv.options import kv_config_from_args
from common.service import add_model_args, env, kv_identity, load_service_model, run_service
from decode_service.engine import DecodeEngine
from decode_service.runner import DecodeRunner
from decode_service.scheduler import Scheduler
from decode_service.server import DecodeServicer, add_to_server
from proto import DECODE_SERVICE_NAME

DEFAULT_PORT = 50061


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hack-decode", description=__doc__.splitlines()[0])
    add_model_args(parser, DEFAULT_PORT)
    add_transport_args(parser, server=True, client=False)
    capacity = parser.add_mutually_exclusive_group()
    capacity.add_argument("--kv-memory-mb", type=float, default=env("KV_MEMORY_MB", "512"),
                          help="KV pool size in MiB (env HACK_KV_MEMORY_MB; default 512)")
    capacity.add_argument("--kv-blocks", type=int, default=env("KV_BLOCKS") or None,
                          help="KV pool size in blocks (pages of block_size tokens, all layers); overrides "
                               "--kv-memory-mb (env HACK_KV_BLOCKS)")
    parser.add_argument("--max-seqs", type=int, default=env("MAX_SEQS", "64"),
                        help="requests held at once (env HACK_MAX_SEQS; default 64)")
    parser.add_argument("--max-batch-size", type=int, default=env("MAX_BATCH_SIZE") or None,
                        help="sequences per decode step (env HACK_MAX_BATCH_SIZE; default --max-seqs)")
    parser.add_argument("--kv-timeout-s", type=float, default=env("KV_TIMEOUT_S", "60"),
                        help="an admitted request whose KV has not arrived by then fails and frees its blocks "
                             "(env HACK_KV_TIMEOUT_S; default 60)")
    parser.add_argument("--advertise-host", default=env("ADVERTISE_HOST") or os.environ.get("POD_IP", ""),
                        help="the host prefill instances must push KV to, told to the router (e.g. the pod IP); "
                             "default: --host when it is one routable address, else the address the router dials "
                             "(env HACK_ADVERTISE_HOST, else POD_IP)")
    parser.add_argument("--swap-space-mb", type=float, default=env("SWAP_SPACE_MB", "4096"),
                        help="host memory for the KV of preempted requests, in MiB (env HACK_SWAP_SPACE_MB; default "
                             "4096, like vLLM's swap space); a request preempted with no room left there fails with "
                             "RESOURCE_EXHAUSTED")
    parser.add_argument("--kv-import-budget-mb", type=float, default=env("KV_IMPORT_BUDGET_MB", "32"),
                        help="pushed KV written into the pool between two decode steps, in MiB (at least one "
                             "layer); bounds how long arriving KV delays a step (env HACK_KV_IMPORT_BUDGET_MB)")
    parser.add_argument("--profile-attention", action="store_true", default=env("PROFILE_ATTENTION") == "1",
                        help="on CUDA, time each decode step's attention (synchronizes the device around it; "
                             "CPU steps are always timed) for DecodeTimers.attention_s (env HACK_PROFILE_ATTENTION=1)")
    return parser.parse_args(argv)


def build_servicer(args: argparse.Namespace) -> DecodeServicer:
    if args.kv_blocks is not None and args.kv_blocks < 1:
        raise ValueError(f"--kv-blocks must be >= 1, got {args.kv_blocks}")
    if args.kv_memory_mb <= 0:
        raise ValueError(f"--kv-memory-mb must be > 0, got {args.kv_memory_mb}")
    if args.swap_space_mb < 0 or args.kv_import_budget_mb <= 0:
        raise ValueError(f"--swap-space-mb must be >= 0 and --kv-import-budget-mb > 0, got {args.swap_space_mb} "
                         f"and {args.kv_import_budget_mb}")
    loaded = load_service_model(args)
    kv_config = kv_config_from_args(args)
    param = next(loaded.model.parameters())
    size = ({"max_tokens": args.kv_blocks * kv_config.block_size} if args.kv_blocks is not None
            else {"memory_bytes": int(args.kv_memory_mb * 2**20)})
    backend = make_kv_backend(kv_config, loaded.config, param.device, param.dtype, max_seqs=args.max_seqs, **size)
    swap_blocks = int(args.swap_space_mb * 2**20) // (backend.layout.block_bytes * loaded.config.num_layers)
    scheduler = Scheduler(backend.layout, backend.pool.num_blocks, args.max_seqs, args.max_batch_size or args.max_seqs,
                          swap_blocks)
    runner = DecodeRunner(loaded, backend, args.profile_attention)
    runner.grammars.warm_up_in_background()  # structured output's token table, off the first request's path
    engine = DecodeEngine(runner, scheduler, args.kv_timeout_s, int(args.kv_import_budget_mb * 2**20))
    return DecodeServicer(engine, kv_identity(loaded, backend.layout), kv_config.mode,
                          kv_address(args.advertise_host, args.host, args.port))


def kv_address(advertise_host: str, host: str, port: int) -> str:
    """The host:port this instance advertises for KV pushes; empty when only the router's view can tell
    (listening on every address, or on loopback only, where nothing but the same machine reaches it)."""
    if not advertise_host:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return ""  # a name (e.g. localhost): the router's address for this instance is as good
        if address.is_unspecified or address.is_loopback:
            return ""
        advertise_host = host
    if port == 0:
        raise ValueError("--advertise-host needs a fixed --port (got 0, any free port)")
    return join_host_port(advertise_host, port)


def main(argv: list[str] | None = None) -> int:
    return run_service("hack-decode", build_servicer, add_to_server, DECODE_SERVICE_NAME, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
