"""The hack-router command line: flags, HACK_* environment defaults, usage errors."""
from __future__ import annotations

import pytest

from router.main import build_parser, config_from_args, main


def test_environment_variables_are_the_defaults(monkeypatch):
    monkeypatch.setenv("HACK_MODEL", "/models/tiny")
    monkeypatch.setenv("HACK_PREFILL", "p1:50051, p2:50051")
    monkeypatch.setenv("HACK_DECODE", "d1:50061")
    monkeypatch.setenv("HACK_POLICY", "least_loaded")
    monkeypatch.setenv("HACK_PORT", "8123")
    config = config_from_args(build_parser().parse_args([]))
    assert config.model == "/models/tiny" and config.prefill_addresses == ("p1:50051", "p2:50051")
    assert config.decode_addresses == ("d1:50061",) and config.policy == "least_loaded" and config.port == 8123


def test_flags_override_the_environment(monkeypatch):
    monkeypatch.setenv("HACK_DECODE", "d1:50061")
    args = build_parser().parse_args(["--model", "m", "--prefill", "p:1", "--decode", "d:2", "d:3",
                                      "--kv-mode", "fp16"])
    config = config_from_args(args)
    assert config.decode_addresses == ("d:2", "d:3") and config.kv_mode == "fp16"


def test_bad_input_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setenv("HACK_PORT", "eighty")
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([])
    assert exited.value.code == 2 and "invalid int value: 'eighty'" in capsys.readouterr().err
    monkeypatch.delenv("HACK_PORT")
    with pytest.raises(SystemExit):
        main(["--model", "m", "--prefill", "p:1"])  # no decode instance
    assert "at least one decode address is required" in capsys.readouterr().err


def test_no_model_falls_back_to_the_embedded_default(monkeypatch):
    monkeypatch.delenv("HACK_MODEL", raising=False)
    config = config_from_args(build_parser().parse_args(["--prefill", "p:1", "--decode", "d:1"]))
    assert config.model == config.model_name == "smollm2-135m-instruct"
