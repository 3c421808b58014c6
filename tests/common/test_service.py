"""What the two services share: HACK_* flag defaults, KV settings, request checks, start-up errors."""
from __future__ import annotations

import grpc
import pytest

from common.kv.config import KVConfig
from common.kv.options import kv_config_from_args
from common.service import ServiceError, request_kv_mode, sampling_params
from decode_service import main as decode_main
from prefill_service import main as prefill_main
from proto import hack_pb2
from tests.decode_service.harness import SPEC


def test_flags_default_to_hack_environment_variables(monkeypatch) -> None:
    monkeypatch.setenv("HACK_PORT", "6123")
    monkeypatch.setenv("HACK_KV_MODE", "dequant")
    monkeypatch.setenv("HACK_KV_BLOCKS", "77")
    monkeypatch.setenv("HACK_KV_LINK_GBPS", "2.5")
    decode, prefill = decode_main.parse_args([]), prefill_main.parse_args(["--port", "7000"])
    assert (decode.port, decode.kv_mode, decode.kv_blocks) == (6123, "dequant", 77)
    assert (prefill.port, prefill.kv_mode, prefill.kv_link_gbps) == (7000, "dequant", 2.5)  # a flag wins


def test_a_bad_kv_push_variable_is_a_usage_error(monkeypatch, capsys) -> None:
    monkeypatch.setenv("HACK_KV_PUSH", "after-forward")
    assert prefill_main.parse_args([]).kv_push == "after-forward"
    monkeypatch.setenv("HACK_KV_PUSH", "whole")
    with pytest.raises(SystemExit):
        prefill_main.parse_args([])
    assert "HACK_KV_PUSH='whole' is invalid: choose from layerwise, after-forward" in capsys.readouterr().err


def test_default_ports_differ_per_role(monkeypatch) -> None:
    monkeypatch.delenv("HACK_PORT", raising=False)
    assert decode_main.parse_args([]).port != prefill_main.parse_args([]).port


def test_both_services_take_the_same_kv_flags_and_variables(monkeypatch) -> None:
    monkeypatch.setenv("HACK_KV_BITS", "4")
    monkeypatch.setenv("HACK_KV_QUANTIZED_PREFILL", "0")
    for main in (decode_main, prefill_main):
        config = kv_config_from_args(main.parse_args(["--partition", "32", "--num-sinks", "0"]))
        assert config == KVConfig(mode="hack", bits=4, partition=32, num_sinks=0, quantized_prefill=False)


@pytest.mark.parametrize("main", [decode_main, prefill_main])
def test_a_bad_kv_flag_or_variable_is_a_usage_error(monkeypatch, capsys, main) -> None:
    with pytest.raises(SystemExit):
        main.parse_args(["--partition", "33"])
    assert "argument --partition: invalid choice: 33" in capsys.readouterr().err
    monkeypatch.setenv("HACK_KV_BITS", "3")
    with pytest.raises(SystemExit):
        main.parse_args([])
    assert "error: environment variable HACK_KV_BITS='3' is invalid: choose from 2, 4, 8" in capsys.readouterr().err


def test_sampling_fields_map_to_sampling_params() -> None:
    unset = sampling_params(hack_pb2.SamplingParams(), max_tokens=5, stop_token_ids=(2,))
    assert (unset.greedy, unset.top_p, unset.top_k, unset.seed, unset.stop_token_ids) == (True, 1.0, 0, None, (2,))
    seeded = sampling_params(hack_pb2.SamplingParams(temperature=0.7, top_p=0.9, top_k=40, seed=0))
    assert (seeded.temperature, seeded.top_k, seeded.seed) == (pytest.approx(0.7), 40, 0)
    with pytest.raises(ServiceError) as error:
        sampling_params(hack_pb2.SamplingParams(top_p=1.5))
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in error.value.message


def test_a_request_may_only_ask_for_the_served_kv_mode() -> None:
    assert request_kv_mode(hack_pb2.KV_MODE_UNSPECIFIED, "hack") == "hack"
    assert request_kv_mode(hack_pb2.KV_MODE_FP16, "fp16") == "fp16"
    with pytest.raises(ServiceError) as other:
        request_kv_mode(hack_pb2.KV_MODE_DEQUANT, "hack")
    assert other.value.code == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(ServiceError) as unknown:
        request_kv_mode(42, "hack")
    assert unknown.value.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("main, flags, message", [
    (decode_main.main, ["--num-sinks", "-1"], "num_sinks must be >= 0"),
    (decode_main.main, ["--kv-memory-mb", "0.001"], "does not hold one page"),
    (decode_main.main, ["--kv-blocks", "-3"], "--kv-blocks must be >= 1"),
    (prefill_main.main, ["--kv-link-gbps", "-1"], "--kv-link-gbps must be >= 0"),
    (prefill_main.main, ["--token-budget", "0"], "token_budget and max_batch_seqs must be >= 1"),
])
def test_bad_settings_stop_the_service_with_a_clear_error(random_checkpoint, capsys, main, flags, message) -> None:
    assert main(["--model", str(random_checkpoint(SPEC)), "--port", "0", *flags]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("variable, value, message", [
    ("HACK_PORT", "abc", "argument --port: invalid int value: 'abc'"),
    ("HACK_KV_BLOCKS", "many", "argument --kv-blocks: invalid int value: 'many'"),
    ("HACK_KV_TIMEOUT_S", "soon", "argument --kv-timeout-s: invalid float value: 'soon'"),
])
def test_bad_environment_values_are_usage_errors(monkeypatch, capsys, variable, value, message):
    from decode_service.main import parse_args

    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as exited:
        parse_args([])
    assert exited.value.code == 2 and message in capsys.readouterr().err
