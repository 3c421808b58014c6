#!/usr/bin/env bash
# Serve across real network links: router, prefill and decode each in its own network namespace, the
# prefill -> decode link shaped with tc; checks greedy completions against the single-host cluster and the
# KV transfer time against bytes / link rate (bench/hack_bench/netns_check.py; --help for the options).
# Needs root and iproute2 (ip, tc); exits 77 with the reason where network namespaces cannot be used.
#
#   scripts/netns-cluster.sh                       # 1 and 10 Gbit/s, fp16 KV, the kv-heavy random model
#   scripts/netns-cluster.sh --gbps 1 --kv-mode hack --model ../shared/models/stories260K
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
[[ -x $python ]] || python=python3
prefix=${HACK_NETNS_PREFIX:-hk$(( $$ % 100000 ))}  # namespaces are <prefix>-router, ...; at most 10 characters

cleanup() {
  # The Python side removes its namespaces itself; this catches a run killed before it could.
  local ns
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$prefix-" || true); do
    ip netns del "$ns" 2>/dev/null || true
  done
  ip link del "${prefix}h0" 2>/dev/null || true
}
trap cleanup EXIT

# In the background, so a TERM sent to this script reaches the check (which then stops its processes).
PYTHONPATH=${PYTHONPATH:-$PWD} "$python" -m bench.hack_bench.netns_check --prefix "$prefix" "$@" &
check=$!
trap 'kill -TERM "$check" 2>/dev/null || true' INT TERM
status=0
wait "$check" || status=$?
if kill -0 "$check" 2>/dev/null; then  # woken by a signal: wait for the check to stop its processes
  wait "$check" || status=$?
fi
exit "$status"
