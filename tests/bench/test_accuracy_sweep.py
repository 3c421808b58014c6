"""bench/accuracy_sweep.py: what it measures, its resumable results log and its tables (no model runs here)."""
from __future__ import annotations

import json

from bench.accuracy_sweep import (ResultLog, ablation_configs, agreement_configs, base_of, grid_configs,
                                  llama3_bytes_table, perplexity_table, sink_configs)
from common.kv.config import KVConfig


def test_every_ablation_differs_from_a_grid_row_in_one_setting() -> None:
    grid = grid_configs()
    assert len(grid) == 1 + 2 * 2 * 3 * 2 and len(set(grid)) == len(grid)
    for config in ablation_configs() + agreement_configs() + sink_configs():
        assert base_of(config) in grid
        changed = [f for f in KVConfig.__dataclass_fields__ if getattr(config, f) != getattr(base_of(config), f)]
        assert len(changed) <= 1


def test_result_log_runs_each_measurement_once_and_resumes(tmp_path) -> None:
    path = tmp_path / "r.jsonl"
    calls = []
    log = ResultLog(path)
    row = log.get_or_run("perplexity", KVConfig(num_sinks=0), lambda: calls.append(1) or {"perplexity": 5.0,
                                                                                          "tokens": 3, "seconds": 1})
    assert row["flags"] == "--kv-mode hack --num-sinks 0" and calls == [1]
    again = ResultLog(path).get_or_run("perplexity", KVConfig(num_sinks=0), lambda: calls.append(2) or {})
    assert again == row and calls == [1]
    assert [json.loads(line)["kind"] for line in path.read_text().splitlines()] == ["perplexity"]


def fake_row(config: KVConfig, perplexity: float, kv_bytes: int) -> dict:
    return {"perplexity": perplexity, "context": 10, "kv_bytes": kv_bytes, "kv_wire_bytes": kv_bytes // 2,
            "fp16_kv_bytes": 1000, "kv_config": config.__dict__}


def test_perplexity_tables_compare_with_fp16_and_with_the_grid_row() -> None:
    hack = KVConfig(mode="hack", key_axis="token")
    rows = [fake_row(KVConfig(mode="fp16"), 4.0, 1000), fake_row(hack, 5.0, 300),
            fake_row(KVConfig(mode="hack", key_axis="token", num_sinks=0), 5.5, 290)]
    grid = perplexity_table(rows, ablations=False).splitlines()
    assert len(grid) == 4
    assert grid[3] == "| hack | 2 | 64 | token | - | 5.000 | +25.0% | 30 | 15 | 30.0 | 15.0 |"
    ablations = perplexity_table(rows, ablations=True).splitlines()
    assert ablations[2] == "| hack | 2 | 64 | token | --num-sinks 0 | 5.500 | +10.0% | 29 | 14 | 29.0 | 14.5 |"


def test_llama3_table_states_the_two_bit_wire_share() -> None:
    # one layer, 8 KV heads x head_dim 128, 4096 tokens = 4 sinks + 63 partitions of 64 + a 60-token tail:
    # a page chunk is 2 x 16,384 B of codes + 4 x 2,048 B of scales/minimums + 34 B of header and CRC;
    # the state chunk is 64 fp16 tokens of K and V = 262,144 B + 34 B
    assert 63 * (2 * 16_384 + 4 * 2_048 + 34) + 262_144 + 34 == 2_844_800
    table = llama3_bytes_table(4096)
    assert "| 2 | 64 | 96.5 | 86.8 | 18.85 | 16.96 |" in table
    assert "2,844,800 bytes on the wire vs 16,777,216 bytes of fp16 K and V = **16.96%**" in table
    # sums: 8 B per token and head (K: 2 partitions, V: 128 channels / 64 tokens, int16) on top of 80 B of codes,
    # scales and minimums, and the 16-bit sinks and open partition
    assert "+9.0% memory" in table
