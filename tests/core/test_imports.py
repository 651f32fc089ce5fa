"""`import hyperalign` stays pure: no ComfyUI, diffusers, accelerate or transformers, in a fresh interpreter."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parents[2]
HOSTS = (
    "comfy",
    "comfy_api",
    "comfy_extras",
    "diffusers",
    "accelerate",
    "transformers",
    "folder_paths",
    "nodes",
    "training",
    "server",
    "peft",
)


def run_python(code: str) -> dict:
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_pulls_in_no_host():
    loaded = run_python(
        "import json, sys\n"
        "import hyperalign, hyperalign.io, hyperalign.lora, hyperalign.hypernet, hyperalign.runtime\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    offenders = [m for m in loaded if m.split(".")[0] in HOSTS or m.startswith("comfy")]
    assert offenders == []
    assert "hyperalign" in loaded and "safetensors" in loaded


def test_import_with_hosts_blocked():
    """With every host module made unimportable, hyperalign still imports and works."""
    blocked = ", ".join(repr(name) for name in HOSTS)
    result = run_python(
        "import json, sys\n"
        f"for name in ({blocked},):\n"
        "    sys.modules[name] = None  # any import of it raises ImportError\n"
        "import torch\n"
        "import hyperalign\n"
        "from hyperalign import HypernetConfig, new_predictor\n"
        "p = new_predictor('sd15', HypernetConfig(feature_dim=8, context_dim=8, dim=8, heads=1, rank=1, basis=2),\n"
        "                  {'block_channels': [32], 'attention_levels': [True], 'layers_per_block': 1,\n"
        "                   'context_dim': 8})\n"
        "f = p.hypernet(torch.randn(1, 2, 8), torch.tensor([0.5]), torch.randn(1, 3, 8))\n"
        "print(json.dumps({'version': hyperalign.__version__, 'targets': len(f)}))\n"
    )
    assert result["targets"] == 32 and result["version"]


def test_all_is_exactly_what_the_package_re_exports():
    """Every name `hyperalign/__init__.py` imports is in `__all__` and nothing else is (a forgotten export fails)."""
    import hyperalign

    tree = ast.parse((REPO_ROOT / "hyperalign" / "__init__.py").read_text())
    imported = {
        alias.asname or alias.name for node in tree.body if isinstance(node, ast.ImportFrom) for alias in node.names
    }
    assert sorted(hyperalign.__all__) == sorted(imported)


def test_runtime_requirements_are_exactly_what_the_pack_imports():
    """requirements.txt (what ComfyUI users install) equals pyproject's dependencies, and each is imported by the
    code ComfyUI loads (hyperalign/, nodes/, __init__.py): an unused requirement fails here."""
    listed = [line.strip() for line in (REPO_ROOT / "requirements.txt").read_text().splitlines() if line.strip()]
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert listed == project["dependencies"]
    imported = set()
    for path in [
        REPO_ROOT / "__init__.py",
        *(REPO_ROOT / "hyperalign").rglob("*.py"),
        *(REPO_ROOT / "nodes").rglob("*.py"),
    ]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    unused = [name for name in listed if re.split(r"[<>=!~\[; ]", name)[0].replace("-", "_") not in imported]
    assert unused == []
