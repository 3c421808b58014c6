"""Command-line flags that describe a KVConfig, shared by the eval tools and the services."""
from __future__ import annotations

import argparse

from common.kv.config import BITS, KEY_AXES, MODES, PARTITIONS, ROUNDINGS, KVConfig

_VALUE_FLAGS = ("bits", "partition", "key_axis", "rounding", "num_sinks")  # "--key-axis" sets key_axis, ...


def add_kv_arguments(parser: argparse.ArgumentParser, default_mode: str = "hack") -> None:
    group = parser.add_argument_group("KV cache")
    group.add_argument("--kv-mode", choices=MODES, default=default_mode)
    group.add_argument("--bits", type=int, choices=BITS, default=KVConfig.bits)
    group.add_argument("--partition", type=int, choices=PARTITIONS, default=KVConfig.partition)
    group.add_argument("--key-axis", choices=KEY_AXES, default=KVConfig.key_axis)
    group.add_argument("--rounding", choices=ROUNDINGS, default=KVConfig.rounding)
    group.add_argument("--num-sinks", type=int, default=KVConfig.num_sinks)
    group.add_argument("--no-sum-elimination", action="store_true", help="ablation: recompute code sums")
    group.add_argument("--no-requant-elimination", action="store_true", help="ablation: requantize the open block")
    group.add_argument("--float-prefill", action="store_true", help="prefill attends to float K/V, not the codes")


def kv_config_from_args(args: argparse.Namespace) -> KVConfig:
    return KVConfig(
        mode=args.kv_mode, bits=args.bits, partition=args.partition, key_axis=args.key_axis,
        rounding=args.rounding, num_sinks=args.num_sinks, sum_elimination=not args.no_sum_elimination,
        requant_elimination=not args.no_requant_elimination, quantized_prefill=not args.float_prefill,
    )


def kv_flags(config: KVConfig, leave_out: tuple[str, ...] = ()) -> list[str]:
    """The flags that select `config` (the inverse of kv_config_from_args), without those at their default
    and those named in leave_out (e.g. "--kv-mode")."""
    pairs: list[tuple[str, str | None]] = [("--kv-mode", config.mode)]
    if config.compressed:
        pairs += [("--" + name.replace("_", "-"), str(getattr(config, name))) for name in _VALUE_FLAGS
                  if getattr(config, name) != getattr(KVConfig, name)]
        switches = (("--no-sum-elimination", not config.sum_elimination),
                    ("--no-requant-elimination", not config.requant_elimination),
                    ("--float-prefill", not config.quantized_prefill))
        pairs += [(flag, None) for flag, on in switches if on]
    return [part for flag, value in pairs if flag not in leave_out for part in (flag, value) if part is not None]
