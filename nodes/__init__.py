"""HyperAlign's ComfyUI nodes (V3 schema). The only package that imports ComfyUI.

Importing it registers the ``models/hyperalign`` folder and nothing else.
"""

from __future__ import annotations

import os

import folder_paths
from comfy_api.v0_0_2 import ComfyExtension, io

from .schema import FOLDER


def register_model_folder() -> None:
    """models/hyperalign for *.safetensors, keeping paths extra_model_paths.yaml already added."""
    known = folder_paths.folder_names_and_paths.get(FOLDER)
    paths = list(known[0]) if known else []
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if default not in paths:
        paths.append(default)
    folder_paths.folder_names_and_paths[FOLDER] = (paths, {".safetensors"})


register_model_folder()

from .apply import HyperAlignApply  # noqa: E402
from .export import HyperAlignExportLoRA  # noqa: E402
from .keysteps import HyperAlignKeysteps  # noqa: E402
from .loader import HyperAlignLoader  # noqa: E402

NODES = [HyperAlignLoader, HyperAlignApply, HyperAlignKeysteps, HyperAlignExportLoRA]


class HyperAlignExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> HyperAlignExtension:
    return HyperAlignExtension()
