"""The decode service (`hack-decode`): holds requests' compressed KV caches and generates their tokens.

    server.py       gRPC servicer: Generate (token stream), PushKV, Cancel, Stats
    kv_receiver.py  PushKV ingest: header checks, per-layer verify + import, explicit push states
    engine.py       asyncio side: the continuous-batching loop, per-request event queues, KV timeouts
    scheduler.py    request states, KV admission (worst-case reservation), batch selection
    runner.py       model thread: KV import, one batched decode step, frees
    main.py         the command line
"""
