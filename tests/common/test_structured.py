"""Structured output: schema checks, the per-step token mask, and masked generation yielding matching JSON."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from common.structured import GrammarCompiler, GrammarError, advance, check_schema, mask_logits, schema_text

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
          "required": ["n", "ok"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tokenizer(random_checkpoint):
    return AutoTokenizer.from_pretrained(random_checkpoint())


def test_bad_schemas_are_named():
    check_schema(schema_text(SCHEMA))
    check_schema(schema_text(None))  # json_object
    with pytest.raises(GrammarError, match="objectx"):
        check_schema(schema_text({"type": "objectx"}))
    with pytest.raises(GrammarError, match="invalid JSON schema"):
        check_schema("{not json")


def test_masked_random_logits_write_a_matching_document(tokenizer):
    vocab = len(tokenizer)
    compiler = GrammarCompiler(tokenizer, vocab)
    torch.manual_seed(0)
    for _ in range(3):
        matchers = [compiler.matcher(schema_text(SCHEMA)), None]
        tokens = []
        for _ in range(200):
            logits = mask_logits(torch.randn(2, vocab), matchers)
            assert torch.isfinite(logits[1]).all()  # a row without a matcher is untouched
            token = int(logits[0].argmax())
            advance(matchers, [token, 0])
            if token == tokenizer.eos_token_id:
                break
            tokens.append(token)
        document = json.loads(tokenizer.decode(tokens))
        assert set(document) == {"n", "ok"} and isinstance(document["ok"], bool)
        assert isinstance(document["n"], int)


def test_a_matcher_replays_the_tokens_already_generated(tokenizer):
    compiler = GrammarCompiler(tokenizer, len(tokenizer))
    opening = tokenizer('{"n": ', add_special_tokens=False).input_ids
    matcher = compiler.matcher(schema_text(SCHEMA), replay=opening)
    allowed = torch.isfinite(mask_logits(torch.zeros(1, len(tokenizer)), [matcher])[0]).nonzero().flatten()
    assert {tokenizer.decode([int(t)]) for t in allowed} <= set("-0123456789")
    with pytest.raises(GrammarError):
        compiler.matcher(schema_text(SCHEMA), replay=tokenizer("[", add_special_tokens=False).input_ids)
