"""`python -m common.eval.attention_error` on a tiny shape: runs the real backends, errors ordered as expected."""
from __future__ import annotations

import json

import torch

from common.eval.attention_error import attention_errors, main, synthetic_model, synthetic_qkv
from common.kv.config import PAPER_SETTING, KVConfig


def test_synthetic_keys_have_outlier_channels() -> None:
    q, k, v = synthetic_qkv(33, num_heads=2, num_kv_heads=1, head_dim=16, outliers=3,
                            generator=torch.Generator().manual_seed(5))
    assert q.shape == (33, 2, 16) and k.shape == v.shape == (33, 1, 16)
    spread = k.std(dim=0).flatten()
    assert int((spread > 4).sum()) == 3 and float(v.std()) < 2


def test_sink_token_draws_attention_and_sinks_protect_it() -> None:
    q, k, v = synthetic_qkv(104, num_heads=2, num_kv_heads=1, head_dim=32, outliers=2,
                            generator=torch.Generator().manual_seed(3), sink_tokens=1)
    share = torch.softmax(q[100:] @ k[:, 0].T / 32**0.5, dim=-1)[..., 0]
    assert float(share.mean()) > 0.3 and float(v[0].abs().max()) < 0.5
    # the long sink key stretches every channel's range in its token group unless it stays 16-bit
    configs = [KVConfig(mode="hack", partition=32, key_axis="channel", num_sinks=n, **PAPER_SETTING) for n in (0, 4)]
    no_sinks, sinks = attention_errors(configs, synthetic_model(2, 1, 32, 104), q, k, v, prompt=100)
    assert sinks["error"] < 0.7 * no_sinks["error"]


def test_tiny_shape_table_and_json(capsys) -> None:
    # 70-token prompt: 4 sinks, 64 quantized tokens (two partitions of 32), a 2-token open tail; 3 decode steps
    code = main(["--head-dim", "16", "--num-heads", "2", "--num-kv-heads", "1", "--tokens", "70",
                 "--decode-steps", "3", "--bits", "2", "4", "--partitions", "32", "--outlier-channels", "2",
                 "--seed", "1"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and out[0].startswith("| mode | bits | Π | key axis |")
    result = json.loads(out[-1])
    errors = {(r["mode"], r["bits"], r["key_axis"]): r["error"] for r in result["results"]}
    assert len(errors) == 9 and len(out) == 2 + 9 + 1
    assert errors[("fp16", 16, "-")] < 1e-3  # fp16 storage rounding only
    for mode in ("dequant", "hack"):
        for axis in ("token", "channel"):
            assert 0 < errors[(mode, 4, axis)] < errors[(mode, 2, axis)]
        # outlier channels stretch per-token partitions along head_dim; per-channel partitions isolate them
        assert errors[(mode, 2, "channel")] < errors[(mode, 2, "token")]
    # hack adds only the INT8 rounding of q and P to dequant's error
    assert abs(errors[("hack", 2, "channel")] - errors[("dequant", 2, "channel")]) < 0.05


def test_bad_input_exits_2(capsys) -> None:
    assert main(["--tokens", "0"]) == 2
    assert main(["--head-dim", "16", "--outlier-channels", "17"]) == 2
    assert main(["--head-dim", "10", "--tokens", "8", "--decode-steps", "1"]) == 2  # 10 2-bit codes: not whole bytes
    err = capsys.readouterr().err
    assert err.count("error: ") == 3 and "--tokens must be >= 1" in err
