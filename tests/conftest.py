"""Shared test settings.

There are no marker-based auto-skips: every test, including `comfy`, `slow` and `browser`, runs in CI.

Fixtures for the real ComfyUI host (used by tests/nodes and any test marked `comfy`):
- ``comfy_host``: ComfyUI at COMFYUI_PATH imported in-process on CPU (``args.cpu`` is set before
  ``comfy.model_management`` is first imported), with its output, temp and input folders redirected
  to a temporary directory.
- ``hyperalign_pack``: this repository loaded by ComfyUI's own custom-node loader, from a temporary
  ``custom_nodes/ComfyUI-HyperAlign`` symlink, exactly as a user's ComfyUI would import it.

Both come from training/comfy_host.py, which the benchmarks and the toy demo boot ComfyUI with too.
"""

from pathlib import Path
from types import SimpleNamespace

import pytest

from training.comfy_host import comfyui_path, import_comfy, load_pack, pack_submodule

REPO_ROOT = Path(__file__).resolve().parent.parent

# The ComfyUI the tests run against: $COMFYUI_PATH, else the host that scripts/setup_env.sh installs.
COMFYUI_PATH = comfyui_path()


@pytest.fixture(scope="session")
def comfy_host(tmp_path_factory):
    """The real ComfyUI, imported in this process on the CPU."""
    if not (COMFYUI_PATH / "main.py").is_file():
        pytest.fail(f"no ComfyUI at {COMFYUI_PATH}: run scripts/setup_env.sh or set COMFYUI_PATH to a ComfyUI checkout")
    host = import_comfy(COMFYUI_PATH, cpu=True)
    base = tmp_path_factory.mktemp("comfy_dirs")
    for name, setter in (
        ("output", host.folder_paths.set_output_directory),
        ("temp", host.folder_paths.set_temp_directory),
        ("input", host.folder_paths.set_input_directory),
    ):
        (base / name).mkdir()
        setter(str(base / name))
    return SimpleNamespace(
        path=host.path, version=host.version, nodes=host.nodes, folder_paths=host.folder_paths, dirs=base
    )


@pytest.fixture(scope="session")
def hyperalign_pack(comfy_host, tmp_path_factory):
    """This repository as a ComfyUI custom node pack, loaded by ComfyUI's loader."""
    custom_nodes = tmp_path_factory.mktemp("custom_nodes")
    module = load_pack(comfy_host.nodes, custom_nodes)
    link = Path(module.__file__).parent

    def submodule(name: str):
        """A module of the loaded pack, e.g. submodule("nodes.wrappers") or submodule("hyperalign.io")."""
        return pack_submodule(module, name)

    return SimpleNamespace(module=module, submodule=submodule, path=link, nodes=comfy_host.nodes.NODE_CLASS_MAPPINGS)
