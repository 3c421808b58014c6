"""Compiled CPU kernels (csrc/*.c): built on first use with the machine's C compiler, cached, loaded with ctypes.

Why: the torch ops of cpu_ops.py must unpack a call's codes into float tensors before a matmul can read them, so
a 2-bit cache is read as 32-bit values (16x its bytes) and decode attention stays slower than SDPA on fp32 K/V
until contexts are long. The C kernels read the packed bytes and fp16 group parameters in place, page by page,
and keep the unpacked codes in registers: decode reads what the cache holds.

Build: `cc -O3 -march=native -fopenmp-simd -shared -fPIC` (about a second), into
`$HACK_CACHE_DIR/native/<hash of source, compiler flags and CPU flags>/`, written atomically, so a cache shared
by different machines never serves code built for another CPU. No Python or torch headers are involved. Without
a C compiler, or with HACK_NATIVE=0, `library()` is None (logged once) and cpu_ops runs its torch ops.
Calls release the GIL (ctypes), so a batch's (sequence, KV head) pairs run in torch.get_num_threads() ranges.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from common.default_model import cache_dir

log = logging.getLogger(__name__)
SOURCE = Path(__file__).parent / "csrc" / "paged_attention.c"
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-shared", "-fPIC", "-std=c11"]


class Geometry(ctypes.Structure):
    """csrc/paged_attention.c's Geometry: one layer's pool and a decode batch; `bits` is the width of the codes
    the call reads (K's for hack_paged_scores, V's for hack_paged_pv: key_bits may differ), `exp_shift` the bit
    of its token-exponent nibble in kv_exp (0 for K, 4 for V; read only with token scales)."""

    _fields_ = [(name, ctypes.c_int64) for name in
                ("heads", "head_dim", "bits", "partition", "head_part", "block_size", "rows", "max_pages",
                 "exp_shift")]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return os.uname().machine


def _build(compiler: str) -> Path:
    key = hashlib.sha256("\n".join([SOURCE.read_text(), compiler, *FLAGS, _cpu_flags()]).encode()).hexdigest()[:16]
    target = cache_dir() / "native" / key / "libhackcpu.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"], capture_output=True,
                                text=True)
        if result.returncode:
            raise RuntimeError(f"{compiler} failed on {SOURCE.name}: {result.stderr.strip()[-2000:]}")
        os.replace(built, target)
    return target


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None where they cannot be built (the reason is logged once)."""
    if os.environ.get("HACK_NATIVE", "1") == "0":
        log.info("native CPU kernels off (HACK_NATIVE=0): attention runs the torch ops")
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found (install gcc, or set CC): CPU attention runs the slower torch ops")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError) as error:
        log.warning("native CPU kernels unavailable, CPU attention runs the slower torch ops: %s", error)
        return None
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.hack_paged_scores.argtypes = [ctypes.POINTER(Geometry)] + [pointer] * 8 + [i64] * 3
    lib.hack_paged_pv.argtypes = [ctypes.POINTER(Geometry)] + [pointer] * 7 + [i64, pointer, i64, i64]
    for fn in (lib.hack_paged_scores, lib.hack_paged_pv):
        fn.restype = None
    lib.hack_paged_vnni.argtypes, lib.hack_paged_vnni.restype = [ctypes.POINTER(Geometry)], ctypes.c_int
    return lib


def uses_vnni(geometry: Geometry) -> tuple[bool, bool]:
    """Whether q·k and P·V take their AVX512-VNNI paths for this geometry (else portable C loops): q·k for 2- or
    4-bit codes, P·V for 2-bit codes, both given head_dim % 64 == 0 and 16-channel q partitions."""
    lib = library()
    paths = lib.hack_paged_vnni(ctypes.byref(geometry)) if lib is not None else 0
    return bool(paths & 1), bool(paths & 2)


@functools.cache
def _executor(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="hack-native")


def _run_split(fn, args: tuple, pairs: int) -> None:
    """fn(*args, start, end) over [0, pairs) in torch.get_num_threads() contiguous ranges at once."""
    workers = max(1, min(torch.get_num_threads(), pairs))
    if workers == 1:
        fn(*args, 0, pairs)
        return
    bounds = [pairs * i // workers for i in range(workers + 1)]
    futures = [_executor(workers).submit(fn, *args, bounds[i], bounds[i + 1]) for i in range(workers)]
    for future in futures:
        future.result()


def _ptr(t: torch.Tensor, dtype: torch.dtype) -> int:
    if t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(f"native kernels need contiguous CPU {dtype} tensors, got {t.dtype} {tuple(t.shape)}")
    return t.data_ptr()


def _token_exp(cache: dict[str, torch.Tensor]) -> int | None:
    """The kv_exp bytes of a pool with token scales, else NULL."""
    return _ptr(cache["kv_exp"], torch.uint8) if "kv_exp" in cache else None


def hack_paged_scores(geometry: Geometry, cache: dict[str, torch.Tensor], block_tables: torch.Tensor,
                       n_paged: torch.Tensor, q: torch.Tensor, scores: torch.Tensor) -> None:
    """q·k of the paged tokens into scores [BH, R, L] (columns t < n_paged[b] of each row written; the caller
    passes a column slice of a wider contiguous tensor), q [BH, R, D] float32 scaled queries; times each token's
    K 2^e where the cache holds token scales (kv_exp)."""
    if scores.stride(-1) != 1 or scores.stride(1) != scores.stride(0) // geometry.rows:
        raise ValueError("scores must be a column slice of a contiguous [BH, R, L] tensor")
    lib = library()
    args = (ctypes.byref(geometry), _ptr(cache["k_codes"], torch.uint8), _ptr(cache["k_scale"], torch.float16),
            _ptr(cache["k_min"], torch.float16), _token_exp(cache), _ptr(block_tables, torch.int32),
            _ptr(n_paged, torch.int64), _ptr(q, torch.float32), scores.data_ptr(), scores.stride(1))
    _run_split(lib.hack_paged_scores, args, q.shape[0])


def hack_paged_pv(geometry: Geometry, cache: dict[str, torch.Tensor], block_tables: torch.Tensor,
                   n_paged: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """P·V of the paged tokens: probs [BH, R, L] (a column slice of a contiguous tensor) -> [BH, R, D]; P times
    each token's V 2^e before it is quantized where the cache holds token scales (kv_exp)."""
    if probs.stride(-1) != 1 or probs.stride(1) != probs.stride(0) // geometry.rows:
        raise ValueError("probs must be a column slice of a contiguous [BH, R, L] tensor")
    out = torch.empty(probs.shape[0], geometry.rows, geometry.head_dim)
    lib = library()
    args = (ctypes.byref(geometry), _ptr(cache["v_codes"], torch.uint8), _ptr(cache["v_scale"], torch.float16),
            _ptr(cache["v_min"], torch.float16), _token_exp(cache), _ptr(block_tables, torch.int32),
            _ptr(n_paged, torch.int64), probs.data_ptr(), probs.stride(1), out.data_ptr())
    _run_split(lib.hack_paged_pv, args, probs.shape[0])
    return out
