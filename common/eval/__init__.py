"""Accuracy tools: perplexity under each KV mode (teacher forcing through the decode path), greedy agreement
with fp16, and attention-output error at a real model's head shape."""
