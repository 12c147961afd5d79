#!/usr/bin/env bash
# The one command that runs the real-vLLM end-to-end tests alone, from a clean clone:
#
#   scripts/test-vllm.sh [extra pytest args]
#
# 1. builds (or reuses) the vLLM CPU virtualenv   scripts/setup-vllm.sh   (~3 min the first time)
# 2. builds (or reuses) the tiny random Mixtral   scripts/build_tiny_mixtral.py (~10 s)
# 3. runs pytest -m vllm tests/e2e with the project's main environment (vLLM starts in ~45 s)
#
# Environment: PLATEFORME_VLLM_VENV (vLLM venv), PLATEFORME_TINY_MODEL (model dir),
# PYTHON (the main environment's interpreter; default .venv/bin/python, else python3).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

venv="${PLATEFORME_VLLM_VENV:-.cache/vllm-venv}"
model="${PLATEFORME_TINY_MODEL:-.cache/models/tiny-mixtral}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

scripts/setup-vllm.sh
"$venv/bin/python" scripts/build_tiny_mixtral.py --out "$model"
PLATEFORME_TINY_MODEL="$model" exec "$PYTHON" -m pytest -m vllm tests/e2e "$@"
