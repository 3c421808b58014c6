"""KV flags: parsing into a KVConfig, HACK_KV_* environment defaults, and `kv_flags`, the inverse."""
from __future__ import annotations

import argparse

import pytest

from common.kv.config import KVConfig
from common.kv.options import add_kv_arguments, kv_config_from_args, kv_flags

KV_VARIABLES = ("HACK_KV_MODE", "HACK_KV_BITS", "HACK_KV_PARTITION", "HACK_KV_KEY_AXIS", "HACK_KV_ROUNDING",
                "HACK_KV_NUM_SINKS", "HACK_KV_NO_SUM_ELIMINATION", "HACK_KV_NO_REQUANT_ELIMINATION",
                "HACK_KV_QUANTIZED_PREFILL")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in KV_VARIABLES:
        monkeypatch.delenv(variable, raising=False)


def parse(flags: list[str], default_mode: str = "hack") -> KVConfig:
    parser = argparse.ArgumentParser(prog="kv-test")
    add_kv_arguments(parser, default_mode)
    return kv_config_from_args(parser.parse_args(flags))


def test_no_flags_give_the_default_config() -> None:
    assert parse([]) == KVConfig()
    assert parse([], default_mode="fp16") == KVConfig(mode="fp16")


@pytest.mark.parametrize("config", [
    KVConfig(mode="fp16"),
    KVConfig(),
    KVConfig(mode="dequant", bits=4, partition=128, key_axis="token"),
    KVConfig(key_bits=4, window=0),
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


def test_every_flag_defaults_to_its_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = {"HACK_KV_MODE": "dequant", "HACK_KV_BITS": "4", "HACK_KV_PARTITION": "32",
                "HACK_KV_KEY_AXIS": "token", "HACK_KV_ROUNDING": "stochastic", "HACK_KV_NUM_SINKS": "17",
                "HACK_KV_NO_SUM_ELIMINATION": "1", "HACK_KV_NO_REQUANT_ELIMINATION": "TRUE",
                "HACK_KV_QUANTIZED_PREFILL": "false"}
    for variable, value in settings.items():
        monkeypatch.setenv(variable, value)
    assert parse([], default_mode="fp16") == KVConfig(
        mode="dequant", bits=4, partition=32, key_axis="token", rounding="stochastic", num_sinks=17,
        sum_elimination=False, requant_elimination=False, quantized_prefill=False)


def test_a_flag_wins_over_its_variable_and_empty_or_off_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HACK_KV_BITS", "8")
    monkeypatch.setenv("HACK_KV_MODE", "")
    monkeypatch.setenv("HACK_KV_QUANTIZED_PREFILL", "1")
    monkeypatch.setenv("HACK_KV_NO_SUM_ELIMINATION", "false")
    assert parse(["--bits", "2", "--partition", "128"], default_mode="fp16") == KVConfig(mode="fp16", partition=128)


@pytest.mark.parametrize("variable, value, expected", [
    ("HACK_KV_BITS", "3", "choose from 2, 4, 8"),
    ("HACK_KV_PARTITION", "sixty-four", "choose from 32, 64, 128"),
    ("HACK_KV_MODE", "int2", "choose from fp16, dequant, hack"),
    ("HACK_KV_NUM_SINKS", "1.5", "expected an integer >= 0"),
    ("HACK_KV_NUM_SINKS", "-2", "expected an integer >= 0"),
    ("HACK_KV_QUANTIZED_PREFILL", "yes", "expected 1/true (on) or 0/false (off)"),
])
def test_a_bad_variable_is_a_usage_error_naming_it(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                                   variable: str, value: str, expected: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as exit_info:
        parse([])
    assert exit_info.value.code == 2
    message = f"kv-test: error: environment variable {variable}={value!r} is invalid: {expected}\n"
    assert capsys.readouterr().err == message


def test_help_names_each_variable(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        parse(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps long help lines
    for variable in KV_VARIABLES:
        assert variable in text
