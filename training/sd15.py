"""The SD1.5 family: UNet2DConditionModel (eps prediction), CLIP text encoder, VAE, DDIM sampling.

Any UNet with SD1.5's structure loads (the real one, or the tiny ones of the tests and the toy
world): the target table's architecture numbers are read from the UNet's config.
"""

from __future__ import annotations

import torch

from hyperalign.hypernet import feature_tokens
from hyperalign.schedule import progress_of_timestep
from hyperalign.targets import SD15, UNetArch

from .models import Cond, FamilyAdapter, SamplingSteps, load_diffusers, load_transformers


def _uniform(value, what: str) -> int:
    """diffusers allows per-level lists; the target table needs one number."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"HyperAlign: UNets with different {what} per level are not supported, got {value}.")
        return int(value[0])
    return int(value)


def unet_arch(config) -> UNetArch:
    """The target table's architecture numbers, read from a diffusers UNet2DConditionModel config."""
    mid = config.mid_block_type
    if mid is None:
        raise ValueError("HyperAlign: the UNet has no middle block, which the perception encoder needs.")
    return UNetArch(
        block_channels=tuple(config.block_out_channels),
        attention_levels=tuple("CrossAttn" in kind for kind in config.down_block_types),
        layers_per_block=_uniform(config.layers_per_block, "layers_per_block"),
        transformer_depth=_uniform(config.transformer_layers_per_block, "transformer_layers_per_block"),
        context_dim=int(config.cross_attention_dim),
        mid_attention=mid == "UNetMidBlock2DCrossAttn",
    )


class SD15Adapter(FamilyAdapter):
    name = SD15

    def __init__(self, cfg, device, dtype, unet, vae, text_encoder, tokenizer, scheduler_config):
        super().__init__(cfg, device, dtype)
        self.denoiser, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler_config = scheduler_config
        if scheduler_config.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError(
                "HyperAlign: the sd15 family expects an epsilon-prediction model, got "
                f"prediction_type {scheduler_config['prediction_type']!r}."
            )
        self.arch = unet_arch(unet.config)
        self.feature_dim = int(unet.config.block_out_channels[-1])
        self.context_dim = int(unet.config.cross_attention_dim)
        self.num_train_timesteps = int(scheduler_config["num_train_timesteps"])
        self.alphas = self._ddim(1).alphas_cumprod.to(self.device, torch.float32)  # (T,)

    @classmethod
    def load(cls, cfg, device, dtype) -> SD15Adapter:
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from .models import hub_kwargs

        unet = load_diffusers(UNet2DConditionModel, cfg, "unet", dtype).to(device)
        vae = load_diffusers(AutoencoderKL, cfg, "vae", dtype).to(device)
        text_encoder = load_transformers(CLIPTextModel, cfg, "text_encoder", dtype).to(device)
        tokenizer = load_transformers(CLIPTokenizer, cfg, "tokenizer")
        kwargs = {k: v for k, v in hub_kwargs(cfg).items() if k != "variant"}
        scheduler_config = dict(DDIMScheduler.load_config(cfg.path, subfolder="scheduler", **kwargs))
        return cls(cfg, device, dtype, unet, vae, text_encoder, tokenizer, scheduler_config)

    def frozen(self):
        return [self.denoiser, self.vae, self.text_encoder]

    def _ddim(self, num_steps: int):
        from diffusers import DDIMScheduler

        # set_alpha_to_one: the last step lands on the clean latent (sigma 0), as ComfyUI's samplers do; SD1.5's own
        # scheduler config says false, which would stop at alphas_cumprod[0] (sigma 0.029) and leave that noise in
        ddim = DDIMScheduler.from_config(
            self.scheduler_config, timestep_spacing=self.cfg.timestep_spacing, set_alpha_to_one=True
        )
        ddim.set_timesteps(num_steps)
        return ddim

    # prompts -------------------------------------------------------------------------------------
    @torch.no_grad()
    def _embed(self, prompts: list[str]) -> torch.Tensor:
        ids = self._tokens(self.tokenizer, prompts, self.tokenizer.model_max_length)
        return self.text_encoder(ids)[0]  # (b, 77, context_dim)

    def encode_prompts(self, prompts: list[str], uncond: bool = True) -> Cond:
        context = self._embed(prompts)
        # one negative row, repeated, as ComfyUI does: encoding "" per prompt is wasted work, and batched attention
        # kernels may differ in the last bit between identical rows
        tensors = {"uncond": self._embed([""]).repeat(len(prompts), 1, 1)} if uncond else {}
        return Cond(list(prompts), context, tensors)

    # time ----------------------------------------------------------------------------------------
    def sampling_steps(self, num_steps: int) -> SamplingSteps:
        ddim = self._ddim(num_steps)
        t = [float(v) for v in ddim.timesteps]
        return SamplingSteps(t=t, progress=[self.progress(v) for v in t], ddim=ddim)

    def progress(self, timestep: float) -> float:
        return progress_of_timestep(float(timestep), self.num_train_timesteps)

    def timesteps(self, value: float, batch: int) -> torch.Tensor:
        return torch.full((batch,), float(value), device=self.device)

    # model ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def features(self, x: torch.Tensor, t: torch.Tensor, cond: Cond, hcfg, guidance: float = 1.0) -> torch.Tensor:
        """Time embedding, input blocks and middle block of the frozen UNet on (x_t, t, c), without LoRA."""
        with self.without_lora():  # the perception encoder sees the base model
            unet, dtype = self.denoiser, self.dtype
            x, context = x.to(dtype), cond.context.to(dtype)
            emb = unet.time_embedding(unet.get_time_embed(sample=x, timestep=t), None)
            if unet.time_embed_act is not None:
                emb = unet.time_embed_act(emb)
            h = unet.conv_in(x)
            for block in unet.down_blocks:
                if getattr(block, "has_cross_attention", False):
                    h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=context)
                else:
                    h, _ = block(hidden_states=h, temb=emb)
            h = unet.mid_block(h, emb, encoder_hidden_states=context)  # (b, feature_dim, h/8, w/8)
            return feature_tokens(h.float(), hcfg.feature_grid)

    def predict(self, x, t, cond: Cond, factors, guidance: float) -> torch.Tensor:
        """Guided eps for x (b, c, h, w); CFG runs cond and uncond rows in one call, sharing each sample's LoRA."""
        b = x.shape[0]
        cfg = guidance != 1.0 and "uncond" in cond.tensors
        x_in, t_in, context = x, t, cond.context
        if cfg:
            x_in, t_in = torch.cat([x, x]), torch.cat([t, t])
            context = torch.cat([cond.context, cond.tensors["uncond"]])
        self._use(factors, x_in.shape[0], b)
        out = self.denoiser(x_in.to(self.dtype), t_in, encoder_hidden_states=context.to(self.dtype), return_dict=False)[
            0
        ].float()
        if cfg:
            eps_cond, eps_uncond = out.chunk(2)
            out = eps_uncond + guidance * (eps_cond - eps_uncond)
        return out

    def _alpha(self, t: torch.Tensor) -> torch.Tensor:
        return self.alphas[t.round().long()].view(-1, 1, 1, 1)

    def x0(self, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """One-step clean prediction, the DDPM eps formula: (x - sqrt(1 - a) eps) / sqrt(a)."""
        alpha = self._alpha(t)
        return (x - (1 - alpha).sqrt() * eps) / alpha.sqrt()

    def step(self, x: torch.Tensor, eps: torch.Tensor, i: int, steps: SamplingSteps) -> torch.Tensor:
        return steps.ddim.step(eps, int(steps.t[i]), x, eta=0.0).prev_sample

    def noise_for_preference(self, x0: torch.Tensor, noise: torch.Tensor, u: torch.Tensor):
        """DDPM forward noising at t = floor(u * T): returns x_t, t, progress and the eps target."""
        t = (u * self.num_train_timesteps).floor().clamp(max=self.num_train_timesteps - 1).to(self.device)
        alpha = self._alpha(t)
        x_t = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
        progress = progress_of_timestep(t, self.num_train_timesteps)
        return x_t, t, progress, noise
