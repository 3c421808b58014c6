#!/usr/bin/env bash
# End-to-end check of the Docker deployment (docker/): build the image, start the compose stack, wait until the
# router is ready, stream a completion with curl, check it against in-process generation, ask the default model
# (SmolLM2-135M-Instruct) for the capital of France (the answer must name Paris), stop everything.
#
#   scripts/docker-smoke.sh                # the smoke test
#   scripts/docker-smoke.sh --kill-decode  # then also: `docker kill` the decode container mid-stream (the stream
#                                          # must end with an explicit error), `up -d` (new requests must succeed)
#
# Environment: COMPOSE (default `docker compose` when installed, else `docker-compose`), HACK_MODEL_DIR (serve
# this checkpoint instead of the embedded default), HACK_ROUTER_PORT (default 18000), HACK_IMAGE,
# SKIP_BUILD=1 (use the existing image). Needs docker, curl and python3. Exits non-zero on any failure and
# always removes what it started (containers, network, volumes).
set -euo pipefail
cd "$(dirname "$0")/.."

KILL_DECODE=0
for arg in "$@"; do
    case $arg in
        --kill-decode) KILL_DECODE=1 ;;
        *) echo "usage: $0 [--kill-decode]" >&2; exit 2 ;;
    esac
done

if [[ -z ${COMPOSE:-} ]]; then
    if docker compose version >/dev/null 2>&1; then COMPOSE="docker compose"; else COMPOSE=docker-compose; fi
fi
export COMPOSE_FILE=docker/compose.yaml
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-hack-smoke}
export HACK_IMAGE=${HACK_IMAGE:-hack-serve:latest}
export HACK_ROUTER_PORT=${HACK_ROUTER_PORT:-18000}
BASE_URL="http://127.0.0.1:$HACK_ROUTER_PORT"
PROMPT="Once upon a time"
MAX_TOKENS=24
WORK=$(mktemp -d)

log() { printf '[docker-smoke %s] %s\n' "$(date +%T)" "$*" >&2; }
fail() { log "FAIL: $*"; exit 1; }
compose() { $COMPOSE "$@"; }
now() { date +%s.%N; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$2"; }

cleanup() {
    local status=$?
    if ((status != 0)); then
        compose ps >&2 || true
        compose logs --tail 40 >&2 || true
    fi
    log "stopping the stack"
    compose down --volumes --remove-orphans >/dev/null 2>&1 || true
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT

wait_ready() {  # wait_ready TIMEOUT_S: poll the router's /ready until it answers 200
    local deadline=$((SECONDS + $1))
    until curl -sf "$BASE_URL/ready" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || fail "router not ready after $1 s"
        sleep 1
    done
}

request_json() {  # request_json MAX_TOKENS: a streamed greedy completion that runs to MAX_TOKENS
    python3 -c 'import json, sys; print(json.dumps({"model": sys.argv[3], "prompt": sys.argv[1],
        "max_tokens": int(sys.argv[2]), "temperature": 0, "ignore_eos": True, "stream": True}))' "$PROMPT" "$1" \
        "$MODEL_NAME"
}

stream() {  # stream MAX_TOKENS OUT: curl the SSE stream; each line of OUT is "<unix time> <line>"
    curl -sSN --max-time 600 "$BASE_URL/v1/completions" -H 'Content-Type: application/json' \
        -d "$(request_json "$1")" | while IFS= read -r line; do
        if [[ -n $line ]]; then printf '%s %s\n' "$(now)" "$line"; fi
    done >"$2"
}

# check_stream OUT [MODE]: MODE "ok" (default) prints the completion text after checking the stream ended
# normally; MODE "error" checks that it ended with an error event instead, and prints the error.
check_stream() {
    python3 - "$1" "${2:-ok}" <<'EOF'
import json, sys

path, mode = sys.argv[1], sys.argv[2]
events = [line.rstrip("\n").split(" ", 1)[1] for line in open(path) if " data: " in line]
if not events or events[-1] != "data: [DONE]":
    sys.exit(f"stream did not end with [DONE]: {events[-3:]}")
chunks = [json.loads(event[len("data: "):]) for event in events[:-1]]
errors = [chunk["error"] for chunk in chunks if "error" in chunk]
choices = [chunk["choices"][0] for chunk in chunks if chunk.get("choices")]
if mode == "error":
    if not errors:
        sys.exit(f"expected an error event, got {len(choices)} chunks ending {choices[-1:]}")
    print(json.dumps(errors[-1]))
    sys.exit(0)
if errors:
    sys.exit(f"stream failed: {errors}")
if not choices or choices[-1].get("finish_reason") != "length":
    sys.exit(f"expected the stream to finish with 'length', got {choices[-1:]}")
print("".join(choice.get("text", "") for choice in choices), end="")
EOF
}

first_token_time() {  # the arrival time of the first chunk with text in a stream file
    python3 - "$1" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    stamp, _, event = line.partition(" ")
    if event.startswith("data: {") and (json.loads(event[6:]).get("choices") or [{}])[0].get("text"):
        print(stamp)
        break
EOF
}

reference_text() {  # greedy in-process generation of the same request inside the prefill container
    compose exec -T prefill hack-entrypoint python -m common.generate --prompt "$PROMPT" --max-tokens "$1" \
        --ignore-eos --kv-mode "${HACK_KV_MODE:-hack}" --json |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["text"], end="")'
}

if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    log "building $HACK_IMAGE"
    start=$(now)
    docker build -q -f docker/Dockerfile -t "$HACK_IMAGE" . >/dev/null
    log "built in $(elapsed "$start" "$(now)") s; size $(docker image inspect -f '{{.Size}}' "$HACK_IMAGE") bytes"
fi

log "starting the stack ($COMPOSE, project $COMPOSE_PROJECT_NAME, model ${HACK_MODEL_DIR:-embedded default})"
up_started=$(now)
compose up -d
wait_ready 300
log "router ready after $(elapsed "$up_started" "$(now)") s"
MODEL_NAME=$(curl -sf "$BASE_URL/v1/models" | python3 -c 'import json, sys; print(json.load(sys.stdin)["data"][0]["id"])')
log "serving model $MODEL_NAME"

stream "$MAX_TOKENS" "$WORK/first.sse"
first_token=$(first_token_time "$WORK/first.sse")
[[ -n $first_token ]] || fail "no token in the stream: $(head -c 500 "$WORK/first.sse")"
log "first token $(elapsed "$up_started" "$first_token") s after \`up\`"
served=$(check_stream "$WORK/first.sse") || fail "bad stream"
expected=$(reference_text "$MAX_TOKENS") || fail "in-process reference generation failed"
[[ $served == "$expected" ]] || fail "served text differs from in-process generation:
  served:   ${served@Q}
  expected: ${expected@Q}"
log "OK: streamed $MAX_TOKENS tokens equal to in-process generation: ${served@Q}"

if [[ -z ${HACK_MODEL_DIR:-}${HACK_MODEL:-} ]]; then  # the default model must answer sensibly, not gibberish
    answer=$(curl -sS --max-time 300 "$BASE_URL/v1/chat/completions" -H 'Content-Type: application/json' \
        -d '{"model": "smollm2-135m-instruct", "temperature": 0, "max_tokens": 32,
             "messages": [{"role": "user", "content": "What is the capital of France?"}]}' |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["choices"][0]["message"]["content"])') ||
        fail "chat completion failed"
    [[ $answer == *Paris* ]] || fail "the default model does not name Paris: ${answer@Q}"
    log "OK: chat answer names Paris: ${answer@Q}"
fi

if ((KILL_DECODE)); then
    long_tokens=$(curl -sf "$BASE_URL/v1/models" |
        python3 -c 'import json, sys; print(min(json.load(sys.stdin)["data"][0]["max_model_len"] - 64, 2000))')
    log "kill phase: streaming $long_tokens tokens, then killing the decode container"
    stream "$long_tokens" "$WORK/killed.sse" &
    stream_pid=$!
    deadline=$((SECONDS + 120))
    until [[ -n $(first_token_time "$WORK/killed.sse" 2>/dev/null) ]]; do
        ((SECONDS < deadline)) || fail "the long request produced no token"
        sleep 0.2
    done
    docker kill "$(compose ps -q decode)" >/dev/null
    wait "$stream_pid" || true
    error=$(check_stream "$WORK/killed.sse" error) || fail "the interrupted stream has no explicit error"
    log "OK: interrupted stream ended with an error after $(grep -c '"text"' "$WORK/killed.sse") chunks: $error"

    compose up -d
    wait_ready 300
    stream "$MAX_TOKENS" "$WORK/after.sse"
    served=$(check_stream "$WORK/after.sse") || fail "request after the decode restart failed"
    [[ $served == "$expected" ]] || fail "after the restart the text differs: ${served@Q} vs ${expected@Q}"
    log "OK: after \`up -d\` restarted decode, a new request succeeded with the same text"
fi
log "PASS"
