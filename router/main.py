"""`hack-router`: the command line of the router. Every flag defaults to a HACK_* environment variable.

    hack-router --model ../shared/models/stories260K --prefill localhost:50051 --decode localhost:50061
"""
from __future__ import annotations

import argparse
import logging
import os
import re
from collections.abc import Sequence

import uvicorn

from common.default_model import model_from_env
from common.grpc_security import add_transport_args, security_from_args
from proto import KV_MODE_NAMES
from router.config import RouterConfig
from router.policy import POLICIES


def _env_list(name: str) -> list[str]:
    """HACK_PREFILL="a:1,b:2" or "a:1 b:2" -> ["a:1", "b:2"]."""
    return [item for item in re.split(r"[,\s]+", os.environ.get(name, "")) if item]


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="hack-router",
        description="OpenAI-compatible HTTP router in front of HACK prefill and decode instances.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default=env("HACK_MODEL"),
                        help="checkpoint directory, .gguf file or embedded model name (tokenizer, config); default: "
                             "smollm2-135m-instruct [HACK_MODEL]")
    parser.add_argument("--served-model-name", default=env("HACK_SERVED_MODEL_NAME", ""),
                        help="name clients send as `model`; default: the embedded model's name, else the last "
                             "component of --model without .gguf [HACK_SERVED_MODEL_NAME]")
    parser.add_argument("--prefill", nargs="+", default=_env_list("HACK_PREFILL"), metavar="ADDR",
                        help="prefill instances: host:port, or dns:///name:port for every address the name "
                             "resolves to (a Kubernetes headless Service), re-resolved every --discovery-interval "
                             "[HACK_PREFILL, comma separated]")
    parser.add_argument("--decode", nargs="+", default=_env_list("HACK_DECODE"), metavar="ADDR",
                        help="decode instances, like --prefill [HACK_DECODE, comma separated]")
    parser.add_argument("--policy", choices=POLICIES, default=env("HACK_POLICY", "round_robin"),
                        help="instance selection [HACK_POLICY]")
    parser.add_argument("--kv-mode", choices=KV_MODE_NAMES, default=env("HACK_KV_MODE", "hack"),
                        help="KV mode of requests that do not name one [HACK_KV_MODE]")
    parser.add_argument("--host", default=env("HACK_HOST", "127.0.0.1"),
                        help="listen address; 0.0.0.0 serves every interface [HACK_HOST]")
    # String defaults go through `type` too, so a bad HACK_* value is a usage error, not a traceback.
    parser.add_argument("--port", type=int, default=env("HACK_PORT", "8000"), help="[HACK_PORT]")
    parser.add_argument("--max-model-len", type=int, default=env("HACK_MAX_MODEL_LEN", "0"),
                        help="context window; 0 = the model's [HACK_MAX_MODEL_LEN]")
    parser.add_argument("--health-interval", type=float, default=env("HACK_HEALTH_INTERVAL_S", "2.0"),
                        help="seconds between health/Stats polls [HACK_HEALTH_INTERVAL_S]")
    parser.add_argument("--discovery-interval", type=float, default=env("HACK_DISCOVERY_INTERVAL_S", "5.0"),
                        help="seconds between DNS resolutions of dns:/// addresses [HACK_DISCOVERY_INTERVAL_S]")
    parser.add_argument("--prefill-timeout", type=float, default=env("HACK_PREFILL_TIMEOUT_S", "600"),
                        help="seconds one Prefill call may take [HACK_PREFILL_TIMEOUT_S]")
    parser.add_argument("--token-timeout", type=float, default=env("HACK_TOKEN_TIMEOUT_S", "120"),
                        help="seconds a decode instance may stay silent once the KV is delivered; then the "
                             "request fails with an error [HACK_TOKEN_TIMEOUT_S]")
    parser.add_argument("--max-migrations", type=int, default=env("HACK_MAX_MIGRATIONS", "2"),
                        help="times a request whose decode instance fails mid-stream may resume on another one; "
                             "0 = never [HACK_MAX_MIGRATIONS]")
    security = parser.add_argument_group("security and limits")
    security.add_argument("--api-key", nargs="+", default=_env_list("HACK_API_KEY"), metavar="KEY",
                          help="accept /v1/* requests only with `Authorization: Bearer KEY` (one or more keys; "
                               "/health, /ready and /metrics stay open) [HACK_API_KEY, comma separated]")
    security.add_argument("--max-request-bytes", type=int, default=env("HACK_MAX_REQUEST_BYTES", str(8 << 20)),
                          help="largest request body; larger ones get 413 [HACK_MAX_REQUEST_BYTES]")
    security.add_argument("--max-prompt-tokens", type=int, default=env("HACK_MAX_PROMPT_TOKENS", "0"),
                          help="longest prompt in tokens; 0 = the context window [HACK_MAX_PROMPT_TOKENS]")
    security.add_argument("--max-messages", type=int, default=env("HACK_MAX_MESSAGES", "1024"),
                          help="most messages in one chat request [HACK_MAX_MESSAGES]")
    security.add_argument("--max-tokens-limit", type=int, default=env("HACK_MAX_TOKENS_LIMIT", "0"),
                          help="largest max_tokens a request may ask for (also the default); 0 = the context "
                               "window [HACK_MAX_TOKENS_LIMIT]")
    add_transport_args(parser, server=False, client=True)
    parser.add_argument("--log-level", default=env("HACK_LOG_LEVEL", "info"), help="[HACK_LOG_LEVEL]")
    return parser


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    return RouterConfig(
        model=model_from_env(args.model),
        prefill_addresses=tuple(args.prefill),
        decode_addresses=tuple(args.decode),
        served_model_name=args.served_model_name,
        policy=args.policy,
        kv_mode=args.kv_mode,
        host=args.host,
        port=args.port,
        max_model_len=args.max_model_len,
        health_interval_s=args.health_interval,
        discovery_interval_s=args.discovery_interval,
        prefill_timeout_s=args.prefill_timeout,
        token_timeout_s=args.token_timeout,
        max_migrations=args.max_migrations,
        api_keys=tuple(args.api_key),
        security=security_from_args(args),
        max_request_bytes=args.max_request_bytes,
        max_prompt_tokens=args.max_prompt_tokens,
        max_messages=args.max_messages,
        max_tokens_limit=args.max_tokens_limit,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from router.app import build_app  # after argument checks: importing transformers takes seconds

    try:
        app = build_app(config)
    except (ValueError, OSError) as error:  # a missing or unreadable model
        parser.error(str(error))
    uvicorn.run(app, host=config.host, port=config.port, log_level=args.log_level.lower())


if __name__ == "__main__":
    main()
