"""Checkpoint loading: sharded files, and one clear error for every kind of bad checkpoint."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.config import UnsupportedModelError
from common.loader import CheckpointError, load_model, resolve_model_path
from common.random_models import RandomModelSpec

SPEC = RandomModelSpec(num_heads=2, num_kv_heads=1, head_dim=64, seed=11)


def copy_checkpoint(random_checkpoint, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(random_checkpoint(SPEC), target)
    return target


def test_sharded_checkpoint_loads_same_weights(random_checkpoint, tmp_path) -> None:
    path = copy_checkpoint(random_checkpoint, tmp_path)
    tensors = load_file(path / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file_name, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, path / file_name)
        weight_map |= {k: file_name for k in keys}
    (path / "model.safetensors").unlink()
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = load_model(path, device="cpu")
    assert torch.equal(loaded.model.lm_head.weight, tensors["lm_head.weight"])


def test_missing_weight_file_is_named(random_checkpoint, tmp_path) -> None:
    path = copy_checkpoint(random_checkpoint, tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing weight file.*model.safetensors"):
        load_model(path, device="cpu")


def test_bad_tensors_reported_together(random_checkpoint, tmp_path) -> None:
    path = copy_checkpoint(random_checkpoint, tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.norm.weight"]
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    tensors["model.extra.weight"] = torch.zeros(1)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError) as error:
        load_model(path, device="cpu")
    message = str(error.value)
    assert "missing tensors: model.norm.weight" in message
    assert "unexpected tensors: model.extra.weight" in message
    assert "model.layers.0.mlp.up_proj.weight: checkpoint (3, 3), model (256, 128)" in message


def test_unsupported_architecture_is_named(random_checkpoint, tmp_path) -> None:
    path = copy_checkpoint(random_checkpoint, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config |= {"architectures": ["GPT2LMHeadModel"]}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        load_model(path, device="cpu")


def test_unsupported_rope_scaling_is_named(random_checkpoint, tmp_path) -> None:
    path = copy_checkpoint(random_checkpoint, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="yarn"):
        load_model(path, device="cpu")


def test_unknown_hub_id_offline_names_the_id(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="no-such-org/no-such-model"):
        resolve_model_path("no-such-org/no-such-model")


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        resolve_model_path(str(tmp_path / "absent"))


def test_dtype_choice(random_checkpoint) -> None:
    loaded = load_model(random_checkpoint(SPEC), dtype="bfloat16", device="cpu")
    assert loaded.model.lm_head.weight.dtype == torch.bfloat16
    assert load_model(random_checkpoint(SPEC), device="cpu").model.lm_head.weight.dtype == torch.float32
