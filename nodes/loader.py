"""HyperAlignLoader: a predictor file from models/hyperalign -> HYPERALIGN_PREDICTOR."""

from __future__ import annotations

import logging
import os

import folder_paths
from comfy_api.v0_0_2 import io

from ..hyperalign.io import load_predictor
from .predictor import LoadedPredictor
from .schema import CATEGORY, FOLDER, PredictorType

logger = logging.getLogger(__name__)

_CACHE: dict[str, tuple[tuple[int, int], LoadedPredictor]] = {}  # path -> ((mtime_ns, size), predictor)


def predictor_path(name: str) -> str:
    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        raise FileNotFoundError(
            f"HyperAlign: predictor {name!r} is not in models/{FOLDER} (searched "
            f"{folder_paths.get_folder_paths(FOLDER)}). HINT: put the .safetensors file there and refresh the node."
        )
    return path


def load_cached(path: str) -> LoadedPredictor:
    """Load (validating the header first) or reuse the copy loaded from the same file version."""
    stat = os.stat(path)
    version = (stat.st_mtime_ns, stat.st_size)
    cached = _CACHE.get(path)
    if cached is not None and cached[0] == version:
        return cached[1]
    loaded = LoadedPredictor.wrap(load_predictor(path, device="cpu"))
    _CACHE[path] = (version, loaded)
    meta = loaded.predictor.meta
    logger.info(
        "HyperAlign: loaded %s (%s, %d targets, mode %s)",
        os.path.basename(path),
        meta.family,
        len(meta.targets),
        meta.mode,
    )
    return loaded


class HyperAlignLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HyperAlignLoader",
            display_name="HyperAlign Loader",
            category=CATEGORY,
            description="Load a HyperAlign predictor (hypernetwork) from models/hyperalign.",
            is_experimental=True,
            inputs=[
                io.Combo.Input(
                    "predictor_name",
                    options=folder_paths.get_filename_list(FOLDER),
                    tooltip="A predictor file (.safetensors written by the HyperAlign trainer) in models/hyperalign.",
                ),
            ],
            outputs=[
                PredictorType.Output(display_name="predictor", tooltip="The loaded predictor, for HyperAlign Apply.")
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, predictor_name: str):
        path = folder_paths.get_full_path(FOLDER, predictor_name)
        if path is None or not os.path.exists(path):
            return ""
        stat = os.stat(path)
        return f"{path}:{stat.st_mtime_ns}:{stat.st_size}"

    @classmethod
    def execute(cls, predictor_name: str) -> io.NodeOutput:
        return io.NodeOutput(load_cached(predictor_path(predictor_name)))
