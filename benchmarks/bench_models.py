"""The benchmark's world: the real ComfyUI imported in-process, this repository loaded as a node pack,
full-width random models built with ComfyUI's own classes, and real-size predictors.

Shapes (stated in docs/performance.md):
- SD1.5: the real SD1.5 UNet (859.5 M parameters, ComfyUI's SD15 config), random weights, fp32.
- SDXL: the real SDXL base UNet (2567 M parameters, ComfyUI's SDXL config), random weights, fp32; its prompt
  is 77 tokens of width 2048 and a pooled vector of 1280 (ComfyUI adds the size embeddings).
- FLUX-shaped: real widths (hidden 3072, 24 heads, T5 context 4096, pooled vector 768, guidance
  embedded) at reduced depth (``--flux-depth`` double + ``--flux-single`` single blocks), random, fp32.
Predictors use the real-size hypernet config (dim 256, depth 2, rank 8, basis 32), every target of
the ``attn`` preset, and randomised (non-zero) up-heads so every LoRA is live.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

SD15_UNET = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


SDXL_UNET = dict(  # comfy/model_detection.py's SDXL base
    SD15_UNET,
    num_classes="sequential",
    adm_in_channels=2816,
    model_channels=320,
    num_res_blocks=[2, 2, 2],
    transformer_depth=[0, 0, 2, 2, 10, 10],
    channel_mult=[1, 2, 4],
    transformer_depth_middle=10,
    use_linear_in_transformer=True,
    context_dim=2048,
    num_head_channels=64,
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
)
UNETS = ("sd15", "sdxl")  # 4-channel latents, 77 text tokens, the "normal" scheduler


def flux_unet(depth: int, single: int) -> dict:
    return {
        "image_model": "flux",
        "in_channels": 16,
        "out_channels": 16,
        "vec_in_dim": 768,
        "context_in_dim": 4096,
        "hidden_size": 3072,
        "mlp_ratio": 4.0,
        "num_heads": 24,
        "depth": depth,
        "depth_single_blocks": single,
        "axes_dim": [16, 56, 56],
        "theta": 10000,
        "patch_size": 2,
        "qkv_bias": True,
        "guidance_embed": True,
    }


@dataclass
class Host:
    """The imported ComfyUI and this pack as ComfyUI loaded it."""

    comfy: object  # namespace of comfy modules
    nodes: object  # ComfyUI's nodes.py
    pack: object  # our root module as loaded by ComfyUI
    models_dir: Path  # a temporary models/hyperalign folder

    def submodule(self, name: str):
        return sys.modules[f"{self.pack.__name__}.{name}"]

    def node(self, node_id: str, **inputs):
        return self.nodes.NODE_CLASS_MAPPINGS[node_id].execute(**inputs).args


def start_host(comfyui_path: str | None, device: str) -> Host:
    """Import ComfyUI (CPU unless `device` is cuda) and load this repository through its node loader."""
    from training.comfy_host import import_comfy, load_pack

    comfy_host = import_comfy(comfyui_path, cpu=device == "cpu")
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sample
    import comfy.samplers
    import comfy.supported_models

    nodes, folder_paths = comfy_host.nodes, comfy_host.folder_paths
    scratch = Path(tempfile.mkdtemp(prefix="hyperalign_bench_"))
    for name, setter in (("output", folder_paths.set_output_directory), ("temp", folder_paths.set_temp_directory)):
        (scratch / name).mkdir()
        setter(str(scratch / name))
    (scratch / "custom_nodes").mkdir()
    pack = load_pack(nodes, scratch / "custom_nodes")
    models_dir = scratch / "hyperalign"
    models_dir.mkdir()
    folder_paths.add_model_folder_path("hyperalign", str(models_dir), is_default=True)
    comfy_ns = type("Comfy", (), {})()
    for name, module in (
        ("mm", comfy.model_management),
        ("model_patcher", comfy.model_patcher),
        ("sample", comfy.sample),
        ("samplers", comfy.samplers),
        ("supported_models", comfy.supported_models),
    ):
        setattr(comfy_ns, name, module)
    return Host(comfy_ns, nodes, pack, models_dir)


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI's ops leave weights uninitialised: draw them (fan-in scaled, so activations stay finite)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 1.0 / math.sqrt(param[0].numel()))
            elif name.endswith("weight"):
                param.normal_(1.0, 0.1)
            else:
                param.normal_(0.0, 0.05)


def build_model(host: Host, family: str, dtype: torch.dtype, flux_depth: tuple[int, int] = (2, 4)):
    """A ModelPatcher around a full-width random model; returns (patcher, arch dict for HyperAlign)."""
    sm = host.comfy.supported_models
    if family in UNETS:
        config = sm.SD15(dict(SD15_UNET)) if family == "sd15" else sm.SDXL(dict(SDXL_UNET))
        arch = None  # the real SD1.5 / SDXL table (hyperalign.targets defaults)
    else:
        config = sm.Flux(flux_unet(*flux_depth))
        arch = {"hidden_size": 3072, "depth": flux_depth[0], "depth_single_blocks": flux_depth[1], "mlp_ratio": 4.0}
    config.set_inference_dtype(dtype, None)
    load_device = host.comfy.mm.get_torch_device()
    model = config.get_model({}, "", device=load_device)
    _randomise(model.diffusion_model, seed=0)
    model.eval()
    patcher = host.comfy.model_patcher.ModelPatcher(
        model, load_device=load_device, offload_device=host.comfy.mm.unet_offload_device()
    )
    return patcher, arch


def hypernet_config(family: str):
    from hyperalign import HypernetConfig

    if family in UNETS:
        return HypernetConfig(feature_dim=1280, context_dim=768 if family == "sd15" else 2048)
    return HypernetConfig(feature_dim=3072, context_dim=768, encoder_blocks=2)


def save_random_predictor(host: Host, family: str, arch, name: str, std: float = 0.02) -> tuple[str, int, int]:
    """A real-size predictor with randomised up-heads in models/hyperalign; returns (name, params, bytes)."""
    import hyperalign

    torch.manual_seed(1)
    predictor = hyperalign.new_predictor(family, hypernet_config(family), arch)
    with torch.no_grad():
        for param_name, param in predictor.hypernet.named_parameters():
            if "up_coef" in param_name:
                param.normal_(0.0, std / math.sqrt(param.shape[-1]))
    path = host.models_dir / name
    hyperalign.save_predictor(path, predictor)
    params = sum(p.numel() for p in predictor.hypernet.parameters())
    return name, params, os.path.getsize(path)


def conditioning(family: str, batch: int, seed: int, tokens: int, device) -> list:
    """A CONDITIONING of `batch` random prompts: SD1.5 CLIP-L tokens; SDXL CLIP-L + G tokens and the pooled G
    vector; FLUX T5 tokens, pooled CLIP, guidance."""
    generator = torch.Generator().manual_seed(seed)
    width = {"sd15": 768, "sdxl": 2048}.get(family, 4096)
    cond = torch.randn(batch, tokens, width, generator=generator)
    extras = {}
    if family == "sdxl":
        extras = {"pooled_output": torch.randn(batch, 1280, generator=generator)}
    if family == "flux":
        extras = {"pooled_output": torch.randn(batch, 768, generator=generator), "guidance": 3.5}
    return [[cond, extras]]


def empty_latent(family: str, batch: int, size: int) -> torch.Tensor:
    return torch.zeros(batch, 4 if family in UNETS else 16, size, size)
