"""Which model a MODEL is: its family and architecture from ComfyUI's own model config, whether a predictor
fits it, and its time as HyperAlign's progress."""

from __future__ import annotations

import os
from dataclasses import dataclass

import comfy.model_base
import comfy.supported_models
import torch

from ..hyperalign.io import Predictor
from ..hyperalign.lora import resolve_modules
from ..hyperalign.schedule import progress_of_timestep
from ..hyperalign.targets import FLUX, SD15, DiTArch, UNetArch, arch_to_dict

_FAMILY_LABEL = {SD15: "SD1.5", FLUX: "FLUX.1"}


@dataclass(frozen=True)
class ModelInfo:
    family: str
    arch: UNetArch | DiTArch
    feature_dim: int  # width of the perception encoder's output
    context_dim: int  # width of the hypernet's prompt input (SD1.5 text tokens, FLUX pooled vector)


def _unsupported_unet(reason: str) -> ValueError:
    return ValueError(
        f"HyperAlign: this SD1.5-family UNet has an irregular layout ({reason}). HINT: HyperAlign supports "
        "standard SD1.5 UNets; connect one."
    )


def _unet_arch(config: dict) -> UNetArch:
    """UNetArch from ComfyUI's unet_config (model_channels, channel_mult, num_res_blocks, transformer depths)."""
    mult = list(config["channel_mult"])
    res = config["num_res_blocks"]
    res = [res] * len(mult) if isinstance(res, int) else list(res)
    if len(set(res)) != 1:
        raise _unsupported_unet(f"num_res_blocks {res}")
    per_level = res[0]
    depth_in = list(config["transformer_depth"])
    levels = [depth_in[i * per_level : (i + 1) * per_level] for i in range(len(mult))]
    if any(len(set(level)) != 1 for level in levels):
        raise _unsupported_unet(f"transformer_depth {depth_in}")
    depths = {level[0] for level in levels if level[0]} | ({config.get("transformer_depth_middle")} - {None, 0})
    depths = {d for d in depths if d > 0}
    if len(depths) > 1:
        raise _unsupported_unet(f"transformer depths {sorted(depths)}")
    attention = tuple(level[0] > 0 for level in levels)
    expected_out = [d for level in levels for d in [level[0]] * (per_level + 1)]  # ComfyUI pops from the end
    if list(config.get("transformer_depth_output", expected_out)) != expected_out:
        raise _unsupported_unet(f"transformer_depth_output {config.get('transformer_depth_output')}")
    middle = config.get("transformer_depth_middle")
    return UNetArch(
        block_channels=tuple(config["model_channels"] * m for m in mult),
        attention_levels=attention,
        layers_per_block=per_level,
        transformer_depth=depths.pop() if depths else 1,
        context_dim=int(config["context_dim"]),
        mid_attention=middle is not None and middle > 0,
    )


def identify_model(model) -> ModelInfo:
    """Family and architecture of a MODEL (a ModelPatcher), from ComfyUI's own model config."""
    base = model.model
    config = getattr(base, "model_config", None)
    unet = dict(getattr(config, "unet_config", None) or {})
    if isinstance(base, comfy.model_base.Flux) and unet.get("image_model") == "flux":
        arch = DiTArch(
            hidden_size=int(unet["hidden_size"]),
            depth=int(unet["depth"]),
            depth_single_blocks=int(unet["depth_single_blocks"]),
            mlp_ratio=float(unet["mlp_ratio"]),
        )
        return ModelInfo(FLUX, arch, arch.hidden_size, int(unet.get("vec_in_dim") or 0))
    if isinstance(config, comfy.supported_models.SD15):
        arch = _unet_arch(unet)
        return ModelInfo(SD15, arch, arch.block_channels[-1], arch.context_dim)
    raise ValueError(
        f"HyperAlign: the connected MODEL is a {type(config).__name__} model; HyperAlign predictors exist for "
        "SD1.5 and FLUX.1 models only. HINT: connect an SD1.5 or FLUX.1 MODEL."
    )


def comfy_path(target) -> str:
    return target.comfy


def check_compatible(predictor: Predictor, model) -> ModelInfo:
    """Refuse a predictor made for another family or another target table, before anything is patched."""
    info = identify_model(model)
    name = os.path.basename(predictor.path or "predictor")
    if predictor.family != info.family:
        raise ValueError(
            f"HyperAlign: predictor {name!r} was trained for {predictor.family!r} but the connected MODEL is "
            f"{info.family!r}. HINT: choose a {_FAMILY_LABEL[info.family]} predictor or connect a "
            f"{_FAMILY_LABEL[predictor.family]} model."
        )
    wanted, found = arch_to_dict(predictor.table.arch), arch_to_dict(info.arch)
    if wanted != found:
        raise ValueError(
            f"HyperAlign: predictor {name!r} was trained for a different {info.family} architecture (its target "
            f"table is for {wanted}, the connected MODEL is {found}). HINT: use a predictor trained for this model."
        )
    cfg = predictor.hypernet.cfg
    if cfg.feature_dim != info.feature_dim or cfg.context_dim not in (0, info.context_dim):
        raise ValueError(
            f"HyperAlign: predictor {name!r} reads features of width {cfg.feature_dim} and prompts of width "
            f"{cfg.context_dim}, but this model gives {info.feature_dim} and {info.context_dim}. "
            "HINT: use a predictor trained for this model."
        )
    if info.family == FLUX and cfg.encoder_blocks > info.arch.depth:
        raise ValueError(
            f"HyperAlign: predictor {name!r} encodes with {cfg.encoder_blocks} double blocks, but the model has "
            f"{info.arch.depth}. HINT: use a predictor trained for this model."
        )
    resolve_modules(model.get_model_object("diffusion_model"), predictor.targets, comfy_path)
    return info


def progress_of_sigma(model_sampling, sigma: torch.Tensor, family: str) -> torch.Tensor:
    """Progress (0 = pure noise) of `sigma` in the model's own time, by the formula the trainer uses: SD1.5's
    discrete timesteps over ComfyUI's own count (1000), FLUX's t = sigma."""
    timestep = model_sampling.timestep(torch.as_tensor(sigma)).float()
    num_train_timesteps = int(model_sampling.num_timesteps) if family == SD15 else None
    return progress_of_timestep(timestep, num_train_timesteps).clamp(0.0, 1.0)
