"""Running ComfyUI's own sampler from inside a node (HyperAlignKeysteps, HyperAlignExportLoRA)."""

from __future__ import annotations

import comfy.sample
import comfy.samplers
import torch


def sample_latent(
    model,
    latent: dict,
    seed: int,
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    positive,
    negative,
    callback=None,
) -> torch.Tensor:
    """Sample `latent` from full noise the way the KSampler node does (same noise for the same seed)."""
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    return comfy.sample.sample(
        model,
        noise,
        steps,
        cfg,
        sampler_name,
        scheduler,
        positive,
        negative,
        latent_image,
        denoise=1.0,
        noise_mask=latent.get("noise_mask"),
        callback=callback,
        disable_pbar=True,
        seed=seed,
    )


def schedule(model, steps: int, sampler_name: str, scheduler: str) -> torch.Tensor:
    """The sigmas (steps + 1) that :func:`sample_latent` runs through."""
    sampler = comfy.samplers.KSampler(
        model,
        steps=steps,
        device=model.load_device,
        sampler=sampler_name,
        scheduler=scheduler,
        denoise=1.0,
        model_options=model.model_options,
    )
    return sampler.sigmas
