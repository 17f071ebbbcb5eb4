#!/usr/bin/env bash
# Create (or reuse) .venv and install agentrl into it. Sourced by quickstart.sh and test.sh.
# torch is pinned to the CPU release this project is tested with; override with AGENTRL_TORCH.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
extras=${AGENTRL_EXTRAS:-}
stamp=.venv/.agentrl-installed${extras:+-$extras}
# The environments are packages of their own (environments/<name>/pyproject.toml); they are
# installed beside agentrl, and reinstalled when any of the pyproject files changes.
newer=$(find pyproject.toml environments/*/pyproject.toml -newer "$stamp" 2>/dev/null | head -1 || true)
if [ ! -f "$stamp" ] || [ -n "$newer" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "${AGENTRL_TORCH:-torch==2.13.0}"
  .venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
  envs=()
  for p in environments/*/pyproject.toml; do envs+=(-e "$(dirname "$p")"); done
  .venv/bin/python -m pip install -q "${envs[@]}"
  touch "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"
