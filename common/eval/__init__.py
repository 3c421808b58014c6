"""Accuracy tools: perplexity under each KV mode (teacher forcing through the decode path) and
greedy agreement with fp16."""
