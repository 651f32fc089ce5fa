"""HyperAlign core: a hypernetwork that predicts per-sample LoRA weights during diffusion sampling.

Pure torch (plus safetensors): no ComfyUI, diffusers or accelerate import, so the node
pack and the trainer share exactly this code.
"""

__version__ = "0.1.0"

from .config import FORMAT_VERSION, HypernetConfig, PredictorMeta  # noqa: E402
from .hypernet import HyperNet, feature_tokens  # noqa: E402
from .io import Predictor, load_predictor, new_predictor, read_meta, save_predictor  # noqa: E402
from .lora import Factors, LoRAState, hooked, lora_delta, resolve_modules, rows_to_samples  # noqa: E402
from .rows import bind_rows  # noqa: E402
from .runtime import AlignRun  # noqa: E402
from .schedule import MODES, discover_keysteps, format_keysteps, parse_keysteps, progress_of_timestep  # noqa: E402
from .targets import FLUX, SD15, Target, build_table, targets_sha256  # noqa: E402

__all__ = [
    "FORMAT_VERSION",
    "FLUX",
    "MODES",
    "SD15",
    "AlignRun",
    "Factors",
    "HyperNet",
    "HypernetConfig",
    "LoRAState",
    "Predictor",
    "PredictorMeta",
    "Target",
    "bind_rows",
    "build_table",
    "discover_keysteps",
    "feature_tokens",
    "format_keysteps",
    "hooked",
    "load_predictor",
    "lora_delta",
    "new_predictor",
    "parse_keysteps",
    "progress_of_timestep",
    "read_meta",
    "resolve_modules",
    "rows_to_samples",
    "save_predictor",
    "targets_sha256",
]
