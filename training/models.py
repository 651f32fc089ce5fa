"""Base models through diffusers, wrapped in one adapter per family (SD1.5, FLUX).

A family adapter owns the frozen denoiser, VAE, text encoders and scheduler, and exposes what the
trainer needs in one vocabulary (shape legend: b samples, c latent channels, h/w latent size):

- ``encode_prompts(prompts, uncond) -> Cond``: text encodings, and the hypernet's context;
- ``schedule(num_steps) -> Schedule``: model timesteps and progress (0 = noise) per sampling step;
- ``features(x, t, cond)``: perception-encoder tokens from the frozen model's own modules, no LoRA;
- ``predict(x, t, cond, factors, guidance)``: the model output (SD1.5 eps, FLUX velocity) with the
  per-sample LoRA bound to the hooked layers, guidance applied;
- ``x0(x, pred, t)``, ``step(x, pred, i, schedule)``: one-step clean prediction and the sampler step;
- ``decode(latents) -> images in [0, 1]``, ``encode(images) -> latents``;
- ``noise_for_preference(x0, noise, u)``: x_t, t, progress and the denoising target for L_G.

The LoRA hooks come from :mod:`hyperalign.lora` on the diffusers module paths (``Target.id``).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from hyperalign.lora import LoRAState, hooked, resolve_modules
from hyperalign.rows import bind_rows
from hyperalign.targets import Target

from .config import ModelConfig
from .paths import offline

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Cond:
    """Prompt encodings of b samples. `context` is the hypernet's (b, L, context_dim) input."""

    prompts: list[str]
    context: torch.Tensor
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Schedule:
    """Per sampling step i: the model's timestep input t[i] and the progress (0 = noise, 1 = clean)."""

    t: list[float]
    progress: list[float]
    sigmas: list[float] | None = None  # FLUX: N + 1 values, the last 0
    scheduler: object = None  # SD1.5: the DDIM scheduler set to these steps

    def __len__(self) -> int:
        return len(self.t)


class Family:
    """What both families share: the LoRA hooks, prompt batching and the checkpointed VAE decode."""

    name: str = ""
    denoiser: nn.Module
    vae: nn.Module

    def __init__(self, cfg: ModelConfig, device, dtype):
        self.cfg, self.device, self.dtype = cfg, torch.device(device), dtype
        self.state = LoRAState()
        self._hooks: contextlib.ExitStack | None = None

    # LoRA hooks ---------------------------------------------------------------------------------
    def attach(self, targets: list[Target], scale: float) -> None:
        """Hook every target Linear of the denoiser; factors are bound per model call."""
        self.detach()
        # diffusers keeps FLUX's q, k, v and MLP input as separate Linears: the hooks add whole deltas there
        resolved = resolve_modules(self.denoiser, targets, lambda t: t.id)
        self.state.scale = scale
        self._hooks = contextlib.ExitStack()
        self._hooks.enter_context(hooked(resolved, self.state))

    def detach(self) -> None:
        if self._hooks is not None:
            self._hooks.close()
            self._hooks = None
        self.state.clear()

    def bind(self, factors, rows: int, samples: int) -> None:
        """Bind per-sample factors to a model call of `rows` rows (CFG chunks share their sample's LoRA)."""
        if factors is None:
            self.state.clear()
            return
        bind_rows(self.state, factors, rows, samples, self.device)

    # shared helpers -----------------------------------------------------------------------------
    def frozen(self) -> list[nn.Module]:
        raise NotImplementedError

    def freeze(self) -> None:
        for module in self.frozen():
            module.requires_grad_(False).eval()

    def latent_shape(self, batch: int) -> tuple[int, int, int, int]:
        side = self.cfg.resolution // self.vae_scale
        return (batch, self.latent_channels, side, side)

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1]; checkpointed so the decoder's activations are not kept for backward."""
        if self.cfg.vae_checkpointing and torch.is_grad_enabled() and latents.requires_grad:
            return torch.utils.checkpoint.checkpoint(self._decode, latents, use_reentrant=False)
        return self._decode(latents)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = self.to_vae(latents.to(self.vae.dtype))
        images = self.vae.decode(z, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return encode_images(self.vae, images, self.device)

    def to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        c = self.vae.config
        return latents / c.scaling_factor + (c.shift_factor or 0.0)

    def _tokens(self, tokenizer, prompts: list[str], max_length: int) -> torch.Tensor:
        ids = tokenizer(
            prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return ids.to(self.device)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, device) -> torch.Tensor:
    """Images in [0, 1] (b, 3, H, W) -> model latents: the posterior mean, shifted and scaled as the model wants."""
    posterior = vae.encode((images * 2 - 1).to(device, vae.dtype)).latent_dist
    c = vae.config
    return ((posterior.mean.float() - (c.shift_factor or 0.0)) * c.scaling_factor).float()


def load_vae(cfg: ModelConfig, device, dtype=None):
    from diffusers import AutoencoderKL

    vae = load_diffusers(AutoencoderKL, cfg, "vae", dtype or DTYPES[cfg.base_dtype]).to(device)
    return vae.requires_grad_(False).eval()


def hub_kwargs(cfg: ModelConfig) -> dict:
    return {"revision": cfg.revision, "variant": cfg.variant, "local_files_only": offline()}


def load_diffusers(cls, cfg: ModelConfig, subfolder: str, dtype):
    return cls.from_pretrained(cfg.path, subfolder=subfolder, torch_dtype=dtype, **hub_kwargs(cfg))


def load_transformers(cls, cfg: ModelConfig, subfolder: str, dtype=None):
    kwargs = {"subfolder": subfolder, "revision": cfg.revision, "local_files_only": offline()}
    if dtype is None:  # a tokenizer
        return cls.from_pretrained(cfg.path, **kwargs)
    import transformers

    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = cls.from_pretrained(cfg.path, variant=cfg.variant, **{dtype_key: dtype}, **kwargs)
    return model.to(dtype)


def load_family(cfg: ModelConfig, device, dtype: torch.dtype | None = None) -> Family:
    """Load the base model named by `cfg` (local folder or Hub id) onto `device`, frozen."""
    dtype = dtype or DTYPES[cfg.base_dtype]
    if cfg.family == "sd15":
        from .sd15 import SD15Family

        family = SD15Family.load(cfg, device, dtype)
    elif cfg.family == "sdxl":
        from .sdxl import SDXLFamily

        family = SDXLFamily.load(cfg, device, dtype)
    else:
        from .flux import FluxFamily

        family = FluxFamily.load(cfg, device, dtype)
    family.freeze()
    if cfg.gradient_checkpointing:
        family.denoiser.enable_gradient_checkpointing()
    logger.info("loaded %s base model from %s (%s)", cfg.family, cfg.path, str(dtype).replace("torch.", ""))
    return family
