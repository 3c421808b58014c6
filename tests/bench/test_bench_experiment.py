"""`hack-bench experiment`: metric-snapshot math and the JCT breakdown on hand-made scrapes, the rows, table and
plot, configuration checks, the cluster's clean stop, and one small real run on stories260K clusters."""

import json
import math
import random
import signal
from pathlib import Path

import pytest

from bench.hack_bench import experiment
from bench.hack_bench.breakdown import is_settled, jct_breakdown, parse_metrics, snapshot_delta
from bench.hack_bench.cli import build_parser, main
from bench.hack_bench.experiment import ExperimentConfig, running_cluster
from bench.hack_bench.experiment_report import (Agreement, ExperimentRow, build_row, format_markdown,
                                                output_agreement, plot_experiment)
from bench.hack_bench.metrics import calculate_metrics
from bench.hack_bench.records import BenchmarkError, RequestOutput
from common.cluster import ClusterConfig
from common.kv.config import KVConfig
from common.kv.format import KVLayout
from common.random_models import RandomModelSpec

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def histogram(name: str, total: float, count: int, help_text: str = "h") -> str:
    """A Prometheus text histogram with one bucket, as prometheus_client renders it."""
    return (f"# HELP hack_router_{name} {help_text}\n# TYPE hack_router_{name} histogram\n"
            f'hack_router_{name}_bucket{{le="+Inf"}} {count}\nhack_router_{name}_count {count}\n'
            f"hack_router_{name}_sum {total}\nhack_router_{name}_created 1.7e9\n")


def exposition(sums: dict[str, float], count: int, kv_bytes: float) -> str:
    text = "".join(histogram(name, total, count) for name, total in sums.items())
    text += ("# HELP hack_router_kv_transfer_bytes KV bytes.\n# TYPE hack_router_kv_transfer_bytes counter\n"
             f"hack_router_kv_transfer_bytes_total {kv_bytes}\nhack_router_kv_transfer_bytes_created 1.7e9\n")
    text += ("# HELP hack_router_requests Finished.\n# TYPE hack_router_requests counter\n"
             f'hack_router_requests_total{{status="success"}} {count}\n')
    return text


STAGE_SECONDS = {  # per-request seconds of every timer the breakdown reads
    "e2e_request_latency_seconds": 1.9, "prefill_queue_seconds": 0.07, "prefill_compute_seconds": 0.31,
    "kv_transfer_seconds": 0.45, "decode_kv_wait_seconds": 0.4, "decode_queue_seconds": 0.02,
    "decode_seconds": 1.3, "decode_attention_seconds": 0.55,
}


def test_parse_metrics_keeps_sums_counts_and_labelled_counters() -> None:
    snapshot = parse_metrics(exposition({"decode_seconds": 2.5}, count=3, kv_bytes=12345))
    assert snapshot["hack_router_decode_seconds_sum"] == 2.5
    assert snapshot["hack_router_decode_seconds_count"] == 3
    assert snapshot["hack_router_kv_transfer_bytes_total"] == 12345
    assert snapshot['hack_router_requests_total{status="success"}'] == 3
    assert not any(name.endswith(("_bucket", "_created")) for name in snapshot)


def test_delta_counts_only_the_requests_between_two_scrapes() -> None:
    rng = random.Random()
    before_count, new = rng.randint(1, 50), 17
    before_sums = {name: rng.uniform(0, 100) for name in STAGE_SECONDS}
    after_sums = {name: before_sums[name] + seconds * new for name, seconds in STAGE_SECONDS.items()}
    kv_before = rng.randint(0, 10**6)
    before = parse_metrics(exposition(before_sums, before_count, kv_before))
    after = parse_metrics(exposition(after_sums, before_count + new, kv_before + 29780 * new))
    delta = snapshot_delta(before, after)
    breakdown = jct_breakdown(delta)
    assert breakdown.requests == new
    assert breakdown.queueing_s == pytest.approx(0.07 + 0.02)
    assert breakdown.prefill_s == pytest.approx(0.31)
    assert breakdown.kv_transfer_s == pytest.approx(0.45 - 0.31)  # the part of the push after the forward
    assert breakdown.kv_push_s == pytest.approx(0.45)
    assert breakdown.attention_s == pytest.approx(0.55)
    assert breakdown.decode_s == pytest.approx(1.3 - 0.55)
    assert breakdown.kv_wait_s == pytest.approx(0.4)
    assert breakdown.router_e2e_s == pytest.approx(1.9)
    assert breakdown.kv_bytes_per_request == pytest.approx(29780)
    assert list(breakdown.stages_s()) == ["queueing", "prefill", "kv_transfer", "attention", "decode"]


def test_a_push_hidden_behind_the_forward_adds_no_transfer_time() -> None:
    delta = parse_metrics(exposition({"prefill_compute_seconds": 0.9, "kv_transfer_seconds": 0.8}, 1, 10))
    assert jct_breakdown(delta).kv_transfer_s == 0.0


def test_an_empty_delta_gives_zeros_not_a_division_error() -> None:
    breakdown = jct_breakdown({})
    assert breakdown.requests == 0 and sum(breakdown.stages_s().values()) == 0.0
    assert breakdown.kv_bytes_per_request == 0.0


def test_a_counter_going_down_means_a_restarted_router() -> None:
    with pytest.raises(BenchmarkError, match="did the router restart"):
        snapshot_delta({"hack_router_decode_seconds_count": 5.0}, {"hack_router_decode_seconds_count": 1.0})


def test_settled_once_every_timer_counted_the_finished_requests() -> None:
    complete = parse_metrics(exposition(STAGE_SECONDS, count=3, kv_bytes=1))
    assert is_settled(complete, finished=3) and not is_settled(complete, finished=4)
    late_prefill = {k: v for k, v in complete.items() if "prefill_compute" not in k}
    assert not is_settled(late_prefill, finished=1)


# ------------------------------------------------------------------------------------------ rows and table


def outputs_with_latencies(latencies_s: list[float], tokens: int = 5) -> list[RequestOutput]:
    return [RequestOutput(success=True, generated_text="x", prompt_len=7, output_tokens=tokens, ttft=latency / 4,
                          itl=[latency / 4] * 3, latency=latency) for latency in latencies_s]


def make_row(mode: str, gbps: float, kv_bytes: float, agreement: Agreement | None = None) -> ExperimentRow:
    latencies = [random.uniform(0.5, 2.0) for _ in range(17)]
    metrics = calculate_metrics(outputs_with_latencies(latencies), duration_s=3.0, percentiles=[99.0])
    sums = {name: seconds * 17 for name, seconds in STAGE_SECONDS.items()}
    breakdown = jct_breakdown(parse_metrics(exposition(sums, count=17, kv_bytes=kv_bytes * 17)))
    return build_row(mode, gbps, metrics, breakdown, agreement, ["x"] * 17)


def test_the_breakdown_adds_up_to_the_clients_mean_jct() -> None:
    row = make_row("hack", 10, 29780)
    assert sum(row.breakdown_ms.values()) == pytest.approx(row.mean_jct_ms)
    services_ms = (0.07 + 0.02 + 0.31 + 0.14 + 0.55 + 0.75) * 1000
    assert row.breakdown_ms["other"] == pytest.approx(row.mean_jct_ms - services_ms)
    assert row.p99_jct_ms >= row.mean_jct_ms and row.kv_push_ms == pytest.approx(450)
    assert row.identical_fraction is None and row.mean_first_divergence is None


def test_agreement_counts_identical_outputs_and_first_divergences() -> None:
    def encode(text: str) -> list[int]:  # one token per character: positions are character indices
        return [ord(c) for c in text]

    reference = ["abcde", "abc", "x", "abcdefghij"]
    agreement = output_agreement(reference, ["abcde", "azc", "y", "abcdefghiZ"], encode, output_len=5)
    assert agreement.identical_fraction == pytest.approx(1 / 4)
    # identical -> the output length; 9 characters agree in the last one, capped at the output length
    assert agreement.mean_first_divergence == pytest.approx((5 + 1 + 0 + 5) / 4)
    with pytest.raises(ValueError, match="as many outputs"):
        output_agreement(reference, reference[:2], encode, output_len=5)


def test_markdown_table_has_one_line_per_row_and_the_bytes_ratio_to_fp16() -> None:
    rows = [make_row("fp16", 1, 141_120), make_row("hack", 1, 76_070, Agreement(0.25, 3.75)),
            make_row("hack", 25, 76_070)]
    lines = format_markdown(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    hack = [cell.strip() for cell in lines[3].strip("|").split("|")]
    assert hack[:3] == ["hack", "1", "17/0"]
    assert hack[-4:] == ["76,070", f"{76_070 / 141_120:.3f}", "25%", "3.8"]
    assert lines[4].strip("| ").endswith("76,070 | - | - | -")  # no fp16 run at 25 Gb/s


def test_plot_is_written_as_png(tmp_path: Path) -> None:
    rows = [make_row(mode, gbps, 1000.0) for gbps in (0.1, 1.0) for mode in ("fp16", "dequant", "hack")]
    path = plot_experiment(rows, tmp_path / "experiment.png", "test")
    assert path.read_bytes()[:8] == PNG_MAGIC


# ------------------------------------------------------------------------------------------ configuration


def config(tmp_path: Path, **fields) -> ExperimentConfig:
    text = tmp_path / "text.txt"
    text.write_text("once upon a time " * 10)
    return ExperimentConfig(model="m", dataset_path=text, **fields)


@pytest.mark.parametrize("fields, message", [
    ({"kv_modes": ("hack", "int3")}, "--kv-modes"),
    ({"kv_modes": ("hack", "hack")}, "--kv-modes"),
    ({"kv_modes": ()}, "--kv-modes"),
    ({"link_gbps": (10.0, 0.0)}, "--link-gbps"),
    ({"link_gbps": (math.inf,)}, "--link-gbps"),
    ({"num_prompts": 0}, "--num-prompts"),
    ({"input_len": 0}, "--input-len"),
    ({"output_len": -3}, "--output-len"),
    ({"max_concurrency": 0}, "--max-concurrency"),
    ({"start_timeout_s": 0}, "--start-timeout"),
])
def test_bad_configurations_are_refused(tmp_path: Path, fields: dict, message: str) -> None:
    with pytest.raises(BenchmarkError, match=message):
        config(tmp_path, **fields)


def test_a_missing_text_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BenchmarkError, match="is not a file"):
        ExperimentConfig(model="m", dataset_path=tmp_path / "absent.txt")


def test_fp16_runs_first_and_each_cluster_gets_its_link_and_timer_flags(tmp_path: Path) -> None:
    cfg = config(tmp_path, kv_modes=("hack", "dequant", "fp16"), decode_args=("--kv-memory-mb=64",))
    assert cfg.ordered_modes() == ["fp16", "hack", "dequant"]
    cluster = cfg.cluster("hack", 2.5)
    assert cluster.kv_mode == "hack" and cluster.port == 0
    assert "--kv-link-gbps=2.5" in cluster.prefill_args
    assert cluster.decode_args[-2:] == ("--profile-attention", "--kv-memory-mb=64")
    assert "--profile-attention" not in config(tmp_path, profile_attention=False).cluster("hack", 1).decode_args


def test_cli_defaults() -> None:
    args = build_parser().parse_args(["experiment", "--model", "m", "--dataset-path", "t.txt"])
    assert (args.kv_modes, args.link_gbps) == (["fp16", "dequant", "hack"], [1.0, 10.0, 25.0])
    assert (args.input_len, args.output_len, args.profile_attention) == (448, 64, True)
    with pytest.raises(SystemExit):  # a model is required: --model or --random-model
        build_parser().parse_args(["experiment", "--dataset-path", "t.txt"])


def test_a_random_model_is_written_once_with_the_asked_layers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tiny = RandomModelSpec(hidden_size=32, intermediate_size=48, num_heads=4, num_kv_heads=2, head_dim=8)
    monkeypatch.setitem(experiment.RANDOM_MODEL_SHAPES, "tiny", tiny)
    monkeypatch.setenv("HACK_CACHE_DIR", str(tmp_path))
    directory = experiment.ensure_random_model("tiny", 3)
    assert json.loads((directory / "config.json").read_text())["num_hidden_layers"] == 3
    written = (directory / "model.safetensors").stat().st_mtime_ns
    assert experiment.ensure_random_model("tiny", 3) == directory
    assert (directory / "model.safetensors").stat().st_mtime_ns == written
    assert [p.name for p in tmp_path.iterdir()] == [directory.name]  # no staging directory left behind
    with pytest.raises(BenchmarkError, match="--random-model-layers"):
        experiment.ensure_random_model("tiny", 0)


class FakeCluster:
    instances: list["FakeCluster"] = []

    def __init__(self, config: ClusterConfig) -> None:
        self.config, self.started, self.stopped = config, False, False
        FakeCluster.instances.append(self)

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # a second Ctrl-C cannot cut the stop short
        self.stopped = True


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_the_cluster_is_stopped_on_error_and_interrupt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                       error: BaseException) -> None:
    monkeypatch.setattr(experiment, "Cluster", FakeCluster)
    sigint, sigterm = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(type(error)):
        with running_cluster(config(tmp_path).cluster("fp16", 1.0)) as cluster:
            assert cluster.started
            raise error
    assert cluster.stopped
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == (sigint, sigterm)


# ------------------------------------------------------------------------------------------ a real run


@pytest.mark.slow
def test_real_run_on_stories260k(stories260k: Path, tinystories_text: Path, tmp_path: Path) -> None:
    """fp16 and hack clusters, 3 prompts of 101 tokens (a compressed partition plus an open tail), 6 output
    tokens: KV bytes are exact, the timers add up."""
    status = main(["experiment", "--model", str(stories260k), "--dataset-path", str(tinystories_text),
                   "--kv-modes", "hack", "fp16", "--link-gbps", "2", "--num-prompts", "3", "--input-len", "101",
                   "--output-len", "6", "--result-dir", str(tmp_path), "--label", "small"])
    assert status == 0
    document = json.loads((tmp_path / "small.json").read_text())
    rows = {row["kv_mode"]: row for row in document["rows"]}
    assert [row["kv_mode"] for row in document["rows"]] == ["fp16", "hack"]
    for mode, row in rows.items():
        layout = KVLayout(KVConfig(mode=mode), num_kv_heads=4, head_dim=8)
        assert row["kv_bytes_per_request"] == layout.wire_bytes(101, num_layers=5)
        assert (row["completed"], row["failed"], len(row["generated_texts"])) == (3, 0, 3)
        assert sum(row["breakdown_ms"].values()) == pytest.approx(row["mean_jct_ms"])
        assert all(row["breakdown_ms"][stage] >= 0 for stage in ("queueing", "prefill", "attention", "decode"))
        assert 0 < row["breakdown_ms"]["attention"] < row["mean_jct_ms"]  # CPU decode attention is always timed
    assert rows["fp16"]["identical_fraction"] is None
    # 101-token prompts sit inside the default 16-bit window (128 tokens + the open partition): no fewer bytes than
    # fp16 is the bound there; long prompts are where 2 bits pay (docs/accuracy.md)
    assert rows["hack"]["kv_bytes_per_request"] <= rows["fp16"]["kv_bytes_per_request"]
    assert 0 <= rows["hack"]["identical_fraction"] <= 1 and 0 <= rows["hack"]["mean_first_divergence"] <= 6
    assert document["settings"]["input_len"] == 101 and document["machine"]["cpu_count"] >= 1
    assert (tmp_path / "small.png").read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "small.md").read_text().count("\n") == 4


def test_the_netns_network_leaves_the_pacing_to_tc(tmp_path: Path) -> None:
    assert not any("--kv-link-gbps" in a for a in config(tmp_path, network="netns").cluster("hack", 2.5).prefill_args)
    with pytest.raises(BenchmarkError, match="network"):
        config(tmp_path, network="wifi")
    with pytest.raises(BenchmarkError, match="--link-delay-ms"):
        config(tmp_path, link_delay_ms=5.0)  # a token bucket has no latency to add


@pytest.mark.parametrize("requested, reason, chosen", [
    ("auto", None, "netns"), ("auto", "network namespaces need root", "bucket"), ("bucket", None, "bucket"),
    ("netns", None, "netns"),
])
def test_auto_network_is_netns_where_namespaces_work(monkeypatch: pytest.MonkeyPatch, requested: str,
                                                     reason: str | None, chosen: str) -> None:
    monkeypatch.setattr(experiment, "unavailable_reason", lambda: reason)
    assert experiment.choose_network(requested) == chosen


def test_an_explicit_netns_network_that_cannot_work_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(experiment, "unavailable_reason", lambda: "`tc` is not installed")
    with pytest.raises(BenchmarkError, match="tc"):
        experiment.choose_network("netns")
    assert build_parser().parse_args(["experiment", "--model", "m", "--dataset-path", "t", "--netns"]).network == "netns"


def test_a_netns_link_starts_a_namespace_cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    started: list[tuple] = []

    class FakeNetnsCluster(FakeCluster):
        def __init__(self, config: ClusterConfig, shape: experiment.LinkShape) -> None:
            super().__init__(config)
            started.append((config.kv_mode, shape))

    monkeypatch.setattr(experiment, "NetnsCluster", FakeNetnsCluster)
    shape = experiment.LinkShape(1.0, 2.0)
    with running_cluster(config(tmp_path, network="netns").cluster("fp16", 1.0), shape) as cluster:
        assert cluster.started
    assert cluster.stopped and started == [("fp16", shape)]
