"""The perception encoder (paper §4.2) inside ComfyUI: the loaded model's own input path, stopped early.

Nothing is copied: the base model runs its normal ``apply_model`` on the positive rows (ComfyUI's
own input scaling, timestep conversion, embedders and blocks) with an empty ``transformer_options``
(so no sampling wrappers or attention patches run), and a forward hook on the encoder's last module
captures that module's output and stops the pass there.

- SD1.5: time embedding, every input block and the middle block, on the DDPM-scale latent with the
  prompt embedding; the middle block's output (b, c_mid, h/8, w/8) is the feature map.
- SDXL: the same, with SDXL's ``y`` (pooled text and size/crop embeddings) added to the time embedding, as
  the positive conditioning carries it; the middle block's output is (b, 1280, h/4, w/4).
- FLUX: img/txt/time/vector/guidance embedders, rope and the first ``encoder_blocks`` double blocks;
  their image tokens (b, n, hidden) are laid back on the patch grid (b, hidden, h/2, w/2).
Either map is pooled by :func:`hyperalign.hypernet.feature_tokens`, as the trainer does.
"""

from __future__ import annotations

import comfy.samplers
import torch

from ..hyperalign.config import HypernetConfig
from ..hyperalign.hypernet import feature_tokens
from ..hyperalign.targets import FLUX
from .model_info import UNET_FAMILIES


class _EncoderDone(Exception):
    """Raised by the capture hook: the rest of the forward pass is not needed."""


def positive_conditioning(conds, batch: int) -> dict:
    """The first positive cond of a CALC_COND_BATCH call, processed for `batch` rows, as apply_model kwargs."""
    positive = conds[0] if conds else None
    for entry in positive or []:
        model_conds = entry.get("model_conds", {})
        if "c_crossattn" in model_conds:
            processed = {name: cond.process_cond(batch_size=batch, area=None) for name, cond in model_conds.items()}
            return comfy.samplers.cond_cat([processed])
    raise ValueError(
        "HyperAlign: the positive conditioning has no prompt embedding (c_crossattn), so the predictor has "
        "nothing to read. HINT: connect a text encoder's CONDITIONING to the sampler's positive input."
    )


def _encoder_site(diffusion_model: torch.nn.Module, family: str, cfg: HypernetConfig):
    """The module whose output ends the perception encoder, and how to take the features from it."""
    if family in UNET_FAMILIES:
        if getattr(diffusion_model, "middle_block", None) is None:
            raise ValueError(f"HyperAlign: this UNet has no middle block, where the {family} perception encoder ends.")
        return diffusion_model.middle_block[-1], lambda output: output
    if cfg.encoder_blocks == 0:
        return diffusion_model.img_in, lambda output: output
    return diffusion_model.double_blocks[cfg.encoder_blocks - 1], lambda output: output[0]


def _tokens_to_grid(tokens: torch.Tensor, latent: torch.Tensor, patch_size: int) -> torch.Tensor:
    """FLUX image tokens (b, n, c) -> (b, c, h/patch, w/patch), the patch grid they were cut from."""
    height, width = latent.shape[-2:]
    rows, cols = (height + patch_size // 2) // patch_size, (width + patch_size // 2) // patch_size
    grid = tokens[:, : rows * cols].reshape(tokens.shape[0], rows, cols, tokens.shape[-1])
    return grid.permute(0, 3, 1, 2)


def perception_features(base_model, family: str, cfg: HypernetConfig, x, sigma, conditioning: dict) -> torch.Tensor:
    """Feature tokens (b, n, feature_dim) of the latent rows `x` (k-diffusion scale) at `sigma` (b,)."""
    diffusion_model = base_model.diffusion_model
    site, take = _encoder_site(diffusion_model, family, cfg)
    captured = []

    def capture(module, args, output):
        if not captured:
            captured.append(take(output).clone())  # later blocks update their input in place
        raise _EncoderDone

    handle = site.register_forward_hook(capture)
    try:
        base_model.apply_model(x, sigma, transformer_options={}, **conditioning)
    except _EncoderDone:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError("HyperAlign: the model's forward pass never reached the perception encoder's last block.")
    feature_map = captured[0]
    if family == FLUX:
        feature_map = _tokens_to_grid(feature_map, x, diffusion_model.patch_size)
    return feature_tokens(feature_map, cfg.feature_grid)


def prompt_context(family: str, cfg: HypernetConfig, conditioning: dict) -> torch.Tensor | None:
    """The hypernet's prompt input: SD1.5/SDXL the cond embedding (b, L, d); FLUX the pooled CLIP vector (b, 1, d)."""
    if not cfg.context_dim:
        return None
    if family in UNET_FAMILIES:
        context = conditioning.get("c_crossattn")
    else:
        pooled = conditioning.get("y")
        context = None if pooled is None else pooled[:, None, :]
    if context is None:
        raise ValueError(
            "HyperAlign: the positive conditioning has no "
            f"{'prompt embedding' if family in UNET_FAMILIES else 'pooled CLIP vector (y)'}. "
            "HINT: encode the prompt with the model's own text encoder node."
        )
    if context.shape[-1] != cfg.context_dim:
        raise ValueError(
            f"HyperAlign: the prompt embedding has width {context.shape[-1]}, but the predictor expects "
            f"{cfg.context_dim}. HINT: use the text encoder the predictor was trained with."
        )
    return context
