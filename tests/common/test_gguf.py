"""GGUF checkpoints: our conversion against transformers' GGUF loader (crafted tiny files of every tested tensor
type, and the real SmolLM2 file), the conversion cache, and clear errors for broken or unsupported files."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from common import gguf_checkpoint
from common.engine import Engine
from common.gguf_checkpoint import GGUFError, converted_checkpoint, find_gguf
from common.kv.config import KVConfig
from common.kv.factory import make_kv_backend
from common.loader import CheckpointError, load_model, read_safetensors, resolve_model_path
from common.random_models import RandomModelSpec
from common.sampling import SamplingParams

SPEC = RandomModelSpec("LlamaForCausalLM", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, seed=7)
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l"]
VOCAB_SIZE = len(SPECIALS) + 256 + len(MERGES)
# One tensor type per kind of weight, so one tiny file exercises every type the issue names.
TYPES = {"attn_q": QType.Q4_0, "attn_k": QType.Q4_1, "attn_v": QType.Q8_0, "attn_output": QType.BF16,
         "ffn_gate": QType.F16, "ffn_up": QType.Q8_0, "ffn_down": QType.Q4_1, "token_embd": QType.F16}


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Llama's q_proj/k_proj rows."""
    return weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


def write_gguf(path: Path, hf_weights: dict[str, torch.Tensor], spec: RandomModelSpec = SPEC,
               types: dict[str, QType] = TYPES) -> Path:
    """A small Llama GGUF as llama.cpp writes one: metadata, a byte-level BPE tokenizer with a ChatML template,
    Q/K permuted for rope, each weight quantized to the type `types` gives its kind (F32 otherwise)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny test llama")
    writer.add_block_count(spec.num_layers)
    writer.add_context_length(spec.max_position_embeddings)
    writer.add_embedding_length(spec.hidden_size)
    writer.add_feed_forward_length(spec.intermediate_size)
    writer.add_head_count(spec.num_heads)
    writer.add_head_count_kv(spec.num_kv_heads)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_tokenizer_model("gpt2")
    tokens = SPECIALS + [bytes_to_unicode()[b] for b in range(256)] + [m.replace(" ", "") for m in MERGES]
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (256 + len(MERGES)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHAT_TEMPLATE)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, spec.num_layers)
    for hf_name, tensor in hf_weights.items():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        value = tensor.float().numpy()
        if "q_proj" in hf_name or "k_proj" in hf_name:
            value = llama_cpp_permute(value, spec.num_heads if "q_proj" in hf_name else spec.num_kv_heads)
        kind = types.get(gguf_name.split(".")[-2], QType.F32)
        if kind in (QType.F32, QType.F16):
            writer.add_tensor(gguf_name, value.astype(np.float16 if kind == QType.F16 else np.float32))
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(value, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(random_checkpoint, tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """(a crafted GGUF file, the float weights it was quantized from); the vocabulary is the tokens above."""
    weights = read_safetensors(random_checkpoint(RandomModelSpec(**{**SPEC.__dict__, "vocab_size": VOCAB_SIZE})))
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", weights), weights


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HACK_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_crafted_gguf_matches_transformers_weights_and_logits(tiny_gguf, cache) -> None:
    path, original = tiny_gguf
    loaded = load_model(path, dtype="float32", device="cpu")
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    expected = reference.state_dict()
    for name, param in loaded.model.named_parameters():
        assert torch.equal(param, expected[name]), name  # same dequantization, same un-permuted rows
        # and close to the weights before quantization: un-permuting undid llama.cpp's permutation
        assert (param - original[name].float()).abs().max() < 0.35, name
    prompt = loaded.tokenizer.encode("hello world")
    with torch.no_grad():
        hf_logits = reference(torch.tensor([prompt])).logits[0, -1]
    engine = Engine(loaded, make_kv_backend(KVConfig(mode="fp16"), loaded.config, device=torch.device("cpu"),
                                            dtype=torch.float32, max_tokens=64, max_seqs=1))
    ours = engine.generate([prompt], [SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)])[0]
    assert ours.token_ids == [int(hf_logits.argmax())]


def test_crafted_gguf_tokenizer_and_chat_template_come_from_the_metadata(tiny_gguf, cache) -> None:
    path, _ = tiny_gguf
    loaded = load_model(path, device="cpu")
    assert loaded.tokenizer.chat_template == CHAT_TEMPLATE
    rendered = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                    add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("héllo")) == "héllo"
    assert loaded.tokenizer.encode("hello", add_special_tokens=False)[:1] == [VOCAB_SIZE - 2]  # the "h e" merge
    assert loaded.config.eos_token_ids == (2,) and loaded.config.architecture == "LlamaForCausalLM"


def test_a_directory_holding_one_gguf_is_a_gguf_checkpoint(tiny_gguf, tmp_path) -> None:
    path, _ = tiny_gguf
    assert find_gguf(path.parent) == path
    shutil.copy(path, tmp_path / "a.gguf")
    shutil.copy(path, tmp_path / "b.gguf")
    with pytest.raises(GGUFError, match=r"several GGUF files \(a.gguf, b.gguf\)"):
        find_gguf(tmp_path)


def test_second_load_reuses_the_cache_without_converting(tiny_gguf, cache, monkeypatch) -> None:
    path, _ = tiny_gguf
    first = resolve_model_path(str(path))
    assert first.parent == cache / "gguf" and (first / "model.safetensors").exists()

    def no_conversion(*args: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_checkpoint, "convert", no_conversion)
    assert resolve_model_path(str(path)) == first
    copy = shutil.copy(path, cache.parent / "renamed.gguf")  # the key is the content, not the path
    assert resolve_model_path(str(copy)) == first


def test_unsupported_tensor_type_is_named(tmp_path, cache) -> None:
    bad = tmp_path / "i32.gguf"
    writer = gguf.GGUFWriter(str(bad), "llama")
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((4, 32), dtype=np.int32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"unsupported GGUF tensor type in blk.0.attn_q.weight \(I32\); "
                                              r"supported types: F32, F16, BF16, Q8_0, Q4_0, Q4_1"):
        load_model(bad, device="cpu")


def test_other_quantized_types_convert_too(tiny_gguf, tmp_path, cache) -> None:
    _, weights = tiny_gguf
    path = write_gguf(tmp_path / "q5.gguf", weights, types={**TYPES, "attn_v": QType.Q5_0, "ffn_up": QType.Q5_1})
    loaded = load_model(path, dtype="float32", device="cpu")
    value = loaded.model.model.layers[0].self_attn.v_proj.weight
    assert (value - weights["model.layers.0.self_attn.v_proj.weight"].float()).abs().max() < 0.2


@pytest.mark.parametrize("damage", ["garbage", "header_cut", "data_cut"])
def test_corrupt_or_truncated_gguf_gives_a_clear_error(tiny_gguf, tmp_path, cache, damage) -> None:
    path, _ = tiny_gguf
    data = path.read_bytes()
    broken = tmp_path / "broken.gguf"
    broken.write_bytes({"garbage": b"not a gguf file at all" * 10, "header_cut": data[:40],
                        "data_cut": data[:-100]}[damage])
    expected = "not a readable GGUF file" if damage == "garbage" else "truncated"
    with pytest.raises(CheckpointError, match=expected):
        load_model(broken, device="cpu")
    assert not list((cache / "gguf").glob("[0-9a-f]*[0-9a-f]"))  # nothing half-written is left as a cache entry


def test_unknown_architecture_is_refused(tmp_path, cache) -> None:
    path = tmp_path / "gemma.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma")
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="unsupported GGUF architecture 'gemma'; supported: llama, mistral"):
        load_model(path, device="cpu")


# --- the real default model ------------------------------------------------------------------------------------


def test_smollm2_greedy_tokens_match_transformers(smollm2, smollm2_gguf_file) -> None:
    """32 greedy tokens in fp16 KV mode equal transformers' greedy choice, its own GGUF loader on the same file.

    Checked in one transformers forward over prompt + our tokens (each of ours must be its argmax given the
    tokens before it), which is what its greedy generation would produce, at a fraction of the time."""
    reference = AutoModelForCausalLM.from_pretrained(smollm2_gguf_file.parent, gguf_file=smollm2_gguf_file.name,
                                                     dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "Write a short poem about the sea."}]
    prompt = smollm2.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = smollm2.tokenizer(prompt, add_special_tokens=False).input_ids
    backend = make_kv_backend(KVConfig(mode="fp16"), smollm2.config, device=torch.device("cpu"),
                              dtype=torch.float32, max_tokens=len(prompt_ids) + 32, max_seqs=1)
    ours = Engine(smollm2, backend).generate([prompt_ids], [SamplingParams(max_tokens=32, temperature=0.0,
                                                                           ignore_eos=True)])[0].token_ids
    with torch.no_grad():
        logits = reference(torch.tensor([prompt_ids + ours[:-1]])).logits[0, len(prompt_ids) - 1:]
    assert len(ours) == 32 and ours == logits.argmax(-1).tolist()


def test_smollm2_conversion_matches_its_config(smollm2, smollm2_dir) -> None:
    config = smollm2.config
    assert (config.architecture, config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads,
            config.head_dim, config.vocab_size, config.tie_word_embeddings) == \
        ("LlamaForCausalLM", 30, 576, 9, 3, 64, 49152, True)
    assert config.rope.theta == 100000.0 and 2 in config.eos_token_ids
    assert "<|im_start|>" in smollm2.tokenizer.chat_template
    assert set(load_file(smollm2_dir / "model.safetensors")) == {n for n, _ in smollm2.model.named_parameters()} \
        - {"lm_head.weight"}


def test_smollm2_cached_load_is_fast(smollm2_dir, smollm2_gguf_file, monkeypatch) -> None:
    monkeypatch.setattr(gguf_checkpoint, "convert", lambda *args: pytest.fail("converted again"))
    started = time.monotonic()
    assert converted_checkpoint(smollm2_gguf_file, smollm2_dir.parent.parent) == smollm2_dir
    assert time.monotonic() - started < 5.0  # a memo lookup (the file's hash is remembered), no reconversion
