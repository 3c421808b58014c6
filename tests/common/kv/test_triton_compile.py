"""Every Triton kernel compiles for Hopper (sm_90), checked on any machine: no GPU needed.

The interpreter runs the kernels' arithmetic but not the compiler's rules (layouts, dot shapes and dtypes,
constexpr control flow). So a subprocess (where @triton.jit builds real kernels, not interpreted ones) calls
every launcher on CPU tensors with launches captured instead of run, and compiles each captured kernel ahead
of time to a cubin with the ptxas that ships with Triton. Run this file as a script to do the same by hand.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]
TARGET_ARCH = 90
TORCH_TO_TRITON = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "uint8": "u8", "int8": "i8",
                   "int16": "i16", "int32": "i32", "int64": "i64"}
LAUNCH_OPTIONS = ("num_warps", "num_stages")


def test_kernels_compile_for_hopper():
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    result = subprocess.run([sys.executable, __file__], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=500)
    if result.returncode == 3:
        pytest.skip(result.stdout.strip())
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "compiled" in result.stdout


def _capture_launches() -> list[tuple]:
    """Replace JITFunction.run: kernel[grid](...) records (kernel, args, kwargs) instead of launching."""
    from triton.runtime.jit import JITFunction

    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    JITFunction.run = record
    return launches


def _signature(kernel, args: tuple, kwargs: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, options) of a captured launch, in ASTSource's terms."""
    import torch

    options = {name: kwargs.pop(name) for name in LAUNCH_OPTIONS if name in kwargs}
    bound = kernel.signature.bind(*args, **kwargs)
    bound.apply_defaults()
    signature, constexprs = {}, {}
    for param in kernel.params:
        value = bound.arguments[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + TORCH_TO_TRITON[str(value.dtype).removeprefix("torch.")]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if abs(value) < 2**31 else "i64"
        else:
            signature[param.name] = "fp32"
    return signature, constexprs, options


def _launch_every_kernel() -> None:
    """Call every launcher on configurations that take each compile-time branch (captured, not run)."""
    import torch

    from common.kv import triton_decode_attention as decode
    from common.kv import triton_dequant_decode as dequant
    from common.kv import triton_dequant_prefill as dequant_prefill
    from common.kv import triton_prefill_attention as prefill
    from common.kv import triton_quantize_append as append
    from common.kv.config import PAPER_SETTING, KVConfig
    from tests.common.kv.triton_support import cumulative, random_batch

    # config, KV heads, query heads per KV head, head_dim, decode splits (0: no decode launch), whole set
    cases = [  # every compile-time branch at least once, and no more compiles than that (~3 s each)
        (KVConfig(**PAPER_SETTING, partition=64, key_axis="channel", num_sinks=4), 8, 4, 128, 3, True),  # Llama-3-8B, default format
        (KVConfig(**PAPER_SETTING, partition=32, bits=8, key_axis="token", num_sinks=0, sum_elimination=False,
                  requant_elimination=False), 2, 8, 64, 1, True),
        (KVConfig(**(PAPER_SETTING | {"token_scales": True}), partition=64, num_sinks=4, key_bits=4), 8,
         4, 128, 3, False),  # the same with 4-bit keys over 2-bit values and token scales
        (KVConfig(partition=32, key_axis="token", num_sinks=0, window=8, key_bits=4), 4, 2, 8, 1, False),  # tiny
        # heads (no tl.dot), K codes of their own width
    ]
    for config, num_kv_heads, group, head_dim, splits, everything in cases:
        batch, _ = random_batch(config, num_kv_heads, head_dim, [1, 70], seed=0)
        scale = head_dim**-0.5
        state = (batch.block_tables, batch.state_slots, batch.cache, config)
        q = torch.randn(71, num_kv_heads * group, head_dim, dtype=torch.float16)
        prefill.hack_prefill_attention(q, cumulative([1, 70]), batch.seq_lens, *state, scale)
        decode.hack_decode_attention(q[:2], batch.seq_lens, *state, scale, num_splits=splits)
        if everything:
            k = torch.randn(3, num_kv_heads, head_dim, dtype=torch.bfloat16)
            append.quantize_append(k, k, cumulative([1, 2]), batch.seq_lens, *state)
            dequant.dequant_decode_attention(q[:2], batch.seq_lens, *state, scale, num_splits=splits)
            dtype = torch.bfloat16 if head_dim == 128 else torch.float16  # bf16 dots for the bf16 Llama-3-8B
            dequant_prefill.dequant_prefill_attention(q.to(dtype), cumulative([1, 70]), batch.seq_lens, *state, scale)

def main() -> int:
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        import triton
    except ImportError as error:
        print(f"triton's compiler is not available: {error}")
        return 3
    launches = _capture_launches()
    _launch_every_kernel()
    seen = set()
    for kernel, args, kwargs in launches:
        signature, constexprs, options = _signature(kernel, args, dict(kwargs))
        key = (kernel.fn.__name__, tuple(signature.items()), tuple(constexprs.items()), tuple(options.items()))
        if key in seen:
            continue
        seen.add(key)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", TARGET_ARCH, 32),
                                  options=options)
        assert compiled.asm["cubin"], kernel.fn.__name__
        print(f"compiled {kernel.fn.__name__} for sm_{TARGET_ARCH}: {compiled.metadata.num_warps} warps, "
              f"{compiled.metadata.shared} bytes shared memory, {constexprs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
