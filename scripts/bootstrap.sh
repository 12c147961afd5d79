#!/usr/bin/env bash
# Create (or refresh) the project's virtualenv at .venv with the gateway, the deploy tools,
# the dev/test extras and the bundled client, from the repo's own files. Idempotent: a marker
# keyed on the dependency files makes a second run return at once.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
python="${PYTHON:-python3}"
venv=.venv
stamp="$(cat pyproject.toml clients/python/pyproject.toml | sha256sum | cut -c1-16)"
marker="$venv/.plateforme-bootstrap"
if [[ -x "$venv/bin/python" && -f "$marker" && "$(cat "$marker")" == "$stamp" ]]; then
    exit 0
fi
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -e '.[dev]' -e ./clients/python
echo "$stamp" > "$marker"
echo "bootstrap: $venv ready ($("$venv/bin/python" --version))"
