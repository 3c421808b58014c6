"""`hack-bench serve` and `hack-bench compare` end to end, through `main`, against the fake SSE server."""

import contextlib
import io
import json
from pathlib import Path

import pytest

from bench.hack_bench.cli import SUBCOMMANDS, build_parser, main

PROMPTS = ["w1 w2 w3", "w4 HTTP400", "w5", "w6 w7 MIDSTREAM_ERROR", "w8 w9 w10 w11", "w12 NO_DONE", "w13 w14"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _serve_args(server, tokenizer_dir: Path, prompts: Path, result_dir: Path) -> list[str]:
    return [
        "serve", "--base-url", server.base_url, "--tokenizer", str(tokenizer_dir),
        "--dataset-name", "text", "--dataset-path", str(prompts), "--num-prompts", "7", "--text-output-len", "5",
        "--request-rate", "300", "--max-concurrency", "3", "--ignore-eos", "--goodput", "ttft:10000", "tpot:10000",
        "--metric-percentiles", "50,99.9", "--metadata", "kv_mode=hack", "--label", "fake",
        "--save-result", "--result-dir", str(result_dir), "--result-filename", "run.json", "--disable-tqdm",
    ]


@pytest.fixture(scope="module")
def serve_run(
    fake_server, tiny_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict, str, Path]:
    """One saved `serve` run over 7 text prompts, 3 of which fail in different ways: (result, stdout, path)."""
    directory = tmp_path_factory.mktemp("serve_run")
    prompts = directory / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(_serve_args(fake_server, tiny_tokenizer_dir, prompts, directory / "results")) == 0
    result_path = directory / "results" / "run.json"
    return json.loads(result_path.read_text()), printed.getvalue(), result_path


def test_serve_counts_successes_failures_and_tokens(serve_run) -> None:
    result, _, _ = serve_run
    assert (result["completed"], result["failed"]) == (4, 3)
    assert result["output_lens"] == [5, 0, 5, 0, 5, 0, 5]
    assert result["input_lens"] == [3, 2, 1, 3, 4, 2, 2]
    assert (result["total_input_tokens"], result["total_output_tokens"]) == (10, 20)
    assert result["error_summary"] == {
        "HTTP 400: prompt rejected": 1,
        "error event in stream: decode worker crashed": 1,
        "stream ended without [DONE]": 1,
    }
    assert result["errors"][1] == "HTTP 400: prompt rejected" and result["errors"][0] == ""
    assert result["request_goodput"] == pytest.approx(4 / result["duration"])
    assert result["output_throughput"] == pytest.approx(20 / result["duration"])


def test_serve_result_has_vllm_keys_and_run_settings(serve_run) -> None:
    result, _, _ = serve_run
    for name in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std", "p50", "p99.9"):
            assert result[f"{stat}_{name}_ms"] >= 0
    assert 0 < result["median_ttft_ms"] <= result["p99.9_ttft_ms"] <= result["p99.9_e2el_ms"]
    assert result["model_id"] == "fake-model"  # discovered from /v1/models
    assert (result["kv_mode"], result["label"], result["backend"]) == ("hack", "fake", "openai")
    assert (result["request_rate"], result["max_concurrency"], result["ignore_eos"]) == (300.0, 3, True)
    assert [len(itl) for itl in result["itls"]][::2] == [4, 4, 4, 4]
    assert sum(result["timeline"]["output_tokens_per_s"]) * result["timeline"]["bin_s"] == pytest.approx(20)


def test_serve_prints_the_table_and_writes_plots(serve_run) -> None:
    _, printed, result_path = serve_run
    assert "============ Serving Benchmark Result ============" in printed
    assert "Successful requests:                     4" in printed
    assert "Failed requests:                         3" in printed
    assert "Request goodput (req/s):" in printed and "P99.9 TTFT (ms):" in printed
    assert "1 x stream ended without [DONE]" in printed
    for suffix in ("latency_cdf", "throughput"):
        png = result_path.with_name(f"run_{suffix}.png")
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000


def test_compare_prints_ratios_and_draws_one_plot(serve_run, tmp_path: Path, capsys) -> None:
    result, _, result_path = serve_run
    slower = tmp_path / "slower.json"
    slower.write_text(json.dumps({**result, "kv_mode": "fp16", "output_throughput": result["output_throughput"] / 2}))
    plot = tmp_path / "cmp" / "compare.png"
    assert main(["compare", str(result_path), str(slower), "--plot", str(plot)]) == 0
    printed = capsys.readouterr().out
    header, rule, *rows = printed.splitlines()[:-1]
    assert header.split() == ["Metric", "hack", "fp16"]
    throughput_row = next(row for row in rows if row.startswith("Output token throughput"))
    assert "(x0.50)" in throughput_row
    assert any(row.startswith("P99.9 E2EL (ms)") for row in rows)
    assert plot.read_bytes()[:8] == PNG_MAGIC


def test_compare_reports_unreadable_files(tmp_path: Path, capsys) -> None:
    (tmp_path / "broken.json").write_text("{not json")
    assert main(["compare", str(tmp_path / "broken.json")]) == 2
    assert "cannot read result file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--goodput", "latency:5"], "--goodput takes METRIC:MS"),
        (["--metric-percentiles", "0"], "--metric-percentiles must be in (0, 100]"),
        (["--percentile-metrics", "ttft,speed"], "--percentile-metrics takes names"),
        (["--metadata", "novalue"], "--metadata takes KEY=VALUE"),
        (["--endpoint", "/v1/chat/completions", "--prompt-format", "token-ids"], "token-id prompts need"),
        (["--dataset-name", "random"], "needs a tokenizer"),
    ],
)
def test_serve_rejects_bad_arguments_with_a_clear_error(server, extra: list[str], message: str, capsys) -> None:
    args = ["serve", "--base-url", server.base_url, "--model", "fake-model", "--dataset-name", "text",
            "--dataset-path", __file__, "--num-prompts", "1", "--disable-tqdm", *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_serve_random_dataset_over_chat(server, tiny_tokenizer_dir: Path, capsys) -> None:
    args = ["serve", "--base-url", server.base_url, "--endpoint", "/v1/chat/completions",
            "--model", str(tiny_tokenizer_dir), "--served-model-name", "fake-model",
            "--dataset-name", "random", "--random-input-len", "17", "--random-output-len", "3",
            "--num-prompts", "4", "--disable-tqdm"]
    assert main(args) == 0
    assert "Successful requests:                     4" in capsys.readouterr().out
    chat_payloads = server.payloads[-4:]
    assert all(len(p["messages"][0]["content"].split()) == 17 for p in chat_payloads)
    assert {p["max_completion_tokens"] for p in chat_payloads} == {3}


def test_serve_takes_the_tokenizer_from_the_servers_model_entry(server, tiny_tokenizer_dir: Path, capsys) -> None:
    server.app.state.model_root = str(tiny_tokenizer_dir)
    try:
        args = ["serve", "--base-url", server.base_url, "--dataset-name", "random", "--random-input-len", "9",
                "--random-output-len", "2", "--num-prompts", "2", "--disable-tqdm"]
        assert main(args) == 0
    finally:
        server.app.state.model_root = None
    out = capsys.readouterr().out
    assert f"tokenizer: {tiny_tokenizer_dir}" in out and "Successful requests:                     2" in out


def test_subcommands_are_registered_in_one_list() -> None:
    assert [c.name for c in SUBCOMMANDS] == ["serve", "compare", "experiment", "soak"]
    assert build_parser().parse_args(["compare", "a.json"]).command == "compare"

