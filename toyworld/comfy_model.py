"""The toy world's diffusers UNet as a ComfyUI model, converted with ComfyUI's own key map.

ComfyUI is booted by :mod:`training.comfy_host` (the one boot helper); this module only builds ComfyUI's SD1.5
``unet_config`` for a diffusers ``UNet2DConditionModel`` config and loads the weights through
``comfy.utils.unet_to_diffusers``, so the main job can sample the toy model with ComfyUI's KSampler.
"""

from __future__ import annotations

import torch


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
        # ComfyUI pops this list from its end for output_blocks.0 (the deepest level), so it runs from the
        # shallowest level to the deepest, like transformer_depth
        "transformer_depth_output": [int(a) for a in attention for _ in range(per_level + 1)],
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
