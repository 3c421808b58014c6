"""A 32k-token prefill on CPU with a tiny model stays under a stated memory bound in every KV mode (fp16, dequant,
hack with the default format): no n x n score tensor.

The prefill runs in a subprocess whose peak RSS (/proc/self/status VmHWM, which sees torch's allocations) is compared
with its RSS just before the forward. A full [Hq, n, n] fp32 score tensor would be 2 x 32768^2 x 4 B = 8 GiB; the
bound is 512 MiB of growth (the model's activations and the blockwise attention's blocks take a few tens of MiB;
measured under load 10: fp16 67 MiB in 10 s, dequant 88 MiB in 14 s, hack 106 MiB in 33 s).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from common.kv.config import MODES
from common.random_models import RandomModelSpec

TOKENS = 32768
BOUND_MIB = 512
SPEC = RandomModelSpec(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                       head_dim=16, max_position_embeddings=TOKENS + 64, seed=3)

SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch
    from pathlib import Path
    from common.kv.config import KVConfig
    from common.kv.factory import make_kv_backend
    from common.kv.interface import ForwardBatch
    from common.loader import load_model
    loaded = load_model(sys.argv[1], dtype="float32", device="cpu")
    tokens = int(sys.argv[2])
    backend = make_kv_backend(KVConfig(mode=sys.argv[3]), loaded.config, "cpu", torch.float32, max_tokens=tokens,
                              max_seqs=1)
    batch = ForwardBatch.build([0], [0], [tokens])
    backend.reserve(batch)
    ids = torch.randint(3, loaded.config.vocab_size, (tokens,), generator=torch.Generator().manual_seed(0))
    rss_kib = lambda: int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() // 1024
    before = rss_kib()
    logits = loaded.model(ids, batch, backend)
    # VmHWM: this process image's peak RSS (ru_maxrss would carry the forking pytest's peak across exec)
    peak = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmHWM:"))
    print(json.dumps({"before_kib": before, "peak_kib": peak, "finite": bool(torch.isfinite(logits).all())}))
""")


@pytest.mark.parametrize("mode", MODES)
def test_32k_prefill_stays_under_the_memory_bound(random_checkpoint, mode: str) -> None:
    model = random_checkpoint(SPEC)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(model), str(TOKENS), mode], capture_output=True,
                            text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    growth_mib = (measured["peak_kib"] - measured["before_kib"]) / 1024
    assert measured["finite"]
    assert growth_mib < BOUND_MIB, f"peak RSS grew by {growth_mib:.0f} MiB during the 32k-token {mode} prefill"
