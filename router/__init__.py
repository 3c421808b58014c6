"""The router: an OpenAI-compatible HTTP front end that runs each request on a prefill and a decode instance.

Life cycle of a request (states, and the module that moves it on):

    HTTP request
      │  protocol.py: pydantic validation (400 on bad input)
      ▼
    PREPARED        serving.py: model name, chat template, tokenize, prompt + max_tokens <= context window
      │  orchestrator.py, pool picks D (policy.py: round_robin | least_loaded over instances.py's health/Stats)
      ▼
    ADMITTING       D.Generate opened; D reserves KV room and answers `admitted`
      │             (UNAVAILABLE / RESOURCE_EXHAUSTED: try the next D)
      ▼
    PREFILLING      pool picks P; P.Prefill runs the prompt and pushes its KV to D (D.PushKV), samples token 1
      │             (a failure before any token: retry on another P, at most max_prefill_attempts)
      ▼
    STREAMING       D's Generate stream yields every token, the first included; serving.py detokenizes
      │             incrementally (detokenizer.py), applies stop strings, records TTFT / ITL (metrics.py)
      ▼
    FINISHED        stop token or max_tokens (D ends the stream), or a stop string (router cancels on D)
    CANCELLED       client disconnected: Generate call cancelled, Cancel sent to D and to a still-running P
    FAILED          an instance failed: HTTP 5xx if nothing was sent yet, else an SSE error event + [DONE]

An RPC failing with UNAVAILABLE takes its instance out of rotation at once; the background poll (gRPC health
check + Stats every health_interval_s) puts it back when it answers again. Entry point: main.py (hack-router);
routes: app.py.
"""
