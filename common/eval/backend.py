"""The KV backend an eval tool runs on: one pool sized for a known set of sequences."""
from __future__ import annotations

from common.kv.backends import PagedKVBackend
from common.kv.config import KVConfig
from common.kv.factory import make_kv_backend
from common.loader import LoadedModel


def backend_for_sequences(loaded: LoadedModel, kv_config: KVConfig, lengths: list[int]) -> PagedKVBackend:
    """A backend on the model's device and dtype that holds sequences of these lengths all at once.

    Pages are counted per sequence (each one's last page may be partly empty), so the pool never runs out.
    """
    block = kv_config.block_size
    pages = sum(-(-n // block) for n in lengths)
    return make_kv_backend(kv_config, loaded.config, device=next(loaded.model.parameters()).device,
                           dtype=loaded.model.lm_head.weight.dtype, max_seqs=len(lengths), max_tokens=pages * block)
