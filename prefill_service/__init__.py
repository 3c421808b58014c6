"""The prefill service (`hack-prefill`): runs prompts and streams their KV to decode instances layer by layer.

    server.py        gRPC servicer: Prefill, Cancel, Stats
    engine.py        the request queue, token-budget batches, one KV push per request
    worker.py        model thread: the batched forward, exporting each layer right after its attention
    kv_sender.py     one PushKV stream fed by the model thread, paced by the link emulation
    token_bucket.py  the link emulation (--kv-link-gbps)
    main.py          the command line
"""
