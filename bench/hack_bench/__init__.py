"""hack-bench: a load generator for OpenAI-compatible LLM endpoints.

Mirrors `vllm bench serve` (same flags, metric definitions and result keys) so numbers from HACK serve and
from vLLM can be set side by side. Layout:

- `dataset`: prompt sources (random, sharegpt, text, long) with token-exact lengths;
- `client`: one streaming request and its timings (TTFT, ITL, E2E) read from the SSE stream;
- `runner`: request arrivals (Poisson / gamma), concurrency limit, warm-up, progress bar;
- `metrics`: pure metric math over request traces (no I/O);
- `report`: the printed table and the JSON result file; `plots`: PNG figures;
- `breakdown`: the JCT breakdown from two scrapes of the router's /metrics; `experiment_report`: its table and plot;
- `serve`, `compare`, `experiment`: the sub-commands; `cli`: the `hack-bench` entry point.
"""
