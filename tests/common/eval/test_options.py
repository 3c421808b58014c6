"""KV flags: parsing into a KVConfig and `kv_flags`, its inverse."""
from __future__ import annotations

import argparse

import pytest

from common.eval.options import add_kv_arguments, kv_config_from_args, kv_flags
from common.kv.config import KVConfig


def parse(flags: list[str]) -> KVConfig:
    parser = argparse.ArgumentParser()
    add_kv_arguments(parser)
    return kv_config_from_args(parser.parse_args(flags))


def test_no_flags_give_the_default_config() -> None:
    assert parse([]) == KVConfig()


@pytest.mark.parametrize("config", [
    KVConfig(mode="fp16"),
    KVConfig(),
    KVConfig(mode="dequant", bits=4, partition=128, key_axis="token"),
    KVConfig(mode="hack", bits=8, partition=32, rounding="stochastic", num_sinks=0),
    KVConfig(mode="hack", num_sinks=7, sum_elimination=False, requant_elimination=False, quantized_prefill=False),
])
def test_kv_flags_round_trip(config) -> None:
    assert parse(kv_flags(config)) == config


def test_kv_flags_leave_out_defaults_and_named_flags() -> None:
    assert kv_flags(KVConfig()) == ["--kv-mode", "hack"]
    config = KVConfig(mode="hack", bits=4, num_sinks=0, requant_elimination=False)
    assert kv_flags(config, leave_out=("--kv-mode", "--bits")) == ["--num-sinks", "0", "--no-requant-elimination"]


def test_invalid_flag_values_are_a_config_error() -> None:
    with pytest.raises(ValueError, match="num_sinks must be >= 0"):
        parse(["--num-sinks", "-1"])
