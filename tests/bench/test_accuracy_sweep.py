"""bench/accuracy_sweep.py: what it measures, its resumable results log and its tables (no model runs here)."""
from __future__ import annotations

import dataclasses
import json

import pytest

from bench.accuracy_sweep import (ACCURATE, LAYERS, LLAMA3_8B, PAPER, PREVIOUS, SHORTER_WINDOW, UNSCALED, ResultLog,
                                  Shard,
                                  agreement_configs, agreement_table, byte_shares, bytes_table, layers_table,
                                  mean_wire_share, pareto_front, pareto_table, rotation_configs, stress_configs,
                                  sweep_configs, tune_agreement_configs)
from common.kv.config import PAPER_PARTITION, PAPER_SETTING, KVConfig

SMOLLM2 = {"num_layers": 30, "num_kv_heads": 3, "head_dim": 64}


def test_the_sweep_holds_fp16_the_paper_setting_the_defaults_and_each_technique_alone() -> None:
    configs = sweep_configs()
    assert len(set(configs)) == len(configs)
    assert configs[0] == KVConfig(mode="fp16") and PAPER in configs and KVConfig() in configs
    assert PAPER == KVConfig(partition=PAPER_PARTITION, **PAPER_SETTING) and ACCURATE == KVConfig()
    assert PREVIOUS in configs and PREVIOUS.partition == 64 and PREVIOUS.window == 128
    for change in ({"ranges": "mse"}, {"rotate": True}, {"window": 128}):
        assert dataclasses.replace(PAPER, **change) in configs
    for config in agreement_configs() + stress_configs() + rotation_configs():
        assert config.mode in ("fp16", "hack")
    assert len(set(rotation_configs())) == 8


def test_result_log_runs_each_measurement_once_and_resumes(tmp_path) -> None:
    path = tmp_path / "r.jsonl"
    calls = []
    log = ResultLog(path)
    row = log.get_or_run("tune", PAPER, lambda: calls.append(1) or {"perplexity": 5.0, "tokens": 3, "seconds": 1})
    assert row["kv_config"] == dataclasses.asdict(PAPER) and calls == [1]
    again = ResultLog(path).get_or_run("tune", PAPER, lambda: calls.append(2) or {})
    assert again == row and calls == [1]
    assert ResultLog(path).get("heldout", PAPER) is None
    assert [json.loads(line)["kind"] for line in path.read_text().splitlines()] == ["tune"]
    log.get_or_run("tune", KVConfig(mode="fp16", partition=32), lambda: {"perplexity": 4.0, "tokens": 3})
    assert ResultLog(path).get("tune", KVConfig(mode="fp16"))["perplexity"] == 4.0  # fp16 ignores storage options


def test_shards_split_the_measurements() -> None:
    shards = [Shard("0/2"), Shard("1/2")]
    picks = [[shard.mine() for _ in range(5)] for shard in shards]
    assert picks == [[True, False, True, False, True], [False, True, False, True, False]]
    with pytest.raises(ValueError, match="--shard"):
        Shard("2/2")


def test_pareto_front() -> None:
    assert pareto_front([(20, 5.0), (17, 8.0), (20, 6.0), (100, 4.0), (30, 5.0)]) == [True, True, False, True,
                                                                                       False]


def fake_rows(log: ResultLog, config: KVConfig, tune: float, heldout: float) -> None:
    log.get_or_run("tune", config, lambda: {"perplexity": tune, "tokens": 10})
    log.get_or_run("heldout", config, lambda: {"perplexity": heldout, "tokens": 10, "accuracy": 0.5,
                                               "exact_match": 0.25})


def test_pareto_table_rows_compare_with_fp16(tmp_path) -> None:
    log = ResultLog(tmp_path / "r.jsonl")
    fake_rows(log, KVConfig(mode="fp16"), 4.0, 8.0)
    fake_rows(log, PAPER, 5.0, 12.0)
    fake_rows(log, ACCURATE, 4.1, 8.2)
    lines = pareto_table(log, SMOLLM2).splitlines()
    assert len(lines) == 5 and lines[2].startswith("| `--kv-mode fp16` | 8.000 | +0.0% | 4.000 | +0.0% | 50.0% | 25.0% ")
    paper = next(line for line in lines if "--window 0" in line)
    assert "| 12.000 | +50.0% | 5.000 | +25.0% |" in paper and paper.endswith("| yes |")
    accurate = next(line for line in lines if line.startswith("| `--kv-mode hack` "))
    assert "| 8.200 | +2.5% | 4.100 | +2.5% |" in accurate and "| 19.62 | 22.95 |" in accurate


def test_byte_shares_at_4096_tokens() -> None:
    # Llama-3-8B shape, 2 bits, Π=64: 4 sinks, 63 quantized partitions, a 60-token tail (see docs/accuracy.md)
    assert round(byte_shares(PAPER, 32, 8, 128)[0], 2) == 16.96
    assert round(byte_shares(PREVIOUS, 32, 8, 128)[0], 2) == 19.59
    # Π=128 and a 192-token window: fewer wire bytes at 4,096 tokens than Π=64 and 128; 160 tokens (the defaults
    # before) have the same wire bytes there and less memory; token scales (the defaults) add a byte per token
    wire, memory = byte_shares(UNSCALED, 32, 8, 128)
    assert round(wire, 2) == 19.44 and round(memory, 2) == 22.75
    assert byte_shares(SHORTER_WINDOW, 32, 8, 128) == (wire, byte_shares(PREVIOUS, 32, 8, 128)[1])
    assert mean_wire_share(SHORTER_WINDOW, 32, 8, 128) < mean_wire_share(UNSCALED, 32, 8, 128) < 20
    wire, memory = byte_shares(ACCURATE, 32, 8, 128)
    assert round(wire, 2) == 19.62 and round(memory, 2) == 22.95 and mean_wire_share(ACCURATE, 32, 8, 128) < 20
    assert byte_shares(ACCURATE, **SMOLLM2)[0] < 20  # the measured model's own shape too
    table = bytes_table()
    assert "| `--kv-mode hack` | 117.5 | 100.5 | 22.95 | 19.62 |" in table


def test_agreement_table_joins_held_out_and_tuning_rows(tmp_path) -> None:
    log = ResultLog(tmp_path / "r.jsonl")
    row = {"mean_first_divergence": 20.5, "identical_fraction": 0.25, "max_tokens": 64, "prompts": 32,
           "token_agreement": 0.9, "median_divergence_margin": 0.31, "median_margin": 4.5}
    log.get_or_run("agreement", ACCURATE, lambda: row)
    log.get_or_run("tune_agreement", ACCURATE, lambda: {**row, "prompts": 16, "mean_first_divergence": 30.0})
    old = {k: v for k, v in row.items() if k not in ("token_agreement", "median_divergence_margin", "median_margin")}
    log.get_or_run("tune_agreement", PAPER, lambda: old)  # a row from before the teacher-forced measures
    lines = agreement_table(log).splitlines()
    assert len(lines) == 4 and set(agreement_configs()) <= set(tune_agreement_configs())
    assert lines[2].startswith("| `--kv-mode hack --partition 64 --ranges minmax --window 0 --no-rotate "
                               "--no-token-scales` | - | - | - | - | - | 20.5 / 64 | 25% | - | 32 |")
    assert lines[3].startswith("| `--kv-mode hack` | 20.5 / 64 | 25% | 90.0% | 0.31 (all: 4.50) | 32 "
                               "| 30.0 / 64 | 25% | 90.0% | 16 | 19.62 |")


def test_mean_wire_share_counts_the_window_over_whole_partition_cycles() -> None:
    # one length can hide a window's cost: 128 and 176 tokens both leave 3,904 quantized tokens at 4,096
    wider = dataclasses.replace(SHORTER_WINDOW, window=176)
    assert byte_shares(wider, **LLAMA3_8B)[0] == byte_shares(SHORTER_WINDOW, **LLAMA3_8B)[0]
    assert mean_wire_share(SHORTER_WINDOW, **LLAMA3_8B) < mean_wire_share(wider, **LLAMA3_8B)
    assert round(mean_wire_share(PAPER, **LLAMA3_8B, lengths=64), 2) < round(byte_shares(PAPER, **LLAMA3_8B)[0], 2)


def test_layers_table_ranks_the_layers_that_carry_the_loss(tmp_path) -> None:
    log = ResultLog(tmp_path / "r.jsonl")
    assert layers_table(log) == "(not measured)"
    changes = {"all layers": 0.04, "all layers, K only": 0.025, "all layers, V only": 0.02,
               "layer 0": 0.0004, "layer 1": 0.009, "layer 2": -0.0002, "layer 3": 0.003}
    rows = [{"scope": name, "perplexity": 10 * (1 + change), "change": change} for name, change in changes.items()]
    log.get_or_run("layers", LAYERS, lambda: {"fp16_perplexity": 10.0, "rows": rows, "tokens": 100})
    lines = layers_table(log).splitlines()
    assert lines[2] == "| nothing (fp16 KV) | 10.000 | +0.00% |"
    assert [line.split(" | ")[0] for line in lines[3:]] == [
        "| all layers", "| all layers, K only", "| all layers, V only", "| layer 1 alone", "| layer 3 alone",
        "| each of the other 2 layers alone"]
    assert lines[-1].endswith("| -0.02% to +0.04% |") and "| 10.090 | +0.90% |" in lines[6]


def test_rows_measured_before_a_later_option_keep_their_configuration(tmp_path) -> None:
    """A results row without token_scales (measured before the option existed) is the configuration without
    them, not the new default's."""
    path = tmp_path / "r.jsonl"
    old = {k: v for k, v in dataclasses.asdict(UNSCALED).items() if k != "token_scales"}
    path.write_text(json.dumps({"kind": "heldout", "perplexity": 5.0, "kv_config": old}) + "\n")
    log = ResultLog(path)
    assert log.get("heldout", UNSCALED)["perplexity"] == 5.0 and log.get("heldout", ACCURATE) is None
