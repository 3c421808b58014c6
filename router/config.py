"""The router's settings, validated once when built (the CLI in main.py fills them from flags and HACK_* vars)."""
from __future__ import annotations

from dataclasses import dataclass

from common.default_model import served_model_name
from common.grpc_security import TransportSecurity
from proto import KV_MODE_NAMES
from router.discovery import parse_target
from router.policy import POLICIES


@dataclass(frozen=True)
class RouterConfig:
    model: str  # model directory: tokenizer, chat template, context window
    prefill_addresses: tuple[str, ...]  # host:port, or dns:///name:port for every address the name resolves to
    decode_addresses: tuple[str, ...]
    served_model_name: str = ""  # the `model` clients must send; empty = derived from `model` as hack-cluster does
    # (an embedded model's name, a directory's last component, a .gguf file's name without the suffix)
    policy: str = "round_robin"
    kv_mode: str = "hack"  # requests may pick another with the `kv_mode` extra field
    host: str = "127.0.0.1"  # loopback unless told otherwise (0.0.0.0 serves every interface)
    port: int = 8000
    max_model_len: int = 0  # 0 = the model config's max_position_embeddings
    health_interval_s: float = 2.0  # health checks and Stats polls of every instance
    discovery_interval_s: float = 5.0  # re-resolution of the dns:/// addresses
    rpc_timeout_s: float = 2.0  # health, Stats and Cancel calls
    prefill_timeout_s: float = 600.0
    max_prefill_attempts: int = 3  # a prefill that fails before the first token is retried elsewhere
    token_timeout_s: float = 120.0  # once the KV is delivered, the longest wait for decode's next token
    max_migrations: int = 2  # times a request may move to another decode instance after its own failed
    api_keys: tuple[str, ...] = ()  # /v1/* needs `Authorization: Bearer <one of them>`; empty = open
    security: TransportSecurity = TransportSecurity()  # internal token and TLS of the links to the instances
    # Request limits (each a 4xx): body bytes, prompt tokens, chat messages, max_tokens; 0 = the context window.
    max_request_bytes: int = 8 << 20
    max_prompt_tokens: int = 0
    max_messages: int = 1024
    max_tokens_limit: int = 0

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model (the model directory) is required")
        for role, addresses in (("prefill", self.prefill_addresses), ("decode", self.decode_addresses)):
            if not addresses:
                raise ValueError(f"at least one {role} address is required")
            for address in addresses:
                parse_target(address, role)
            if len(set(addresses)) != len(addresses):
                raise ValueError(f"duplicate {role} addresses: {list(addresses)}")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; expected one of {POLICIES}")
        if self.kv_mode not in KV_MODE_NAMES:
            raise ValueError(f"unknown kv_mode {self.kv_mode!r}; expected one of {KV_MODE_NAMES}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_model_len < 0:
            raise ValueError(f"max_model_len must be >= 0 (0 = from the model config), got {self.max_model_len}")
        for name in ("health_interval_s", "discovery_interval_s", "rpc_timeout_s", "prefill_timeout_s", "token_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if any(not key for key in self.api_keys):
            raise ValueError("an API key must not be empty")
        for name in ("max_request_bytes", "max_messages"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_prompt_tokens", "max_tokens_limit", "max_migrations"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_prefill_attempts < 1:
            raise ValueError(f"max_prefill_attempts must be >= 1, got {self.max_prefill_attempts}")

    @property
    def model_name(self) -> str:
        return self.served_model_name or served_model_name(self.model)
