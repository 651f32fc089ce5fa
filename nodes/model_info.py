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
from ..hyperalign.targets import FLUX, SD15, SDXL, DiTArch, UNetArch, XLUNetArch, arch_to_dict

_FAMILY_LABEL = {SD15: "SD1.5", FLUX: "FLUX.1", SDXL: "SDXL"}
UNET_FAMILIES = (SD15, SDXL)  # ComfyUI UNetModels: DDPM time, middle-block features, text tokens as the prompt


@dataclass(frozen=True)
class ModelInfo:
    family: str
    arch: UNetArch | DiTArch | XLUNetArch
    feature_dim: int  # width of the perception encoder's output
    context_dim: int  # width of the hypernet's prompt input (SD1.5/SDXL text tokens, FLUX pooled vector)


def _unsupported_unet(reason: str, label: str = "SD1.5") -> ValueError:
    return ValueError(
        f"HyperAlign: this {label}-family UNet has an irregular layout ({reason}). HINT: HyperAlign supports "
        f"standard {label} UNets; connect one."
    )


def _level_depths(config: dict, label: str) -> tuple[int, list[int]]:
    """Res blocks per level and the transformer depth of each level, checked to be one number per level (also
    for the output blocks, which ComfyUI builds from the end of transformer_depth_output)."""
    mult = list(config["channel_mult"])
    res = config["num_res_blocks"]
    res = [res] * len(mult) if isinstance(res, int) else list(res)
    if len(set(res)) != 1:
        raise _unsupported_unet(f"num_res_blocks {res}", label)
    per_level = res[0]
    depth_in = list(config["transformer_depth"])
    levels = [depth_in[i * per_level : (i + 1) * per_level] for i in range(len(mult))]
    if any(len(set(level)) != 1 for level in levels):
        raise _unsupported_unet(f"transformer_depth {depth_in}", label)
    depths = [level[0] for level in levels]
    expected_out = [d for d in depths for _ in range(per_level + 1)]
    if list(config.get("transformer_depth_output", expected_out)) != expected_out:
        raise _unsupported_unet(f"transformer_depth_output {config.get('transformer_depth_output')}", label)
    return per_level, depths


def _xl_unet_arch(config: dict) -> XLUNetArch:
    """XLUNetArch from ComfyUI's SDXL unet_config (the same fields as SD1.5's, per-level transformer depths)."""
    per_level, depths = _level_depths(config, "SDXL")
    middle = config.get("transformer_depth_middle")
    return XLUNetArch(
        block_channels=tuple(config["model_channels"] * m for m in config["channel_mult"]),
        transformer_depths=tuple(depths),
        mid_depth=max(int(depths[-1] if middle is None else middle), 0),  # ComfyUI: None = the last level's
        layers_per_block=per_level,
        context_dim=int(config["context_dim"]),
    )


def _check_sdxl(base, config) -> None:
    """The refiner and non-eps SDXL models are not what SDXL predictors are trained on: refuse them by name."""
    if isinstance(config, comfy.supported_models.SDXLRefiner):
        raise ValueError(
            "HyperAlign: the connected MODEL is an SDXL refiner; HyperAlign predictors are made for SDXL base "
            "models (the refiner has another UNet and text encoder). HINT: apply HyperAlign to the base model's "
            "MODEL and leave the refiner pass unaligned."
        )
    model_type = getattr(base, "model_type", None)
    if model_type is not None and model_type != comfy.model_base.ModelType.EPS:
        raise ValueError(
            f"HyperAlign: the connected SDXL MODEL predicts {model_type.name}, but SDXL predictors are trained on "
            "eps-prediction SDXL models. HINT: connect an eps-prediction SDXL model (SDXL base and most fine-tunes)."
        )


def _unet_arch(config: dict) -> UNetArch:
    """UNetArch from ComfyUI's unet_config (model_channels, channel_mult, num_res_blocks, transformer depths)."""
    per_level, levels = _level_depths(config, "SD1.5")
    middle = config.get("transformer_depth_middle")
    depths = {d for d in [*levels, middle or 0] if d > 0}
    if len(depths) > 1:  # SD1.5's table has one depth for every site
        raise _unsupported_unet(f"transformer depths {sorted(depths)}")
    return UNetArch(
        block_channels=tuple(config["model_channels"] * m for m in config["channel_mult"]),
        attention_levels=tuple(d > 0 for d in levels),
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
    if isinstance(config, (comfy.supported_models.SDXL, comfy.supported_models.SDXLRefiner)):
        _check_sdxl(base, config)
        arch = _xl_unet_arch(unet)
        return ModelInfo(SDXL, arch, arch.block_channels[-1], arch.context_dim)
    raise ValueError(
        f"HyperAlign: the connected MODEL is a {type(config).__name__} model; HyperAlign predictors exist for "
        "SD1.5, SDXL and FLUX.1 models only. HINT: connect an SD1.5, SDXL or FLUX.1 MODEL."
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
    """Progress (0 = pure noise) of `sigma` in the model's own time, by the formula the trainer uses: SD1.5's and
    SDXL's discrete timesteps over ComfyUI's own count (1000), FLUX's t = sigma."""
    timestep = model_sampling.timestep(torch.as_tensor(sigma)).float()
    num_train_timesteps = int(model_sampling.num_timesteps) if family in UNET_FAMILIES else None
    return progress_of_timestep(timestep, num_train_timesteps).clamp(0.0, 1.0)
