"""bench/kernels.py's JSON rows and bench/gpu_check.sh's dry run (the timings themselves are not tested)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import kernels

ROOT = Path(__file__).resolve().parents[2]


def test_json_rows_cover_every_mode(capsys, tmp_path):
    report = tmp_path / "bench.md"
    kernels.main(["--device", "cpu", "--json", "--contexts", "70", "--batches", "2", "--prefill", "67", "--reps", "1",
                  "--write", str(report)])
    out = capsys.readouterr()
    rows = [json.loads(line) for line in out.out.splitlines()]
    assert {(r["op"], r["mode"]) for r in rows} == {("decode", "hack"), ("decode", "dequant"), ("decode", "sdpa"),
                                                  ("prefill", "hack"), ("prefill", "dequant"), ("prefill", "sdpa"),
                                                  ("prefill", "store")}
    for row in rows:
        assert set(row) == {"device", "clock", "op", "mode", "batch", "context", "us", "bytes_read"}
        assert row["us"] > 0 and row["bytes_read"] > 0
    decode = {r["mode"]: r for r in rows if r["op"] == "decode"}
    assert decode["hack"]["bytes_read"] < decode["sdpa"]["bytes_read"] and decode["hack"]["batch"] == 2
    assert "| 2 | 70 |" in out.err and "HACK / SDPA time" in report.read_text()


def test_key_bits_rows_read_wider_keys(capsys):
    decode = {}
    for key_bits in (0, 4):
        kernels.main(["--device", "cpu", "--json", "--contexts", "300", "--batches", "1", "--prefill", "--reps", "1",
                      "--key-bits", str(key_bits)])
        out = capsys.readouterr()
        rows = [json.loads(line) for line in out.out.splitlines()]
        decode[key_bits] = next(r for r in rows if r["mode"] == "hack")
        assert ("(K 4-bit)" in out.err) == (key_bits == 4)
    assert decode[4]["bytes_read"] > decode[0]["bytes_read"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_gpu_check_script_parses_and_dry_runs():
    script = ROOT / "bench" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    done = subprocess.run(["bash", str(script), "--dry-run"], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr
    assert "== kernel-tests" in done.stdout and "== kernels" in done.stdout and "== experiment" in done.stdout
