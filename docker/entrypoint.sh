#!/bin/sh
# Container entrypoint: resolves the model once, the same way in every container, then runs the command
# (hack-router, hack-prefill, hack-decode, ...). In order:
#   1. HACK_MODEL when set (an embedded model name, a directory or .gguf file inside the container, a hub id);
#   2. a checkpoint mounted at /models (compose mounts $HACK_MODEL_DIR there, read-only): a Hugging Face
#      directory or a directory holding one .gguf file;
#   3. otherwise the commands' own default, the embedded smollm2-135m-instruct (converted from its GGUF into
#      $HACK_CACHE_DIR on first start: a volume shared by the containers in compose, converted by one of them).
set -eu
if [ -z "${HACK_MODEL:-}" ]; then
    if [ -f /models/config.json ] || ls /models/*.gguf >/dev/null 2>&1; then
        HACK_MODEL=/models
        export HACK_MODEL
    fi
fi
exec "$@"
