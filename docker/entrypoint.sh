#!/bin/sh
# Container entrypoint: resolves the model once, the same way in every container, then runs the command
# (hack-router, hack-prefill, hack-decode, ...). In order:
#   1. HACK_MODEL when set (a directory inside the container or a hub id);
#   2. a checkpoint mounted at /models (compose mounts $HACK_MODEL_DIR there, read-only);
#   3. the embedded default model, generated into $HACK_CACHE_DIR on first start (a shared volume in compose,
#      so the router reads the same tokenizer the prefill and decode instances load).
set -eu
if [ -z "${HACK_MODEL:-}" ]; then
    if [ -f /models/config.json ]; then
        HACK_MODEL=/models
    else
        HACK_MODEL=$(python -c 'from common.default_model import ensure_default_model; print(ensure_default_model())')
    fi
    export HACK_MODEL
fi
exec "$@"
