"""The `python -m common.generate` command line, run as a user would."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "common.generate", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300, env=env)


PROMPT = "The capital of France is"


def test_prints_a_coherent_completion(smollm2_dir) -> None:
    result = run_cli("--model", "smollm2-135m-instruct", "--prompt", PROMPT, "--max-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(" Paris.")


def test_json_output_has_text_and_ids(smollm2_dir) -> None:
    sampled = ("--prompt", PROMPT, "--max-tokens", "7", "--json", "--temperature", "0.8", "--top-p", "0.9",
               "--seed", "3")
    payload = json.loads(run_cli(*sampled).stdout)
    assert len(payload["token_ids"]) == 7 and isinstance(payload["text"], str)
    assert json.loads(run_cli(*sampled).stdout)["token_ids"] == payload["token_ids"]


def test_stop_string_cuts_the_text(smollm2_dir) -> None:
    result = run_cli("--prompt", PROMPT, "--max-tokens", "20", "--stop", "\n", "--json")
    payload = json.loads(result.stdout)
    assert payload["text"] == " Paris." and payload["finish_reason"] == "stop"


def test_empty_prompt_is_a_clear_error(random_checkpoint) -> None:
    result = run_cli("--model", str(random_checkpoint()), "--prompt", "", "--max-tokens", "5")
    assert result.returncode == 2 and "prompt is empty" in result.stderr and result.stdout == ""


def test_prompt_longer_than_context_is_rejected(random_checkpoint) -> None:
    result = run_cli("--model", str(random_checkpoint()), "--prompt", "word " * 120, "--max-tokens", "5")
    assert result.returncode == 2 and "context window of 512 tokens" in result.stderr
    assert result.stdout == ""


def test_default_model_works_offline(smollm2_dir) -> None:
    """No --model: the embedded SmolLM2-135M-Instruct, with the network off, writes sensible text."""
    import os

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("HACK_MODEL", None)
    result = run_cli("--prompt", "The capital of France is", "--max-tokens", "3", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert "Paris" in json.loads(result.stdout)["text"]


def test_tiny_random_model_is_written_on_first_use(tmp_path) -> None:
    import os

    env = dict(os.environ, HACK_CACHE_DIR=str(tmp_path), HF_HUB_OFFLINE="1")
    result = run_cli("--model", "tiny-random", "--prompt", "hello", "--max-tokens", "5", "--json", "--ignore-eos",
                     env=env)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["token_ids"]) == 5
    assert (tmp_path / "hack-tiny-random-llama-v1" / "model.safetensors").exists()


def test_kv_mode_switches_generation(smollm2_dir, capsys) -> None:
    """All three KV modes generate through the same command; 2-bit modes stay close to fp16 early on."""
    from common.generate import main

    outputs = {}
    for mode in ("fp16", "dequant", "hack"):
        assert main(["--model", str(smollm2_dir), "--prompt", PROMPT, "--max-tokens", "12", "--kv-mode", mode,
                     "--json"]) == 0
        outputs[mode] = json.loads(capsys.readouterr().out)
    assert {o["kv_mode"] for o in outputs.values()} == {"fp16", "dequant", "hack"}
    assert outputs["fp16"]["text"].startswith(" Paris.")
    assert outputs["hack"]["token_ids"][:4] == outputs["fp16"]["token_ids"][:4]
