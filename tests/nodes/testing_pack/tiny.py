"""Tiny random SD1.5, SDXL and FLUX models built with the host ComfyUI's own classes (test-only).

Shared by the in-process tests and by the test node pack the HTTP server loads, so both see the
same architectures. ComfyUI's ops leave parameters uninitialised (`torch.empty`), so every weight
is drawn here from a seeded generator.
"""

from __future__ import annotations

import dataclasses
import math

import comfy.ldm.flux.model
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models
import torch

SD15_UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "transformer_depth": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 64,
    "num_heads": 2,
    "transformer_depth_output": [1, 1, 1, 1],
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}

FLUX_UNET_CONFIG = {
    "image_model": "flux",
    "in_channels": 16,
    "out_channels": 16,
    "vec_in_dim": 32,
    "context_in_dim": 64,
    "hidden_size": 64,
    "mlp_ratio": 4.0,
    "num_heads": 4,
    "depth": 2,
    "depth_single_blocks": 1,
    "axes_dim": [4, 6, 6],
    "theta": 10000,
    "patch_size": 2,
    "qkv_bias": True,
    "guidance_embed": True,
}


def host_flux_fields() -> dict:
    """The FLUX.1 values of config fields this host's FluxParams requires beyond 0.3.x's: ComfyUI 0.33's
    model_detection sets ``txt_ids_dims = []`` for FLUX.1 (FLUX.2 uses [3])."""
    required = {field.name for field in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    return {"txt_ids_dims": []} if "txt_ids_dims" in required else {}


FLUX_UNET_CONFIG.update(host_flux_fields())

# SDXL's structure, tiny: channels x1, x2, x4, no attention at the first level, transformer depth 1 then 2 and 2 in
# the middle, linear projections, `y` = pooled text (32) + six 256-wide size embeddings (ComfyUI's width). ComfyUI's
# SDXL always has heads of 64 channels: one head at 64 channels, two at 128.
SDXL_UNET_CONFIG = dict(
    SD15_UNET_CONFIG,
    num_classes="sequential",
    adm_in_channels=32 + 6 * 256,
    num_res_blocks=[1, 1, 1],
    channel_mult=[1, 2, 4],
    transformer_depth=[0, 1, 2],
    transformer_depth_middle=2,
    transformer_depth_output=[0, 0, 1, 1, 2, 2],
    use_linear_in_transformer=True,
)

# The same architectures in HyperAlign's terms (hyperalign.targets.UNetArch / DiTArch fields).
SD15_ARCH = {
    "block_channels": [32, 64],
    "attention_levels": [True, True],
    "layers_per_block": 1,
    "transformer_depth": 1,
    "context_dim": 64,
    "mid_attention": True,
}
FLUX_ARCH = {"hidden_size": 64, "depth": 2, "depth_single_blocks": 1, "mlp_ratio": 4.0}
SDXL_ARCH = {
    "block_channels": [32, 64, 128],
    "transformer_depths": [0, 1, 2],
    "mid_depth": 2,
    "layers_per_block": 1,
    "context_dim": 64,
}

# Latent and conditioning shapes per family: (latent channels, context width, pooled width).
SHAPES = {"sd15": (4, 64, None), "flux": (16, 64, 32), "sdxl": (4, 64, 32)}
CONFIGS = {"sd15": "SD15", "flux": "Flux", "sdxl": "SDXL"}  # family -> comfy.supported_models class


def _initialise(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.dim() >= 2:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(fan_in))
            elif name.endswith("weight"):  # norm scales
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))


def build_model(family: str, seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """A fresh fp32 CPU ModelPatcher around a tiny random model of `family` ("sd15", "sdxl" or "flux")."""
    if family not in CONFIGS:
        raise ValueError(f"unknown family {family!r}")
    unet_config = {"sd15": SD15_UNET_CONFIG, "flux": FLUX_UNET_CONFIG, "sdxl": SDXL_UNET_CONFIG}[family]
    config = getattr(comfy.supported_models, CONFIGS[family])(dict(unet_config))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "", device=torch.device("cpu"))
    _initialise(model.diffusion_model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(
        model,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )


def conditioning(family: str, batch: int, seed: int, tokens: int = 7, guidance: float = 3.5) -> list:
    """A ComfyUI CONDITIONING with `batch` different random prompts."""
    _, width, pooled = SHAPES[family]
    generator = torch.Generator().manual_seed(seed)
    cond = torch.randn(batch, tokens, width, generator=generator)
    extras = {}
    if pooled is not None:
        extras = {"pooled_output": torch.randn(batch, pooled, generator=generator), "guidance": guidance}
    return [[cond, extras]]


def empty_latent(family: str, batch: int, size: int = 8) -> dict:
    channels = SHAPES[family][0]
    return {"samples": torch.zeros(batch, channels, size, size)}
