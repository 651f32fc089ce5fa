"""Stage 3: the tiny SD1.5-shaped UNet, trained as SD1.5 was (epsilon prediction on scaled latents).

Training follows the SD recipe at toy scale: DDPM noise on VAE latents (a posterior sample per
step), the frozen text encoder's last hidden state as cross-attention context, the empty prompt in
10% of rows so classifier-free guidance works, plus two well-known speed-ups for a short CPU run:
min-SNR-5 loss weighting and an EMA of the weights (the EMA is what ships).
"""

from __future__ import annotations

import torch

from ..nets import scheduler_config, unet_config
from .fitting import EMA, Progress, deterministic, set_lr


@torch.no_grad()
def embed_prompts(text_encoder, token_ids: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """(n, 77) ids -> (n, 77, width): what the pipeline feeds the UNet (last hidden state)."""
    device = text_encoder.device
    out = [
        text_encoder(input_ids=token_ids[s : s + batch].to(device))[0].cpu() for s in range(0, len(token_ids), batch)
    ]
    return torch.cat(out)


def _min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
    return snr.clamp(max=gamma) / snr


def train_unet(
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    row_context: torch.Tensor,
    context_of_row: torch.Tensor,
    empty_context: torch.Tensor,
    scaling: float,
    steps: int,
    batch: int,
    seed: int,
    threads: int,
    log,
    lr: float = 1e-3,
    uncond_rate: float = 0.1,
    device: str = "cpu",
    offset_noise: float = 0.0,
    colour_free_context: torch.Tensor | None = None,
    colour_dropout: float = 0.0,
):
    """Latents (n, 4, h, w) unscaled; image row i is conditioned on row_context[context_of_row[i]].

    `colour_dropout` conditions that share of rows on `colour_free_context` instead (the same captions without
    the shapes' colour word, indexed as row_context), so that shape words are also learned apart from colour
    words: held-out prompts pair a colour and a shape never seen together.

    `offset_noise` adds per-channel constant noise in training ("offset noise"). SD1.5's schedule leaves
    sqrt(alpha_bar_999) = 0.07 of the image at the last step, and at 16x16 the mean of pure noise has std 1/16:
    without it, the shipped UNet learned to read the background colour from the starting noise's channel means
    (their correlation with the sampled background's red is 0.87), not from the prompt."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    generator = deterministic(seed, threads, device)
    scheduler = DDPMScheduler(**scheduler_config())
    alphas_cumprod = scheduler.alphas_cumprod.float()
    unet = UNet2DConditionModel(**unet_config()).to(device)
    latent_mean, latent_std = latent_mean.to(device), latent_std.to(device)
    row_context, empty_context = row_context.to(device), empty_context.to(device)
    if colour_dropout:
        if colour_free_context is None or colour_free_context.shape != row_context.shape:
            raise ValueError("HyperAlign: colour_dropout needs colour_free_context shaped as row_context.")
        colour_free_context = colour_free_context.to(device)
    context_of_row, alphas_cumprod = context_of_row.to(device), alphas_cumprod.to(device)
    ema = EMA(unet, decay=0.995)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    progress = Progress("unet", steps, max(1, steps // 20), log)
    for step in range(steps):
        set_lr(optimizer, step, steps, lr, warmup=100)
        rows = torch.randint(0, len(latent_mean), (batch,), generator=generator).to(device)
        z0 = (
            latent_mean[rows] + latent_std[rows] * torch.randn(latent_mean[rows].shape, generator=generator).to(device)
        ) * scaling
        noise = torch.randn(z0.shape, generator=generator)
        if offset_noise:  # per-channel constant noise: see the docstring of train_unet
            noise = noise + offset_noise * torch.randn(batch, z0.shape[1], 1, 1, generator=generator)
        noise = noise.to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator).to(device)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        prompt_ids = context_of_row[rows]
        context = row_context[prompt_ids]
        if colour_dropout:
            plain = (torch.rand(batch, generator=generator) < colour_dropout).to(device)
            context = torch.where(plain.view(-1, 1, 1), colour_free_context[prompt_ids], context)
        drop = (torch.rand(batch, generator=generator) < uncond_rate).to(device)
        context = torch.where(drop.view(-1, 1, 1), empty_context.expand_as(context), context)
        pred = unet(zt, t, encoder_hidden_states=context).sample
        loss = ((pred - noise).pow(2).mean(dim=(1, 2, 3)) * _min_snr_weights(alphas_cumprod, t)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        ema.update(unet)
        progress(step, loss.item())
    return ema.shadow.cpu()


@torch.no_grad()
def sample(pipe, prompts: list[str], seed: int, steps: int = 20, guidance: float = 5.0, batch: int = 128):
    """Images (n, 3, 32, 32) in [0, 1], on the CPU, from a StableDiffusionPipeline with DDIM (eta 0)."""
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(seed)  # CPU noise: the same images on any device
    out = []
    for start in range(0, len(prompts), batch):
        result = pipe(
            prompts[start : start + batch],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generator,
            output_type="pt",
            height=32,
            width=32,
        )
        out.append(result.images)
    return torch.cat(out).float().clamp(0, 1).cpu()
