"""ops.dispatch routing, and the paged backends running end to end on the Triton kernels.

The backends reach every kernel through ops: a hack or dequant backend that prefills a mixed batch, decodes and
prefills a chunk with the kernels must store the same bytes as with the reference and attend within tolerance.
"""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from common.kv import cpu_ops, ops, reference, torch_fast
from common.kv.config import PAPER_SETTING, KVConfig
from common.kv.factory import make_kv_backend
from common.kv.interface import ForwardBatch
from tests.common.kv.triton_support import (
    DEVICE, FP16_ATTENTION, HOMOMORPHIC, KERNEL_MODULES, ON_GPU, assert_attention_close, fresh_seed, import_kernels,
    interpret,
)

for _module in KERNEL_MODULES:  # the lazily imported kernels must be the interpreted ones on CPU
    import_kernels(_module)


def test_cuda_tensors_run_the_kernels_and_cpu_tensors_the_torch_fast_paths(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("HACK_KV_OPS", raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert ops.dispatch("hack_attention", cuda) is ops.triton_hack_attention
    assert ops.dispatch("store_compressed_kv", cuda) is ops.triton_store_compressed_kv
    assert ops.dispatch("dequant_attention", cuda) is ops.triton_dequant_attention
    assert ops.dispatch("fp16_attention", cuda) is torch_fast.fp16_attention
    assert ops.dispatch("hack_attention", cpu) is cpu_ops.hack_attention
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.dispatch("hack_attention", cpu) is ops.triton_hack_attention
    assert ops.dispatch("causal_attention", cpu) is reference.causal_attention


def test_register_overrides_a_route(monkeypatch):
    monkeypatch.setattr(ops, "_registered", {})
    ops.register("cuda", "hack_attention", reference.hack_attention)
    assert ops.dispatch("hack_attention", torch.device("cuda")) is reference.hack_attention
    with pytest.raises(ValueError, match="unknown KV op"):
        ops.dispatch("flash_attention", torch.device("cuda"))


@pytest.mark.usefixtures(interpret.__name__)
def test_head_dim_without_a_kernel_falls_back_to_the_reference(caplog):
    config = KVConfig(**PAPER_SETTING, partition=32)
    backend = make_kv_backend(config, SimpleNamespace(num_layers=1, num_heads=2, num_kv_heads=1, head_dim=12),
                              DEVICE, torch.float32, max_tokens=64)
    batch = ForwardBatch.build([0], [0], [5], DEVICE)
    backend.reserve(batch)
    q, k = torch.randn(5, 2, 12, device=DEVICE), torch.randn(5, 1, 12, device=DEVICE)
    with caplog.at_level(logging.WARNING, logger=ops.__name__):
        out = backend.attend(0, q, k, k, batch)
    assert out.shape == q.shape and not out.isnan().any()
    assert "head_dim=12 is not a power of two" in caplog.text


STEPS = [([0, 1], [0, 0], [17, 130]), ([0, 1], [17, 130], [1, 1]), ([1, 0], [131, 18], [1, 40])]


def _route(monkeypatch: pytest.MonkeyPatch, to_kernels: bool, calls: list[str]) -> None:
    """Send the kernel ops of DEVICE to the Triton kernels (counting calls) or to the reference."""
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    routes = {}
    for name, kernel_op in ops.TRITON_OPS.items():
        def counted(*args, _op=kernel_op, _name=name):
            calls.append(_name)
            return _op(*args)
        routes[(DEVICE.type, name)] = counted if to_kernels else getattr(reference, name)
    monkeypatch.setattr(ops, "_registered", routes)


@pytest.mark.parametrize("config, tolerance", [
    pytest.param(KVConfig(**PAPER_SETTING, mode="hack", partition=32, block_size=64, num_sinks=2), HOMOMORPHIC, id="hack"),
    pytest.param(KVConfig(**PAPER_SETTING, mode="dequant", partition=64, bits=4, key_axis="channel"), FP16_ATTENTION, id="dequant"),
    # the default format (window, mse ranges, rotation): the store falls back to torch_fast, attention stays on the
    # kernels (a multi-token dequant forward on triton_dequant_prefill)
    pytest.param(KVConfig(mode="dequant", partition=32, window=40), FP16_ATTENTION, id="dequant-default-format"),
])
def test_backend_on_kernels_matches_backend_on_reference(monkeypatch, config, tolerance):
    shape = SimpleNamespace(num_layers=1, num_heads=8, num_kv_heads=2, head_dim=64)
    backends = {kernels: make_kv_backend(config, shape, DEVICE, torch.float32, max_tokens=512)
                for kernels in (False, True)}
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    calls: list[str] = []
    for seq_ids, num_cached, num_new in STEPS:  # prefill of a mixed batch, a decode step, decode + a chunk
        batch = ForwardBatch.build(seq_ids, num_cached, num_new, DEVICE)
        q, k, v = (torch.randn(batch.num_tokens, h, 64, generator=gen).to(DEVICE) for h in (8, 2, 2))
        outputs = {}
        for kernels, backend in backends.items():
            _route(monkeypatch, kernels, calls)
            backend.reserve(batch)
            outputs[kernels] = backend.attend(0, q, k, v, batch)
        assert_attention_close(outputs[True], outputs[False], tolerance, seed)
    attention = "hack_attention" if config.mode == "hack" else "dequant_attention"
    assert calls == ["store_compressed_kv", attention] * len(STEPS)
    for name, expected in backends[False].pool.layers[0].items():
        kernel_bytes = backends[True].pool.layers[0][name].view(torch.uint8)
        assert torch.equal(kernel_bytes, expected.view(torch.uint8)), name
