"""The results of `hack-bench experiment`: one row per (KV mode, link bandwidth), a markdown table and a plot.

A row joins what the client measured (mean and p99 JCT = end-to-end latency), the services' own breakdown of
that time (breakdown.py), the KV bytes each request pushed, and how close the mode's greedy outputs came to the
fp16 run's on the same prompts.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from bench.hack_bench.breakdown import STAGES, JCTBreakdown
from bench.hack_bench.metrics import MS_PER_S, BenchmarkMetrics
from common.eval.agreement import first_divergence

OTHER = "other"  # client-seen time outside the services' stages: router, HTTP, gRPC hops
STAGE_TITLES = {"queueing": "queueing", "prefill": "prefill", "kv_transfer": "KV transfer",
                "attention": "attention (dequant/approx)", "decode": "decode (rest)", OTHER: "router + other"}
DPI = 120


@dataclass(frozen=True)
class Agreement:
    """Greedy outputs of a mode against the fp16 run's on the same prompts."""

    identical_fraction: float  # outputs whose text equals fp16's
    mean_first_divergence: float  # index of the first differing token (the output length when identical)


def output_agreement(reference: Sequence[str], outputs: Sequence[str], encode: Callable[[str], list[int]],
                     output_len: int) -> Agreement:
    """Compare generated texts. The OpenAI API returns text, so token positions come from re-encoding it,
    which can differ from the generated ids by a token where pieces merge: positions are capped at output_len."""
    if len(reference) != len(outputs) or not outputs:
        raise ValueError(f"need as many outputs as reference outputs (> 0), got {len(outputs)} and {len(reference)}")
    identical = [a == b for a, b in zip(reference, outputs)]
    divergences = [output_len if same else min(first_divergence(encode(a), encode(b)), output_len)
                   for a, b, same in zip(reference, outputs, identical)]
    return Agreement(sum(identical) / len(outputs), float(np.mean(divergences)))


@dataclass(frozen=True)
class ExperimentRow:
    kv_mode: str
    link_gbps: float
    completed: int
    failed: int
    mean_jct_ms: float
    p99_jct_ms: float
    mean_ttft_ms: float
    mean_tpot_ms: float
    breakdown_ms: dict[str, float]  # STAGES then OTHER; adds up to mean_jct_ms
    kv_push_ms: float  # push opened -> acknowledged, overlapping the forward
    kv_bytes_per_request: float
    identical_fraction: float | None  # None without an fp16 run at this bandwidth
    mean_first_divergence: float | None
    generated_texts: list[str]


def build_row(kv_mode: str, link_gbps: float, metrics: BenchmarkMetrics, breakdown: JCTBreakdown,
              agreement: Agreement | None, generated_texts: list[str]) -> ExperimentRow:
    """One row; `other` is the client's mean JCT minus the services' stages, so the breakdown adds up."""
    jct = metrics.latencies["e2el"]
    stages_ms = {stage: seconds * MS_PER_S for stage, seconds in breakdown.stages_s().items()}
    stages_ms[OTHER] = jct.mean - sum(stages_ms.values())
    return ExperimentRow(
        kv_mode=kv_mode,
        link_gbps=link_gbps,
        completed=metrics.completed,
        failed=metrics.failed,
        mean_jct_ms=jct.mean,
        p99_jct_ms=jct.percentiles[99.0],
        mean_ttft_ms=metrics.latencies["ttft"].mean,
        mean_tpot_ms=metrics.latencies["tpot"].mean,
        breakdown_ms=stages_ms,
        kv_push_ms=breakdown.kv_push_s * MS_PER_S,
        kv_bytes_per_request=breakdown.kv_bytes_per_request,
        identical_fraction=agreement.identical_fraction if agreement else None,
        mean_first_divergence=agreement.mean_first_divergence if agreement else None,
        generated_texts=generated_texts,
    )


# ----------------------------------------------------------------------------------------------- table


TABLE_COLUMNS = ("KV mode", "link Gb/s", "ok/failed", "mean JCT ms", "p99 JCT ms",
                 *(f"{STAGE_TITLES[s]} ms" for s in (*STAGES, OTHER)),
                 "KV push ms", "KV bytes/req", "vs fp16", "identical", "1st divergence")


def format_markdown(rows: Sequence[ExperimentRow]) -> str:
    """A markdown table, one line per row; `vs fp16` is the KV bytes ratio to fp16 at the same bandwidth."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for row in rows:
        cells = [row.kv_mode, f"{row.link_gbps:g}", f"{row.completed}/{row.failed}", f"{row.mean_jct_ms:.1f}",
                 f"{row.p99_jct_ms:.1f}", *(f"{row.breakdown_ms[s]:.1f}" for s in (*STAGES, OTHER)),
                 f"{row.kv_push_ms:.1f}", f"{row.kv_bytes_per_request:,.0f}", _bytes_ratio(row, rows),
                 _fraction(row.identical_fraction), _number(row.mean_first_divergence)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _bytes_ratio(row: ExperimentRow, rows: Sequence[ExperimentRow]) -> str:
    fp16 = next((r for r in rows if r.kv_mode == "fp16" and r.link_gbps == row.link_gbps), None)
    if fp16 is None or not fp16.kv_bytes_per_request:
        return "-"
    return f"{row.kv_bytes_per_request / fp16.kv_bytes_per_request:.3f}"


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


# ------------------------------------------------------------------------------------------------ plot


def plot_experiment(rows: Sequence[ExperimentRow], path: Path, title: str) -> Path:
    """Left: the mean JCT of every row as stacked stages, p99 JCT marked. Right: KV push time against link
    bandwidth per mode (log-log), where the compressed modes' smaller KV shows up."""
    figure = Figure(figsize=(max(12.0, 6 + 0.75 * len(rows)), 6), layout="constrained")
    breakdown_ax, transfer_ax = figure.subplots(1, 2, width_ratios=(2, 1))
    _draw_breakdown(breakdown_ax, rows)
    _draw_transfer(transfer_ax, rows)
    figure.suptitle(title)
    figure.savefig(path, dpi=DPI)
    return path


def _draw_breakdown(ax: Axes, rows: Sequence[ExperimentRow]) -> None:
    # A gap between bandwidths groups the modes of one bandwidth together.
    groups = np.cumsum([i > 0 and row.link_gbps != rows[i - 1].link_gbps for i, row in enumerate(rows)])
    positions = np.arange(len(rows)) + 0.5 * groups
    bottom = np.zeros(len(rows))
    for stage in (*STAGES, OTHER):
        values = np.array([max(row.breakdown_ms[stage], 0.0) for row in rows])
        ax.bar(positions, values, 0.7, bottom=bottom, label=STAGE_TITLES[stage])
        bottom += values
    ax.scatter(positions, [row.p99_jct_ms for row in rows], marker="_", s=400, color="black", zorder=3,
               label="p99 JCT")
    ax.set_xticks(positions, [f"{row.kv_mode}\n{row.link_gbps:g}" for row in rows], fontsize="small")
    ax.set_xlabel("KV mode, emulated KV link (Gb/s)")
    ax.set_ylabel("ms per request")
    ax.set_title("Mean JCT and where it went (services' own timers)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", ncols=2)


def _draw_transfer(ax: Axes, rows: Sequence[ExperimentRow]) -> None:
    for mode in dict.fromkeys(row.kv_mode for row in rows):
        points = sorted((row.link_gbps, row.kv_push_ms, row.breakdown_ms["kv_transfer"]) for row in rows
                        if row.kv_mode == mode)
        gbps, push, exposed = (np.array(values) for values in zip(*points))
        kib = np.mean([row.kv_bytes_per_request for row in rows if row.kv_mode == mode]) / 1024
        line = ax.plot(gbps, push, marker="o", label=f"{mode} push ({kib:,.0f} KiB/req)")[0]
        ax.plot(gbps, np.maximum(exposed, 1e-3), marker="x", linestyle="--", color=line.get_color(),
                label=f"{mode} exposed")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("emulated KV link (Gb/s)")
    ax.set_ylabel("ms per request")
    ax.set_title("KV push time (exposed = beyond the forward)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=2)
