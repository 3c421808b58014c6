"""Attention on the HACK cache: homomorphic kernels vs the dequant baseline vs torch SDPA on fp16 KV.

    .venv/bin/python -m bench.kernels [--write docs/benchmarks.md]   # CUDA: the Triton kernels
    .venv/bin/python -m bench.kernels --device cpu --quick [--write docs/benchmarks.md]   # no GPU

Every method runs through `ops.dispatch`, i.e. exactly what the KV backends run: the Triton kernels on CUDA,
the vectorized torch ops of torch_fast.py on CPU (HACK_KV_OPS=reference: the torch reference; the table says
which ran). Shapes are Llama-3-8B's (32 query heads, 8 KV heads, head_dim 128), one layer.
  * Decode: one new token per sequence over `context` cached tokens on shuffled pages, for every batch ×
    context: time, bytes each method must read, the bandwidth that implies, and speedups. Decode is memory
    bound, so the device's copy bandwidth, measured first, is the ceiling to compare with.
  * Prefill: one sequence of `context` tokens attending causally to itself: the HACK prefill kernel (and the
    quantize-and-append that stores the prompt) vs SDPA's causal fp16 attention.
On CUDA each measurement replays a CUDA graph (no launch overhead) after flushing L2 (no hits left over from
the previous repetition); on CPU it is wall time. The cache holds random codes and scales: the kernels' speed
does not depend on the values.
"""
from __future__ import annotations

import argparse
import platform
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
QUICK = dict(contexts=[256, 1024], batches=[1, 4], prefill=[128, 512])
WARMUP = 3
GIB = 1024**3


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------


def measure(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median seconds of fn over reps runs (after warmup)."""
    fn()
    if device.type != "cuda":
        times = []
        for i in range(WARMUP + reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
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


def decode_row(setup: Setup, batch: int, context: int, bandwidth: float) -> str:
    layout = setup.layout
    fp16_bytes = batch * layout.fp16_bytes(context)
    if fp16_bytes > setup.max_fp16_gib * GIB:
        return f"| {batch} | {context:,} | skipped: fp16 KV of {fp16_bytes / GIB:.0f} GiB > --max-fp16-gib |"
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=setup.dtype, device=setup.device)
    times = _time_compressed_decode(setup, q, context)  # frees its cache before SDPA's fp16 K/V are allocated
    times["sdpa"] = _time_sdpa_decode(setup, q, context)
    read = {"hack": batch * bytes_read(layout, context, True), "dequant": batch * bytes_read(layout, context, False),
            "sdpa": fp16_bytes}
    cells = [f"{times[m] * 1e6:,.0f}" for m in times] + [f"{read[m] / 2**20:,.1f}" for m in times]
    cells += [f"{_fmt(read[m] / times[m] / 1e9)} ({read[m] / times[m] / bandwidth:.0%})" for m in times]
    cells += [f"{_fmt(times['sdpa'] / times['hack'])}x", f"{_fmt(times['dequant'] / times['hack'])}x"]
    return f"| {batch} | {context:,} | " + " | ".join(cells) + " |"


def _time_compressed_decode(setup: Setup, q: torch.Tensor, context: int) -> dict[str, float]:
    batch = q.shape[0]
    paged = random_paged_cache(setup.layout, batch, context, setup.device)
    cu_q = torch.arange(batch + 1, device=setup.device)
    args = (q, cu_q, paged.seq_lens, paged.block_tables, paged.state_slots, paged.cache, setup.config,
            HEAD_DIM**-0.5)
    hack, dequant = setup.op("hack_attention"), setup.op("dequant_attention")
    return {"hack": measure(lambda: hack(*args), setup.device, setup.reps),
            "dequant": measure(lambda: dequant(*args), setup.device, setup.reps)}


def _time_sdpa_decode(setup: Setup, q: torch.Tensor, context: int) -> float:
    shape = (q.shape[0], NUM_KV_HEADS, context, HEAD_DIM)
    k, v = (torch.randn(shape, dtype=setup.dtype, device=setup.device) for _ in "kv")
    q4 = q.unsqueeze(2)
    return measure(lambda: sdpa(q4, k, v), setup.device, setup.reps)


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


def prefill_row(setup: Setup, context: int) -> str:
    layout, device, scale = setup.layout, setup.device, HEAD_DIM**-0.5
    paged = random_paged_cache(layout, 1, context, device)
    q = torch.randn(context, NUM_HEADS, HEAD_DIM, dtype=setup.dtype, device=device)
    k, v = (torch.randn(context, NUM_KV_HEADS, HEAD_DIM, dtype=setup.dtype, device=device) for _ in "kv")
    cu, num_cached = torch.tensor([0, context], device=device), torch.zeros_like(paged.seq_lens)
    state = (paged.block_tables, paged.state_slots, paged.cache, setup.config)
    store, hack = setup.op("store_compressed_kv"), setup.op("hack_attention")
    store_s = measure(lambda: store(k, v, cu, num_cached, *state), device, setup.reps)
    hack_s = measure(lambda: hack(q, cu, paged.seq_lens, *state, scale), device, setup.reps)
    q4, k4, v4 = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    sdpa_s = measure(lambda: sdpa(q4, k4, v4, causal=True), device, setup.reps)
    flops = 2 * 2 * NUM_HEADS * HEAD_DIM * context * (context + 1) / 2  # QKᵀ and PV over the causal half
    return (f"| {context:,} | {_fmt(hack_s * 1e3)} | {_fmt(store_s * 1e3)} | {_fmt(sdpa_s * 1e3)} "
            f"| {_fmt(flops / hack_s / 1e12)} | {_fmt(flops / sdpa_s / 1e12)} | {_fmt(sdpa_s / hack_s)}x "
            f"| {_fmt(sdpa_s / (hack_s + store_s))}x |")


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------

DECODE_HEADER = [
    "| batch | context | HACK µs | dequant µs | SDPA µs | HACK MiB | dequant MiB | fp16 MiB | HACK GB/s "
    "| dequant GB/s | SDPA GB/s | HACK vs SDPA | HACK vs dequant |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
]
PREFILL_HEADER = [
    "| context | HACK attention ms | HACK store ms | SDPA ms | HACK TFLOP/s | SDPA TFLOP/s | HACK vs SDPA "
    "| HACK + store vs SDPA |",
    "|---|---|---|---|---|---|---|---|",
]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


IMPLEMENTATIONS = {  # module of the dispatched op -> how the report names it
    "common.kv.ops": "the Triton kernels",
    "common.kv.torch_fast": "the vectorized torch ops (torch_fast.py)",
    "common.kv.reference": "the torch reference",
}


def implementation(device: torch.device) -> str:
    """What ops.dispatch runs hack attention with on this device (HACK_KV_OPS and TRITON_INTERPRET apply)."""
    module = ops.dispatch("hack_attention", device).__module__
    if module == "common.kv.ops" and device.type != "cuda":
        return "the Triton kernels in Triton's interpreter"
    return IMPLEMENTATIONS[module]


def report_header(setup: Setup, bandwidth: float, quick: bool) -> list[str]:
    cfg, device = setup.config, setup.device
    lines = [f"{device_name(device)}; HACK and dequant run {implementation(device)}, SDPA "
             f"{str(setup.dtype).removeprefix('torch.')} K/V. Copy bandwidth {bandwidth / 1e9:,.0f} GB/s. Llama-3-8B "
             f"attention ({NUM_HEADS} query heads, {NUM_KV_HEADS} KV heads, head_dim {HEAD_DIM}), one layer; KV "
             f"{cfg.bits}-bit, partition {cfg.partition}, key axis {cfg.key_axis}, {cfg.num_sinks} sinks, pages of "
             f"{cfg.block_size} tokens. Median of {setup.reps}. Command: `python -m bench.kernels"
             f"{' --device cpu --quick' if quick else ''}`."]
    if device.type != "cuda":
        lines.append(f"No GPU: these rows time {implementation(device)}, not the Triton kernels; the GPU table "
                     "comes from running the command on a CUDA machine.")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes (what a CPU can run)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 50 on CUDA, 3 on CPU)")
    parser.add_argument("--partition", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=0, help="tokens per page (0: the partition)")
    parser.add_argument("--max-fp16-gib", type=float, default=24.0, help="skip decode cases whose fp16 KV is larger")
    parser.add_argument("--write", help="markdown file whose kernels section to replace")
    args = parser.parse_args()
    device = torch.device(args.device)
    sizes = QUICK if args.quick else FULL
    torch.manual_seed(0)
    reps = args.reps or (50 if device.type == "cuda" else 3)
    setup = Setup(device, torch.float16 if device.type == "cuda" else torch.float32,
                  KVConfig(partition=args.partition, block_size=args.block_size), reps, args.max_fp16_gib)
    bandwidth = copy_bandwidth(device, reps)
    lines = report_header(setup, bandwidth, args.quick)
    lines += ["", "Decode (one new token per sequence; GB/s: bytes read / time, in parentheses the share of the "
              "copy bandwidth):", "", *DECODE_HEADER]
    print("\n".join(lines))
    for batch in sizes["batches"]:
        for context in sizes["contexts"]:
            lines.append(decode_row(setup, batch, context, bandwidth))
            print(lines[-1], flush=True)
    lines += ["", "Prefill (one sequence, causal):", "", *PREFILL_HEADER]
    print("\n".join(lines[-5:]))
    for context in sizes["prefill"]:
        lines.append(prefill_row(setup, context))
        print(lines[-1], flush=True)
    if args.write:
        write_section(args.write, SECTION, "\n".join(lines))

if __name__ == "__main__":
    main()
