"""bench/choices.py end to end on a tiny random model: both ways run, the counters show one prefill per n-choice
request against n for the separate requests, and the table is written into a markdown section."""
from __future__ import annotations

import pytest
import torch

from bench import choices

pytestmark = pytest.mark.slow


def test_the_benchmark_counts_one_prefill_for_n_choices(random_checkpoint, tmp_path, capsys) -> None:
    out = tmp_path / "benchmarks.md"
    assert choices.main(["--model", str(random_checkpoint()), "--n", "1", "3", "--prompt-len", "24",
                         "--output-len", "2", "--repeats", "1", "--text", str(tmp_path / "absent.txt"),
                         "--write", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 3 |")]
    assert len(rows) == 1 and rows[0].split("|")[6].strip() == "1 / 3"  # prefills: shared / separate
    assert "## n choices (bench/choices.py)" in out.read_text()


def test_bad_arguments_are_refused(capsys) -> None:
    with pytest.raises(SystemExit):
        choices.parse_args(["--n", "0"])
    assert "must be >= 1" in capsys.readouterr().err


def test_fork_costs_time_each_mode_and_leave_the_thread_count_alone() -> None:
    threads = torch.get_num_threads()
    rows = choices.fork_costs((17,), (2,), repeats=1).splitlines()[2:]
    assert [row.split("|")[1].strip() for row in rows] == ["hack", "fp16"]
    assert torch.get_num_threads() == threads
