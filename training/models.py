"""Base models through diffusers, wrapped in one adapter per model family (SD1.5, SDXL, FLUX).

In the trainer, "family" is what it is in the core: the string naming a model family ("sd15"); the object that
wraps a loaded base model of that family is its adapter (:class:`FamilyAdapter`; ``training.adapters`` registers
one per family and loads it). An adapter owns the frozen denoiser, VAE, text encoders and scheduler, and exposes
what the trainer needs in one vocabulary (shape legend: b samples, c latent channels, h/w latent size):

- ``encode_prompts(prompts, uncond) -> Cond``: text encodings, and the hypernet's context;
- ``sampling_steps(num_steps) -> SamplingSteps``: model timesteps and progress (0 = noise) per sampling step;
- ``features(x, t, cond)``: perception-encoder tokens from the frozen model's own modules, no LoRA;
- ``predict(x, t, cond, factors, guidance)``: the model output (SD1.5 eps, FLUX velocity), guidance applied, under
  the per-sample LoRA bound by ``with adapter.bound(factors, rows, samples):`` (``factors=None`` inside the block);
  ``rows(cond, guidance, samples)`` is how many rows that call has;
- ``x0(x, pred, t)``, ``step(x, pred, i, steps)``: one-step clean prediction and the sampler step;
- ``decode(latents) -> images in [0, 1]``, ``encode(images) -> latents``;
- ``noise_for_preference(x0, noise, u)``: x_t, t, progress and the denoising target for L_G.

The LoRA hooks come from :mod:`hyperalign.lora` on the diffusers module paths (``Target.id``): ``attach`` installs
them for a run (they add nothing while no factors are bound); ``bound`` binds factors for a block and always
unbinds them when it ends, also on an error. Keep the block open until the backward pass is done: with gradient
checkpointing the denoiser's forward is re-run during backward and must see the same LoRA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from hyperalign.lora import LoRAState, hooked, resolve_modules
from hyperalign.rows import bind_rows
from hyperalign.targets import Target

from .config import ModelConfig
from .paths import offline

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Cond:
    """Prompt encodings of b samples. `context` is the hypernet's (b, L, context_dim) input."""

    prompts: list[str]
    context: torch.Tensor
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class SamplingSteps:
    """Per sampling step i: the model's timestep input t[i] and the progress (0 = noise, 1 = clean).

    Words in the trainer: "sampling steps" are these; "keysteps" are P mode's (hyperalign.schedule); the "LR
    schedule" is the optimizer's (Trainer.lr_schedule); "ddim" is diffusers' DDIM scheduler that SD steps with."""

    t: list[float]
    progress: list[float]
    sigmas: list[float] | None = None  # FLUX: N + 1 values, the last 0
    ddim: object = None  # SD: the DDIM scheduler set to these steps

    def __len__(self) -> int:
        return len(self.t)


class FamilyAdapter:
    """What both families share: the LoRA hooks, prompt batching and the checkpointed VAE decode."""

    name: str = ""
    denoiser: nn.Module
    vae: nn.Module

    def __init__(self, cfg: ModelConfig, device, dtype):
        self.cfg, self.device, self.dtype = cfg, torch.device(device), dtype
        self.state = LoRAState()
        self._in_block = False  # inside a bound() block
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

    @contextlib.contextmanager
    def bound(self, factors, rows: int, samples: int) -> Iterator[None]:
        """Per-sample `factors` (None: the base model) bound to the hooked layers for every model call in the block,
        `rows` rows per call (CFG chunks share their sample's LoRA); unbound when the block ends, however it ends."""
        if self._in_block:
            raise RuntimeError("HyperAlign: adapter.bound() blocks do not nest.")
        self.state.clear()
        if factors is not None:
            self.bind(factors, rows, samples)
        self._in_block = True
        try:
            yield
        finally:
            self._in_block = False
            self.state.clear()

    def _use(self, factors, rows: int, samples: int) -> None:
        """The LoRA of one predict() call: inside a bound() block, the block's (`factors` must be None). Outside
        one, the old way (training/loop.py until it moves to bound()): `factors` are bound and stay bound until
        the caller clears them; None means the base model."""
        if self._in_block:
            if factors is not None:
                raise RuntimeError("HyperAlign: inside adapter.bound(), give the factors to bound(), not predict().")
        elif factors is None:
            self.state.clear()
        else:
            self.bind(factors, rows, samples)

    def bind(self, factors, rows: int, samples: int) -> None:
        """Bind `factors` and leave them bound (the caller clears `state`): use `bound()`."""
        bind_rows(self.state, factors, rows, samples, self.device)

    def rows(self, cond: Cond, guidance: float, samples: int) -> int:
        """Rows of one predict() call for `samples` samples: SD runs the cond and uncond chunks in one call."""
        return 2 * samples if guidance != 1.0 and "uncond" in cond.tensors else samples

    @contextlib.contextmanager
    def without_lora(self) -> Iterator[None]:
        """The base model inside the block (the perception encoder); what was bound is bound again after it."""
        saved = self.state.factors, self.state._bound
        self.state.clear()
        try:
            yield
        finally:
            self.state.factors, self.state._bound = saved

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
