"""Stage 1: the latent codec, a tiny ``AutoencoderKL`` (32x32 RGB <-> 4x16x16), trained on toy renders.

Loss as in latent diffusion minus the GAN and the perceptual term: pixel MSE (shapes weighted up)
plus a small KL term that keeps the latents near a unit Gaussian. The scaling factor is then set so
the scaled latents have unit std, as SD1.5's
0.18215 does for its VAE.
"""

from __future__ import annotations

import torch

from ..nets import VAE_CHANNELS, vae_config
from .fitting import Progress, deterministic, set_lr

FACTOR = 2 ** (len(VAE_CHANNELS) - 1)  # pixels per latent pixel


def _shape_weights(x: torch.Tensor) -> torch.Tensor:
    """Per-pixel loss weights: pixels far from the image's median colour (the shapes) count 5x, so the
    codec does not settle for getting the background right."""
    median = x.flatten(2).median(dim=2).values[..., None, None]  # (b, 3, 1, 1)
    differs = (x - median).abs().amax(dim=1, keepdim=True) > 0.2  # (b, 1, h, w)
    return 1.0 + 4.0 * differs.float()


def train_vae(
    images: torch.Tensor,
    steps: int,
    batch: int,
    seed: int,
    threads: int,
    log,
    kl_weight: float = 1e-6,
    crop: int = 16,
    full_fraction: float = 0.2,
    device: str = "cpu",
):
    """`images` (n, 3, 32, 32) in [0, 1] -> a trained AutoencoderKL in eval mode.

    Most steps see random `crop` x `crop` windows (a conv codec is translation-equivariant, and a
    window costs a quarter of a full image); the last `full_fraction` of the steps see whole images,
    so the mid-block attention learns the full latent grid.
    """
    from diffusers import AutoencoderKL

    generator = deterministic(seed, threads, device)
    vae = AutoencoderKL(**vae_config()).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    progress = Progress("vae", steps, max(1, steps // 10), log)
    data = (images * 2 - 1).to(device)
    size = data.shape[-1]
    for step in range(steps):
        set_lr(optimizer, step, steps, 2e-3)
        x = data[torch.randint(0, len(data), (batch,), generator=generator).to(device)]
        if step < steps * (1 - full_fraction) and crop < size:
            top, left = torch.randint(0, (size - crop) // FACTOR + 1, (2,), generator=generator).tolist()
            top, left = FACTOR * top, FACTOR * left  # latent-aligned windows
            x = x[..., top : top + crop, left : left + crop]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(device)
        recon = vae.decode(z).sample
        loss = ((recon - x).pow(2) * _shape_weights(x)).mean() + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        progress(step, loss.item())
    vae.eval().requires_grad_(False)
    return vae.cpu()


@torch.no_grad()
def encode(vae, images: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std (unscaled) of (n, 3, 32, 32) images in [0, 1]."""
    means, stds = [], []
    for start in range(0, len(images), batch):
        posterior = vae.encode(images[start : start + batch] * 2 - 1).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def decode(vae, latents: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Unscaled latents -> images in [0, 1]."""
    out = [vae.decode(latents[s : s + batch]).sample for s in range(0, len(latents), batch)]
    return (torch.cat(out) / 2 + 0.5).clamp(0, 1)


def scaling_factor(latent_means: torch.Tensor) -> float:
    """1 / std of the latents, to 4 significant digits (SD1.5's VAE has 0.18215)."""
    return float(f"{1.0 / latent_means.float().std().item():.4g}")
