"""Command-line flags that describe a KVConfig, the same on every program: `python -m common.generate`, the eval
tools, `hack-prefill` and `hack-decode`.

Every flag defaults to a HACK_KV_* environment variable, so one setting (a shell export, a compose env file)
configures all of them alike; prefill and decode instances must agree on it. A bad variable stops the program
like a bad flag (exit status 2, "<prog>: error: ..."), naming the variable.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from typing import Any

from common.kv.config import BITS, KEY_AXES, MODES, PARTITIONS, RANGES, ROUNDINGS, KVConfig

_VALUE_FLAGS = ("bits", "key_bits", "partition", "key_axis", "rounding", "ranges", "num_sinks", "window")  # "--key-axis" sets key_axis, ...
_SWITCH_VALUES = {"1": True, "true": True, "0": False, "false": False}


def add_kv_arguments(parser: argparse.ArgumentParser, default_mode: str = "hack") -> None:
    """The KV flags; `default_mode` applies when HACK_KV_MODE is unset."""
    group = parser.add_argument_group("KV cache", "each flag defaults to the environment variable its help names")
    _add_value(parser, group, "--kv-mode", "HACK_KV_MODE", str, MODES, default_mode, "KV cache mode")
    _add_value(parser, group, "--bits", "HACK_KV_BITS", int, BITS, KVConfig.bits, "bits per K/V code")
    _add_value(parser, group, "--key-bits", "HACK_KV_KEY_BITS", int, (0, *BITS), KVConfig.key_bits,
               "bits per K code when K differs from V (0: --bits)")
    _add_value(parser, group, "--partition", "HACK_KV_PARTITION", int, PARTITIONS, KVConfig.partition,
               "Π, values sharing one scale and minimum (also the page size)")
    _add_value(parser, group, "--key-axis", "HACK_KV_KEY_AXIS", str, KEY_AXES, KVConfig.key_axis,
               "K partitions run along tokens per channel (channel) or along head_dim per token (token)")
    _add_value(parser, group, "--rounding", "HACK_KV_ROUNDING", str, ROUNDINGS, KVConfig.rounding,
               "quantization rounding")
    _add_value(parser, group, "--ranges", "HACK_KV_RANGES", str, RANGES, KVConfig.ranges,
               "each K/V partition's range: min/max, or clipped to the least squared error")
    _add_value(parser, group, "--num-sinks", "HACK_KV_NUM_SINKS", int, None, KVConfig.num_sinks,
               "first tokens kept 16-bit")
    _add_value(parser, group, "--window", "HACK_KV_WINDOW", int, None, KVConfig.window,
               "most recent tokens kept 16-bit beyond the open partition")
    _add_switch(parser, group, "--no-sum-elimination", "HACK_KV_NO_SUM_ELIMINATION",
                "ablation: recompute code sums at every attention")
    _add_switch(parser, group, "--no-requant-elimination", "HACK_KV_NO_REQUANT_ELIMINATION",
                "ablation: requantize the open partition at every step")
    default = _env_value(parser, "HACK_KV_ROTATE", _switch, KVConfig.rotate)
    group.add_argument("--rotate", action=argparse.BooleanOptionalAction, default=default,
                       help="rotate K and V per head (randomized Hadamard) before quantizing them; --no-rotate is "
                            "the ablation (env HACK_KV_ROTATE=1/0; default %(default)s)")
    default = _env_value(parser, "HACK_KV_TOKEN_SCALES", _switch, KVConfig.token_scales)
    group.add_argument("--token-scales", action=argparse.BooleanOptionalAction, default=default,
                       help="scale each quantized token's K and V by a stored power of two before the per-channel "
                            "quantization (env HACK_KV_TOKEN_SCALES=1/0; default %(default)s)")
    default = _env_value(parser, "HACK_KV_QUANTIZED_PREFILL", _switch, KVConfig.quantized_prefill)
    group.add_argument("--quantized-prefill", action=argparse.BooleanOptionalAction, default=default,
                       help="prefill attends to the stored codes, as the paper does; --no-quantized-prefill attends "
                            "to the float K/V (env HACK_KV_QUANTIZED_PREFILL=1/0; default %(default)s)")


def kv_config_from_args(args: argparse.Namespace) -> KVConfig:
    """The KVConfig the parsed flags select; ValueError when the combination is invalid."""
    return KVConfig(
        mode=args.kv_mode, bits=args.bits, key_bits=args.key_bits, partition=args.partition, key_axis=args.key_axis,
        rounding=args.rounding, ranges=args.ranges, num_sinks=args.num_sinks, window=args.window,
        sum_elimination=not args.no_sum_elimination, requant_elimination=not args.no_requant_elimination, quantized_prefill=args.quantized_prefill,
        rotate=args.rotate, token_scales=args.token_scales,
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
                    ("--no-quantized-prefill", not config.quantized_prefill),
                    ("--rotate" if config.rotate else "--no-rotate", config.rotate != KVConfig.rotate),
                    ("--token-scales" if config.token_scales else "--no-token-scales",
                     config.token_scales != KVConfig.token_scales))
        pairs += [(flag, None) for flag, on in switches if on]
    return [part for flag, value in pairs if flag not in leave_out for part in (flag, value) if part is not None]


def _add_value(parser: argparse.ArgumentParser, group: argparse._ArgumentGroup, flag: str, variable: str,
               convert: Callable[[str], Any], choices: Sequence[Any] | None, fallback: Any, help_text: str) -> None:
    default = _env_value(parser, variable, lambda text: _parse(text, convert, choices), fallback)
    group.add_argument(flag, type=convert, choices=choices, default=default,
                       help=f"{help_text} (env {variable}; default %(default)s)")


def _add_switch(parser: argparse.ArgumentParser, group: argparse._ArgumentGroup, flag: str, variable: str,
                help_text: str) -> None:
    default = _env_value(parser, variable, _switch, False)
    group.add_argument(flag, action="store_true", default=default, help=f"{help_text} (env {variable}=1)")


def _env_value(parser: argparse.ArgumentParser, variable: str, parse: Callable[[str], Any], fallback: Any) -> Any:
    """The flag default `variable` sets, or `fallback` when it is unset or empty (how compose leaves it unset)."""
    text = os.environ.get(variable, "")
    if not text:
        return fallback
    try:
        return parse(text)
    except ValueError as error:
        # argparse's usage-error exit, without the usage line: it would list only the flags added so far.
        parser.exit(2, f"{parser.prog}: error: environment variable {variable}={text!r} is invalid: {error}\n")


def _parse(text: str, convert: Callable[[str], Any], choices: Sequence[Any] | None) -> Any:
    """`text` as the flag would take it: converted, then checked against the choices; the flags without
    choices are counts (--num-sinks, --window), so they must be integers >= 0."""
    try:
        value = convert(text)
    except ValueError:
        value = None  # only int flags can fail to convert
    if choices is not None and value not in choices:
        raise ValueError(f"choose from {', '.join(map(str, choices))}")
    if value is None or (choices is None and value < 0):
        raise ValueError("expected an integer >= 0")
    return value


def _switch(text: str) -> bool:
    if text.lower() not in _SWITCH_VALUES:
        raise ValueError("expected 1/true (on) or 0/false (off)")
    return _SWITCH_VALUES[text.lower()]
