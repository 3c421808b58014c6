"""Attention on the HACK cache: homomorphic kernels vs the dequant baseline vs torch SDPA on fp16 KV.

    .venv/bin/python -m bench.kernels [--write docs/benchmarks.md]   # CUDA: the Triton kernels
    .venv/bin/python -m bench.kernels --device cpu [--json] [--write docs/benchmarks.md]   # no GPU

Every method runs through `ops.dispatch`, i.e. exactly what the KV backends run: the Triton kernels on CUDA,
the vectorized torch ops of torch_fast.py on CPU (HACK_KV_OPS=reference: the torch reference; the table says
which ran). Shapes are Llama-3-8B's (32 query heads, 8 KV heads, head_dim 128), one layer. `--json` prints one
JSON object per measurement (op, mode, batch, context, us, bytes_read) on stdout and the table on stderr.
  * Decode: one new token per sequence over `context` cached tokens on shuffled pages, for every batch ×
    context: time, bytes each method must read, the bandwidth that implies, and speedups. Decode is memory
    bound, so the device's copy bandwidth, measured first, is the ceiling to compare with.
  * Prefill: one sequence of `context` tokens attending causally to itself: HACK's attention on the codes and
    the dequant baseline (and the quantize-and-append that stores the prompt) vs SDPA's causal attention.
On CUDA each measurement replays a CUDA graph (no launch overhead) after flushing L2 (no hits left over from
the previous repetition); on CPU it is wall time, the methods of a row timed in turn, repetition by
repetition, so that a change in the machine's load hits them alike (the median of each is reported). The
cache holds random codes and scales: the kernels' speed does not depend on the values.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.report import write_section
from common.kv import ops
from common.kv.config import KVConfig
from common.kv.format import KVLayout
from common.kv.pool import KVPool
from common.kv.reference import stored_split

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama-3-8B
SECTION = "Kernels (bench/kernels.py)"
FULL = dict(contexts=[1024, 4096, 16384, 32768, 131072], batches=[1, 8, 32],
            prefill=[1024, 2048, 4096, 8192, 16384, 32768])
CPU = dict(contexts=[1024, 4096, 16384], batches=[1], prefill=[512, 2048, 8192])
QUICK = dict(contexts=[256, 1024], batches=[1, 4], prefill=[128, 512])
WARMUP = 3
GIB = 1024**3
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # cpu: this process's CPU time (all threads)
clock = CLOCKS["wall"]


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------


def measure(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median seconds of fn over reps runs (after warmup)."""
    fn()
    if device.type != "cuda":
        times = []
        for i in range(WARMUP + reps):
            start = clock()
            fn()
            times.append(clock() - start)
        return statistics.median(times[WARMUP:])
    torch.cuda.synchronize(device)
    run = _cuda_graph(fn) or fn
    props = torch.cuda.get_device_properties(device)
    flush = torch.empty(2 * getattr(props, "L2_cache_size", 128 * 1024**2), dtype=torch.int8, device=device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for i in range(WARMUP + reps):
        flush.zero_()  # evict the previous repetition's data from L2
        if i >= WARMUP:
            events[i - WARMUP][0].record()
        run()
        if i >= WARMUP:
            events[i - WARMUP][1].record()
    torch.cuda.synchronize(device)
    return statistics.median(start.elapsed_time(end) for start, end in events) / 1e3


def measure_all(fns: dict[str, Callable[[], object]], device: torch.device, reps: int,
                warmup: int = WARMUP) -> dict[str, float]:
    """Median seconds of each fn. On CPU the fns run in turn within each repetition (a load change on a shared
    machine then hits all of them alike); on CUDA each is measured on its own (graphs, L2 flush)."""
    if device.type == "cuda":
        return {name: measure(fn, device, reps) for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + reps):
        for name, fn in fns.items():
            start = clock()
            fn()
            if i >= warmup:
                times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _cuda_graph(fn: Callable[[], object]) -> Callable[[], None] | None:
    """fn captured in a CUDA graph (its replay), or None when fn cannot be captured."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as error:
        print(f"  (no CUDA graph, timing with launches: {error})")
        return None
    return graph.replay


def copy_bandwidth(device: torch.device, reps: int) -> float:
    """Bytes/s of a device-to-device copy (read + write) of a buffer far larger than the caches."""
    size = GIB if device.type == "cuda" else 256 * 1024**2
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * size / measure(lambda: dst.copy_(src), device, reps)


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PagedInputs:
    cache: dict[str, torch.Tensor]
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    state_slots: torch.Tensor


def random_paged_cache(layout: KVLayout, batch: int, context: int, device: torch.device) -> PagedInputs:
    """A one-layer pool holding `batch` sequences of `context` tokens on shuffled pages, random contents."""
    per_seq = layout.blocks_for(context)
    pool = KVPool(layout, 1, batch * per_seq, batch, device)
    cache = pool.layers[0]
    for name, t in cache.items():
        if t.dtype == torch.uint8:
            t.random_(0, 256)
        elif not t.dtype.is_floating_point:
            t.random_(0, 64)
        elif name.endswith("_scale"):
            t.uniform_(0.02, 0.1)
        else:
            t.normal_()
    pages = torch.randperm(batch * per_seq, device=device).view(batch, per_seq).int()
    seq_lens = torch.full((batch,), context, dtype=torch.int64, device=device)
    return PagedInputs(cache, seq_lens, pages, torch.arange(batch, device=device))


def bytes_read(layout: KVLayout, context: int, with_sums: bool) -> int:
    """KV bytes attention reads for one sequence: its stored page rows plus its 16-bit sinks and tail."""
    sinks, paged, tail = stored_split(context, layout.config)
    pages = sum(f.nbytes(layout.num_kv_heads, paged) for f in layout.page_fields(with_sums=with_sums))
    return pages + 2 * (sinks + tail) * layout.num_kv_heads * layout.head_dim * 2


# ---------------------------------------------------------------------------------------------------------------
# Decode and prefill
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    device: torch.device
    dtype: torch.dtype  # queries and the SDPA baseline's K/V
    config: KVConfig
    reps: int
    max_fp16_gib: float

    @property
    def layout(self) -> KVLayout:
        return KVLayout(self.config, NUM_KV_HEADS, HEAD_DIM)

    def op(self, name: str) -> Callable:
        return ops.dispatch(name, self.device)


@dataclass
class Row:
    """A table row and its measurements as JSON records (op, mode, batch, context, us, bytes_read)."""

    line: str
    records: list[dict]


def records(op: str, batch: int, context: int, times: dict[str, float], read: dict[str, int]) -> list[dict]:
    return [{"op": op, "mode": mode, "batch": batch, "context": context, "us": round(times[mode] * 1e6, 1),
             "bytes_read": read[mode]} for mode in times]


def decode_row(setup: Setup, batch: int, context: int, bandwidth: float) -> Row:
    layout = setup.layout
    sdpa_bytes = batch * layout.fp16_bytes(context) // 2 * setup.dtype.itemsize
    if sdpa_bytes > setup.max_fp16_gib * GIB:
        return Row(f"| {batch} | {context:,} | skipped: SDPA K/V of {sdpa_bytes / GIB:.0f} GiB > --max-fp16-gib |",
                   [])
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=setup.dtype, device=setup.device)
    times = _time_decode(setup, q, context)
    read = {"hack": batch * bytes_read(layout, context, True), "dequant": batch * bytes_read(layout, context, False),
            "sdpa": sdpa_bytes}
    cells = [f"{times[m] * 1e6:,.0f}" for m in times] + [f"{read[m] / 2**20:,.1f}" for m in times]
    cells += [f"{_fmt(read[m] / times[m] / 1e9)} ({read[m] / times[m] / bandwidth:.0%})" for m in times]
    cells += [f"{_fmt(times['hack'] / times['sdpa'])}", f"{_fmt(times['hack'] / times['dequant'])}"]
    return Row(f"| {batch} | {context:,} | " + " | ".join(cells) + " |", records("decode", batch, context, times, read))


def _time_decode(setup: Setup, q: torch.Tensor, context: int) -> dict[str, float]:
    """hack, dequant and SDPA decode times. On CUDA the compressed cache is freed before SDPA's K/V are
    allocated (the largest rows fill the device); on CPU all three are timed in turn."""
    batch = q.shape[0]
    paged = random_paged_cache(setup.layout, batch, context, setup.device)
    cu_q = torch.arange(batch + 1, device=setup.device)
    args = (q, cu_q, paged.seq_lens, paged.block_tables, paged.state_slots, paged.cache, setup.config,
            HEAD_DIM**-0.5)
    hack, dequant = setup.op("hack_attention"), setup.op("dequant_attention")
    fns = {"hack": lambda: hack(*args), "dequant": lambda: dequant(*args)}
    if setup.device.type == "cuda":
        times = measure_all(fns, setup.device, setup.reps)
        del paged, args, fns
        return times | measure_all(_sdpa_decode(setup, q, context), setup.device, setup.reps)
    return measure_all(fns | _sdpa_decode(setup, q, context), setup.device, setup.reps)


def _sdpa_decode(setup: Setup, q: torch.Tensor, context: int) -> dict[str, Callable[[], object]]:
    shape = (q.shape[0], NUM_KV_HEADS, context, HEAD_DIM)
    k, v = (torch.randn(shape, dtype=setup.dtype, device=setup.device) for _ in "kv")
    q4 = q.unsqueeze(2)
    return {"sdpa": lambda: sdpa(q4, k, v)}


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """torch SDPA with GQA on [B, H, L, D] tensors; on CUDA restricted to the fused kernels (FlashAttention,
    cuDNN), which read each KV head once, so the baseline never silently expands K/V for its query heads."""
    if q.device.type != "cuda":
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


def _fmt(x: float) -> str:
    """Three significant digits, thousands separated: 1,234 / 56.7 / 0.0123."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def prefill_row(setup: Setup, context: int) -> Row:
    layout, device, scale = setup.layout, setup.device, HEAD_DIM**-0.5
    paged = random_paged_cache(layout, 1, context, device)
    q = torch.randn(context, NUM_HEADS, HEAD_DIM, dtype=setup.dtype, device=device)
    k, v = (torch.randn(context, NUM_KV_HEADS, HEAD_DIM, dtype=setup.dtype, device=device) for _ in "kv")
    cu, num_cached = torch.tensor([0, context], device=device), torch.zeros_like(paged.seq_lens)
    state = (paged.block_tables, paged.state_slots, paged.cache, setup.config)
    store, hack, dequant = (setup.op(name) for name in ("store_compressed_kv", "hack_attention", "dequant_attention"))
    q4, k4, v4 = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    fns = {"hack": lambda: hack(q, cu, paged.seq_lens, *state, scale),
           "dequant": lambda: dequant(q, cu, paged.seq_lens, *state, scale),
           "sdpa": lambda: sdpa(q4, k4, v4, causal=True),
           "store": lambda: store(k, v, cu, num_cached, *state)}
    times = measure_all(fns, device, setup.reps, warmup=1 if device.type == "cpu" else WARMUP)
    flops = 2 * 2 * NUM_HEADS * HEAD_DIM * context * (context + 1) / 2  # QKᵀ and PV over the causal half
    read = {"hack": bytes_read(layout, context, True), "dequant": bytes_read(layout, context, False),
            "sdpa": layout.fp16_bytes(context) // 2 * setup.dtype.itemsize, "store": layout.fp16_bytes(context)}
    hack_s, sdpa_s = times["hack"], times["sdpa"]
    line = (f"| {context:,} | {_fmt(hack_s * 1e3)} | {_fmt(times['dequant'] * 1e3)} | {_fmt(times['store'] * 1e3)} "
            f"| {_fmt(sdpa_s * 1e3)} | {_fmt(flops / hack_s / 1e12)} | {_fmt(flops / sdpa_s / 1e12)} "
            f"| {_fmt(hack_s / sdpa_s)} | {_fmt(hack_s / times['dequant'])} | {_fmt((hack_s + times['store']) / sdpa_s)} |")
    return Row(line, records("prefill", 1, context, times, read))


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------

DECODE_HEADER = [
    "| batch | context | HACK µs | dequant µs | SDPA µs | HACK MiB | dequant MiB | SDPA MiB | HACK GB/s "
    "| dequant GB/s | SDPA GB/s | HACK / SDPA time | HACK / dequant time |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
]
PREFILL_HEADER = [
    "| context | HACK attention ms | dequant attention ms | HACK store ms | SDPA ms | HACK TFLOP/s | SDPA TFLOP/s "
    "| HACK / SDPA time | HACK / dequant time | (HACK + store) / SDPA time |",
    "|---|---|---|---|---|---|---|---|---|---|",
]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


IMPLEMENTATIONS = {  # module of the dispatched op -> how the report names it
    "common.kv.ops": "the Triton kernels",
    "common.kv.torch_fast": "the vectorized torch ops (torch_fast.py)",
    "common.kv.cpu_ops": "the CPU ops (cpu_ops.py)",
    "common.kv.reference": "the torch reference",
}


def implementation(device: torch.device) -> str:
    """What ops.dispatch runs hack attention with on this device (HACK_KV_OPS and TRITON_INTERPRET apply)."""
    module = ops.dispatch("hack_attention", device).__module__
    if module == "common.kv.ops" and device.type != "cuda":
        return "the Triton kernels in Triton's interpreter"
    return IMPLEMENTATIONS[module]


def clock_name() -> str:
    return "process CPU time" if clock is CLOCKS["cpu"] else "wall time"


def report_header(setup: Setup, bandwidth: float, command: str) -> list[str]:
    cfg, device = setup.config, setup.device
    lines = [f"{device_name(device)}; HACK and dequant run {implementation(device)}, SDPA "
             f"{str(setup.dtype).removeprefix('torch.')} K/V. Copy bandwidth {bandwidth / 1e9:,.0f} GB/s. Llama-3-8B "
             f"attention ({NUM_HEADS} query heads, {NUM_KV_HEADS} KV heads, head_dim {HEAD_DIM}), one layer; KV "
             f"{cfg.bits}-bit{f' (K {cfg.k_bits}-bit)' if cfg.k_bits != cfg.bits else ''}"
             f"{', token scales' if cfg.token_scales else ''}, partition {cfg.partition}, key axis {cfg.key_axis}, {cfg.num_sinks} sinks, pages of "
             f"{cfg.block_size} tokens. Median of {setup.reps} ({clock_name()}). Command: `{command}`."]
    if device.type != "cuda":
        lines.append(f"No GPU: these rows time {implementation(device)}, not the Triton kernels; the GPU table "
                     "comes from running the command on a CUDA machine.")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--contexts", type=int, nargs="+", help="decode contexts (default: by device)")
    parser.add_argument("--batches", type=int, nargs="+", help="decode batch sizes (default: by device)")
    parser.add_argument("--prefill", type=int, nargs="*", help="prefill lengths (default: by device)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 50 on CUDA, 5 on CPU)")
    parser.add_argument("--partition", type=int, default=64)
    parser.add_argument("--key-bits", type=int, default=0, choices=(0, 2, 4, 8),
                        help="K codes of their own width (KVConfig.key_bits; 0: V's 2 bits)")
    parser.add_argument("--token-scales", action=argparse.BooleanOptionalAction, default=KVConfig.token_scales,
                        help="a power of two per token and head (KVConfig.token_scales; default %(default)s)")
    parser.add_argument("--block-size", type=int, default=0, help="tokens per page (0: the partition)")
    parser.add_argument("--max-fp16-gib", type=float, default=24.0, help="skip decode cases whose SDPA K/V is larger")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="CPU: time by wall clock or by this process's CPU time (steady on a machine whose "
                             "cores other jobs share; with one thread it is the op's own compute time)")
    parser.add_argument("--json", action="store_true", help="JSON lines on stdout (one per measurement), table on stderr")
    parser.add_argument("--write", help="markdown file whose kernels section to replace")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    global clock
    clock = CLOCKS[args.clock]
    sizes = dict(QUICK if args.quick else FULL if device.type == "cuda" else CPU)
    sizes |= {key: getattr(args, key) for key in sizes if getattr(args, key) is not None}
    torch.manual_seed(0)
    reps = args.reps or (50 if device.type == "cuda" else 5)
    setup = Setup(device, torch.float16 if device.type == "cuda" else torch.float32,
                  KVConfig(partition=args.partition, block_size=args.block_size, key_bits=args.key_bits,
                           token_scales=args.token_scales), reps, args.max_fp16_gib)
    table = sys.stderr if args.json else sys.stdout
    command = "python -m bench.kernels " + " ".join(sys.argv[1:] if argv is None else argv)
    bandwidth = copy_bandwidth(device, reps)
    lines = report_header(setup, bandwidth, command.strip())
    lines += ["", "Decode (one new token per sequence; GB/s: bytes read / time, in parentheses the share of the "
              "copy bandwidth):", "", *DECODE_HEADER]
    print("\n".join(lines), file=table, flush=True)

    def emit(row: Row) -> None:
        lines.append(row.line)
        print(row.line, file=table, flush=True)
        if args.json:
            for record in row.records:
                print(json.dumps({"device": device.type, "clock": args.clock} | record), flush=True)

    for batch in sizes["batches"]:
        for context in sizes["contexts"]:
            emit(decode_row(setup, batch, context, bandwidth))
    if sizes["prefill"]:
        lines += ["", "Prefill (one sequence, causal):", "", *PREFILL_HEADER]
        print("\n".join(lines[-5:]), file=table, flush=True)
        for context in sizes["prefill"]:
            emit(prefill_row(setup, context))
    if args.write:
        write_section(args.write, SECTION, "\n".join(lines))


if __name__ == "__main__":
    main()
